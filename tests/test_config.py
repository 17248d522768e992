"""Recipes: overrides, struct mode with the valid keys named, type checks, components and validation."""

from pathlib import Path

import pytest

from grpo_image.base.config import RecipeError, instantiate, load_recipe, reward_specs, validate_components
from grpo_image.training.data import load_recipe_prompts
from grpo_image.training.preflight import preflight, prompt_passes_warning

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_recipe_values_and_overrides_land_over_the_defaults(tmp_path):
    recipe = write(tmp_path, "steps: 7\ntrain:\n  lr: 0.5\n")
    cfg = load_recipe(recipe, ["train.beta=0", "sampling.min_p=0.03", "data.prompts=p.txt", "seed=4"])
    assert (cfg.steps, cfg.train.lr, cfg.train.beta, cfg.sampling.min_p, cfg.seed) == (7, 0.5, 0, 0.03, 4)
    assert cfg.data.prompts == "p.txt"
    assert cfg.train.clip_eps_low == 0.2  # untouched default
    assert cfg.data.group_size == 8


def test_unknown_key_names_the_valid_keys(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, "train:\n  lrr: 0.1\n"))
    message = str(err.value)
    assert "recipe.yaml" in message and "'train.lrr'" in message
    assert "lr, max_bad_steps, max_grad_norm" in message  # the sorted list of valid keys under train


def test_unknown_override_names_the_valid_keys(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'sampling.topk'.*top_k, top_p"):
        load_recipe(write(tmp_path, "steps: 1\n"), ["sampling.topk=3"])


@pytest.mark.parametrize("text, key", [
    ("steps: ten\n", "'steps' must be an integer"),
    ("steps: 1.5\n", "'steps' must be an integer"),
    ("train:\n  lr: fast\n", "'train.lr' must be a number"),
    ("logging:\n  tensorboard: 1\n", "'logging.tensorboard' must be a boolean"),
    ("train:\n  lora:\n    target_modules: q_proj\n", "'train.lora.target_modules' must be a list"),
    ("data: 3\n", "'data' must be a mapping"),
])
def test_wrong_types_name_the_key(tmp_path, text, key):
    with pytest.raises(RecipeError, match=key):
        load_recipe(write(tmp_path, text))


def test_an_integer_is_accepted_where_a_number_is_expected(tmp_path):
    assert load_recipe(write(tmp_path, "train:\n  lr: 1\n")).train.lr == 1


def test_malformed_yaml_and_missing_file_name_the_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "steps: [1, 2\n"))
    with pytest.raises(RecipeError, match="nope.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_component_nodes_are_replaced_whole_and_accept_their_own_arguments(tmp_path):
    recipe = write(tmp_path, "decoder:\n  _component_: grpo_image.decoders.palette.PaletteDecoder\n  patch_size: 2\n")
    cfg = load_recipe(recipe, ["decoder.colors=['#FF0000','#00FF00']"])
    decoder = instantiate(cfg.decoder)
    assert decoder.num_codes == 2 and decoder.palette.tolist() == [[255, 0, 0], [0, 255, 0]]


def test_instantiate_builds_nested_components_and_lists():
    node = {
        "_component_": "builtins.dict",
        "inner": {"_component_": "fractions.Fraction", "numerator": 3, "denominator": 4},
        "many": [{"_component_": "fractions.Fraction", "numerator": 1, "denominator": 2}, 5],
        "plain": {"a": 1},
    }
    built = instantiate(node)
    assert float(built["inner"]) == 0.75 and float(built["many"][0]) == 0.5 and built["many"][1] == 5
    assert built["plain"] == {"a": 1}


def test_validate_components_binds_arguments_without_calling():
    ok = {"_component_": "grpo_image.policies.tiny.tiny_policy", "path": "/does/not/exist", "num_codes": 4}
    assert validate_components(ok) == 1  # would fail if it were called: the folder does not exist
    with pytest.raises(RecipeError, match="'policy': arguments do not fit.*num_code"):
        validate_components({"_component_": "grpo_image.policies.tiny.tiny_policy", "num_code": 4}, "policy")
    with pytest.raises(RecipeError, match="cannot import module 'grpo_image.nothing'"):
        validate_components({"_component_": "grpo_image.nothing.Here"})
    with pytest.raises(RecipeError, match="has no attribute 'Nothing'"):
        validate_components({"_component_": "rewards.color.Nothing"})


@pytest.mark.parametrize("entry, message", [
    ("- name: a\n    weight: 1\n    scorer: {_component_: rewards.jpeg.JPEGCompressibility}\n    wieght: 2",
     r"unknown key\(s\) \['wieght'\]"),
    ("- weight: 1", r"missing key\(s\) \['name', 'scorer'\]"),
    ("- name: a\n    scorer: {quality: 3}", "must be a node with a _component_ key"),
    ("- name: a\n    weight: heavy\n    scorer: {_component_: rewards.jpeg.JPEGCompressibility}", "weight' must be a number"),
])
def test_reward_entries_are_checked(tmp_path, entry, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, "rewards:\n  " + entry + "\n"))


def test_reward_names_must_be_unique(tmp_path):
    scorer = "scorer: {_component_: rewards.jpeg.JPEGCompressibility}"
    text = f"rewards:\n  - name: a\n    {scorer}\n  - name: a\n    {scorer}\n"
    with pytest.raises(RecipeError, match="unique"):
        load_recipe(write(tmp_path, text))


def test_reward_specs_fill_in_weight_and_required(tmp_path):
    text = "rewards:\n  - name: j\n    scorer: {_component_: rewards.jpeg.JPEGCompressibility, quality: 50}\n"
    (spec,) = reward_specs(load_recipe(write(tmp_path, text)))
    assert spec == {"name": "j", "weight": 1.0, "required": True, "feeds": "both",
                    "scorer": {"_component_": "rewards.jpeg.JPEGCompressibility", "quality": 50}}


@pytest.mark.parametrize("override, message", [
    ("train.mode=half", "'train.mode' must be one of lora, full; got 'half'"),
    ("advantages.scale=prompt", "'advantages.scale' must be one of group, batch, none"),
    ("advantages.aggregation=mean", "'advantages.aggregation' must be one of sum_then_normalize, normalize_then_sum"),
    ("advantages.eps=0", "'advantages.eps' must be > 0"),
    ("sampling.temperature=0", "'sampling.temperature' must be > 0, got 0"),
    ("sampling.top_p=1.5", "'sampling.top_p' must be in (0, 1], got 1.5"),
    ("workers.backend=threads", "'workers.backend' must be one of inprocess, ray"),
    ("decoder_seeds=prompt", "'decoder_seeds' must be one of rollout, group"),
    ("save_every=0", "'save_every' must be >= 1, got 0"),
    ("data.max_passes=0", "'data.max_passes' must be > 0, got 0"),
    ("health.update_ratio_min=-1e-5", "'health.update_ratio_min' must be >= 0, got -1e-05"),
])
def test_validate_refuses_values_that_cannot_run(monkeypatch, override, message):
    monkeypatch.chdir(REPO)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preflight(load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [override]))


def test_a_component_given_as_an_override_replaces_the_old_one_whole(tmp_path):
    recipe = write(tmp_path, "decoder:\n  _component_: grpo_image.decoders.palette.PaletteDecoder\n  patch_size: 2\n")
    cfg = load_recipe(recipe, ["decoder={_component_: fractions.Fraction, numerator: 3}"])
    assert dict(cfg.decoder) == {"_component_": "fractions.Fraction", "numerator": 3}  # no patch_size left over


def test_validate_warns_in_one_line_when_each_prompt_is_drawn_too_often(monkeypatch, capsys):
    from grpo_image.app.cli import main

    monkeypatch.chdir(REPO)
    assert main(["validate", "recipes/tiny_cpu.yaml", "data.max_passes=10"]) == 0  # a warning, not a refusal
    err = capsys.readouterr().err
    # 120 steps x 8 prompts over the 24 of tiny_colors.jsonl: 40 draws each; 10 passes need 120 x 8 / 10 = 96 prompts
    assert err == ("grpo-image: warning: the run draws each prompt of prompts/tiny_colors.jsonl about 40 times (steps "
                   "120 x data.batch_size 8 / 24 prompts), more than data.max_passes 10: bring 96 prompts or more "
                   "(data.prompts), or lower steps or data.batch_size\n")
    assert main(["validate", "recipes/tiny_cpu.yaml"]) == 0  # the demo allows its 40 passes (its comment says why)
    assert capsys.readouterr().err == ""


def test_a_shipped_recipe_trips_its_own_passes_warning_only_where_its_comment_says_so(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their prompt sets relative to the repository
    warned = {}
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        cfg = load_recipe(path)
        warned[path.stem] = prompt_passes_warning(cfg, len(load_recipe_prompts(cfg.data))) is not None
        assert warned[path.stem] == ("so `validate`" in path.read_text()), path.name  # the data comment's words
    assert not any(warned[name] for name in ("tiny_cpu", "tiny_text_en", "tiny_text_zh"))  # they set data.max_passes
    assert warned["xomni_en_lora"] and warned["janus_pro_7b"]  # 40 and 50 example prompts for 200 x 32 draws
