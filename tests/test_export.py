"""`grpo-image export`: each family's trained model back in the family's own format, loaded by the family's code.

For X-Omni, GLM-Image, Janus-Pro and a causal LM, a tiny model saved in its family's own layout is the source
(`policy.path`); a run of 2 steps in the recipes' precision (bf16, min-p 0.03, two minibatches) trains it, with LoRA
and with full weights. The export is then loaded in a process of its own by the family's own classes only
(tests/own_classes.py; X-Omni's own code needs transformers 4.51.3 and its remote code, so its export is checked
against the folder X-Omni's class saved, tensor by tensor and key by key, and read by the native class proved
equal to X-Omni's code in test_xomni_policy.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from grpo_image.app.cli import main
from grpo_image.export.export import export
from grpo_image.export.source_folders import ExportError
from grpo_image.policies.xomni import build_tiny_xomni_tokenizer
from grpo_image.training.saved_weights import base_model, load_stages
from tests.data import DATA
from grpo_image.decoders.tiny_glm_image import tiny_dit_parts
from tests.helpers_sampling import logprob_tolerance, roundings_to_a_logit
from tests.helpers_stages import small_update
from tests.own_classes import image_code_logits

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: see conftest.py

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["causal_lm", "xomni", "janus", "glm_image"]
MODES = ["lora", "full"]
PROMPT = "a red square"


def palette(n: int) -> list[str]:
    """n distinct '#RRGGBB' colours for the palette decoder, one per code."""
    return [f"#{(37 * i) % 256:02x}{(91 * i) % 256:02x}{(173 * i) % 256:02x}" for i in range(n)]


def write_sources(root: Path) -> dict[str, dict]:
    """Each family's tiny model saved in its own layout, and the recipe nodes that load it."""
    from transformers import JanusImageProcessor, JanusProcessor

    from grpo_image.policies.glm_image import tiny_glm_image_policy
    from grpo_image.policies.janus import tiny_janus_policy
    from grpo_image.policies.tiny import code_range, tiny_policy

    sources = {}
    causal = tiny_policy(num_codes=16, grid=(2, 2), hidden_size=32, num_layers=2, seed=0)
    causal.save_pretrained(root / "causal_lm")
    offset, _ = code_range(causal.tokenizer)
    sources["causal_lm"] = dict(
        policy={"_component_": "grpo_image.policies.causal_lm.causal_lm_policy", "path": str(root / "causal_lm"),
                "image_token_offset": offset, "num_codes": 16, "grid": [2, 2], "dtype": "bfloat16"},
        decoder={"_component_": "grpo_image.decoders.palette.PaletteDecoder", "patch_size": 4},
        offset=offset, codes=16)
    xomni = root / "xomni"  # the folder X-Omni's own class saved, its extra files included, with X-Omni's tokenizer
    shutil.copytree(DATA / "xomni_tiny_reference", xomni)
    build_tiny_xomni_tokenizer(512, 64, 80).save_pretrained(xomni)
    sources["xomni"] = dict(
        policy={"_component_": "grpo_image.policies.xomni.xomni_policy", "path": str(xomni), "height": 32,
                "width": 32, "dtype": "bfloat16"},
        decoder={"_component_": "grpo_image.decoders.palette.PaletteDecoder", "patch_size": 4, "colors": palette(64)},
        offset=512, codes=64)
    janus = tiny_janus_policy()
    janus.model.to(torch.bfloat16)  # as the real checkpoints are stored
    janus.model.save_pretrained(root / "janus")
    JanusProcessor(image_processor=JanusImageProcessor(), tokenizer=janus.tokenizer,
                   num_image_tokens=16).save_pretrained(root / "janus")
    sources["janus"] = dict(
        policy={"_component_": "grpo_image.policies.janus.janus_policy", "path": str(root / "janus"),
                "dtype": "bfloat16"},
        decoder={"_component_": "grpo_image.decoders.palette.PaletteDecoder", "patch_size": 2, "colors": palette(32)},
        offset=janus.image_token_offset, codes=32)
    glm = tiny_glm_image_policy()
    from diffusers import GlmImagePipeline

    pipe = GlmImagePipeline(processor=glm.processor, vision_language_encoder=glm.model.to(torch.bfloat16),
                            **tiny_dit_parts(glm.num_codes))
    pipe.save_pretrained(root / "glm_image")
    sources["glm_image"] = dict(
        policy={"_component_": "grpo_image.policies.glm_image.glm_image_policy", "path": str(root / "glm_image"),
                "height": 64, "width": 96, "dtype": "bfloat16"},
        decoder={"_component_": "grpo_image.decoders.glm_image.GlmImageDecoder", "path": str(root / "glm_image"),
                 "num_inference_steps": 1, "dtype": "float32", "device": "cpu"},
        offset=0, codes=glm.num_codes)
    return sources


def write_recipe(root: Path, family: str, source: dict, mode: str) -> Path:
    """tiny_cpu.yaml with the family's policy and decoder: 2 steps of 2 prompts x 2 rollouts, two minibatches."""
    cfg = OmegaConf.load(REPO / "recipes" / "tiny_cpu.yaml")
    cfg.policy, cfg.decoder = source["policy"], source["decoder"]
    cfg.steps, cfg.save_every, cfg.sample_every, cfg.output_dir = 2, 2, 0, str(root / "runs" / f"{family}_{mode}")
    cfg.data.batch_size, cfg.data.group_size = 2, 2
    cfg.sampling = {"min_p": 0.03}  # the real recipes' filter
    cfg.train.mode, cfg.train.minibatches, cfg.train.lr = mode, 2, 1e-2
    if family == "glm_image":
        cfg.train.lora = {"target_regex": r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.down_proj)"}
    path = root / f"{family}_{mode}.yaml"
    OmegaConf.save(cfg, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every (family, mode): its source, its run folder, its recipe."""
    root = tmp_path_factory.mktemp("export")
    sources = write_sources(root)
    runs = {}
    for family in FAMILIES:
        for mode in MODES:
            recipe = write_recipe(root, family, sources[family], mode)
            assert main(["train", str(recipe)]) == 0, (family, mode)
            runs[family, mode] = root / "runs" / f"{family}_{mode}"
    return root, sources, runs


@pytest.fixture(scope="module")
def exports(trained):
    """Every run exported in float32 and bfloat16, and the own classes' logits of each, from one other process."""
    root, sources, runs = trained
    out, requests = root / "exports", []
    for (family, mode), run in runs.items():
        for dtype in ("float32", "bfloat16"):
            assert main(["export", str(run), "--out", str(out / f"{family}_{mode}_{dtype}"), "--dtype", dtype]) == 0
        if family != "xomni":
            ids = prompt_ids(run, sources[family])
            requests.append({"key": f"{family}_{mode}", "family": family, "folder": str(out / f"{family}_{mode}_float32"),
                             "ids": ids, "offset": sources[family]["offset"], "codes": sources[family]["codes"]})
    (root / "requests.json").write_text(json.dumps(requests))
    done = subprocess.run([sys.executable, str(REPO / "tests" / "own_classes.py"), str(root / "requests.json"),
                           str(root / "own.safetensors")], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, load_file(root / "own.safetensors")


def trained_policy(run: Path, dtype: str = "float32"):
    """The run's policy as sample and eval load it (adapters attached, not merged), its base in `dtype`."""
    from grpo_image.base.config import instantiate

    cfg = OmegaConf.load(run / "config.yaml")
    cfg.policy.dtype = dtype
    policy = instantiate(cfg.policy)
    load_stages(policy, run / "checkpoints" / "step_000002", merge=False)
    return policy.model.eval(), policy


def prompt_ids(run: Path, source: dict) -> list[int]:
    """A prompt row, and a few codes after it where codes are ids of the language model's own vocabulary (Janus
    embeds codes apart, GLM-Image places them on its 3-axis grid: their prompt alone)."""
    _, policy = trained_policy(run)
    codes = [3, 0, 7, 1] if "causal_lm" in run.name or "xomni" in run.name else []
    return policy.encode([PROMPT])[0] + [source["offset"] + c for c in codes]


def attached_tolerance(model, tokens: int, max_logit: float) -> float:
    """The merged export against the adapters attached: W x + s B (A x) and (W + s B A) x sum in other orders, the
    roundings of fp32 sums in other orders (helpers_sampling.logprob_tolerance) along the decoder to a logit."""
    config = getattr(model.config, "text_config", None) or model.config
    roundings = roundings_to_a_logit(layers=config.num_hidden_layers, hidden=config.hidden_size,
                                     intermediate=config.intermediate_size,
                                     head_dim=config.hidden_size // config.num_attention_heads, tokens=tokens)
    return logprob_tolerance(roundings, max_logit)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["causal_lm", "janus", "glm_image"])
def test_the_export_loads_in_the_familys_own_classes_and_computes_the_trained_logits(trained, exports, family, mode):
    _, sources, runs = trained
    _, own = exports
    model, _ = trained_policy(runs[family, mode])
    ids = torch.tensor([prompt_ids(runs[family, mode], sources[family])])
    want = image_code_logits(family, base_model(model), ids, sources[family]["offset"], sources[family]["codes"])
    got = own[f"{family}_{mode}"]
    assert got.shape == want.shape
    tolerance = attached_tolerance(base_model(model), ids.shape[1], want.abs().max().item())
    assert (got - want).abs().max().item() <= tolerance, ((got - want).abs().max().item(), tolerance)
    if mode == "lora":  # the adapter did move the logits the export reproduces
        with model.disable_adapter():
            before = image_code_logits(family, base_model(model), ids, sources[family]["offset"],
                                       sources[family]["codes"])
        assert (want - before).abs().max().item() > 100 * tolerance


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_bf16_export_is_the_fp32_export_rounded_once(exports, family, mode):
    out, _ = exports
    folder = {"glm_image": "vision_language_encoder"}.get(family, "")
    full, half = (load_file(out / f"{family}_{mode}_{d}" / folder / "model.safetensors") for d in ("float32", "bfloat16"))
    assert full.keys() == half.keys()
    for name, value in full.items():
        assert value.dtype == torch.float32 and torch.equal(half[name], value.to(torch.bfloat16)), name


@pytest.mark.parametrize("mode", MODES)
def test_the_xomni_export_is_the_folder_xomnis_class_saved_with_the_trained_weights(trained, exports, mode):
    root, sources, runs = trained
    out, _ = exports
    source, export_dir = root / "xomni", out / f"xomni_{mode}_float32"
    files = lambda folder: sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())  # noqa: E731
    assert files(export_dir) == sorted([*files(source), "reward_curve.png"])  # README.md is the model card now
    assert (export_dir / "reference.safetensors").read_bytes() == (source / "reference.safetensors").read_bytes()
    ours, theirs = (json.loads((f / "config.json").read_text()) for f in (export_dir, source))
    assert ours == theirs  # rope_theta 1e6 at the top level, torch_dtype float32, X-Omni's own keys and values
    assert ours["rope_theta"] == 1e6 and "rope_parameters" not in ours
    with safe_open(source / "model.safetensors", "pt") as a, safe_open(export_dir / "model.safetensors", "pt") as b:
        assert list(a.keys()) == list(b.keys()) or sorted(a.keys()) == sorted(b.keys())
        for name in a.keys():
            assert a.get_slice(name).get_shape() == b.get_slice(name).get_shape(), name
            assert a.get_slice(name).get_dtype() == b.get_slice(name).get_dtype(), name
    from grpo_image.policies.xomni_model import XOmniForCausalLM

    exported = XOmniForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    model, _ = trained_policy(runs["xomni", mode])
    ids = torch.tensor([prompt_ids(runs["xomni", mode], sources["xomni"])])
    with torch.no_grad():
        want = base_model(model).image_logits(base_model(model).model(input_ids=ids).last_hidden_state)[0]  # [T, 64]
        got = exported.image_logits(exported.model(input_ids=ids).last_hidden_state)[0]
    tolerance = attached_tolerance(exported, ids.shape[1], want.abs().max().item())
    assert (got - want).abs().max().item() <= tolerance


def test_the_glm_image_export_runs_in_its_pipeline(exports):
    from diffusers import GlmImagePipeline

    out, _ = exports
    pipe = GlmImagePipeline.from_pretrained(out / "glm_image_lora_float32", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prior = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(0))  # the 2 x 3 grid upsampled
    image = pipe(prompt=PROMPT, prior_token_ids=prior, height=64, width=96, num_inference_steps=1,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 96, 3) and torch.isfinite(torch.as_tensor(image)).all()


def test_the_model_card_states_the_run(trained, exports):
    _, _, runs = trained
    out, _ = exports
    card = (out / "janus_lora_bfloat16" / "README.md").read_text()
    import hashlib

    recipe_hash = hashlib.sha256((runs["janus", "lora"] / "checkpoints" / "step_000002" / "config.yaml").read_bytes())
    assert recipe_hash.hexdigest() in card and "| steps | 2 |" in card and "LoRA r 16, alpha 32" in card
    assert "| total |" in card and "![reward curve](reward_curve.png)" in card and "hf upload" in card
    assert (out / "janus_lora_bfloat16" / "reward_curve.png").stat().st_size > 1000
    xomni_card = (out / "xomni_full_float32" / "README.md").read_text()
    assert "FLUX.1 [dev] Non-Commercial License" in xomni_card


def test_peft_format_writes_the_adapter_with_its_base_and_link_links(trained, tmp_path):
    root, _, runs = trained
    out = tmp_path / "adapter"
    assert main(["export", str(runs["causal_lm", "lora"]), "--out", str(out), "--format", "peft"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((root / "causal_lm").resolve())
    saved = runs["causal_lm", "lora"] / "checkpoints" / "step_000002" / "policy" / "adapter_model.safetensors"
    assert (out / "adapter_model.safetensors").read_bytes() == saved.read_bytes()
    linked = tmp_path / "linked"
    export(runs["glm_image", "full"], linked, link=True, progress=lambda line: None)
    vae = next((linked / "vae").glob("*.safetensors"))
    assert vae.stat().st_ino == next((root / "glm_image" / "vae").glob("*.safetensors")).stat().st_ino


def test_bad_input_is_refused_in_one_line_and_nothing_is_written(trained, tmp_path, capsys):
    root, _, runs = trained
    run = runs["causal_lm", "full"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    moved = tmp_path / "moved_run"
    shutil.copytree(runs["janus", "full"], moved)
    config = OmegaConf.load(moved / "checkpoints" / "step_000002" / "config.yaml")
    config.policy.path = str(root / "causal_lm")  # another model's folder
    OmegaConf.save(config, moved / "checkpoints" / "step_000002" / "config.yaml")
    missing = tmp_path / "missing_run"
    shutil.copytree(runs["janus", "full"], missing)
    config.policy.path = str(tmp_path / "gone")
    OmegaConf.save(config, missing / "checkpoints" / "step_000002" / "config.yaml")
    cases = {
        "not an empty folder": [str(run), "--out", str(taken)],
        "is not Janus-Pro's 'janus'": [str(moved / "checkpoints" / "step_000002"), "--out", str(tmp_path / "a")],
        "policy.path is not there": [str(missing / "checkpoints" / "step_000002"), "--out", str(tmp_path / "b")],
        "checkpoint not found": [str(tmp_path / "nothing"), "--out", str(tmp_path / "c")],
        "holds full weights": [str(run), "--out", str(tmp_path / "d"), "--format", "peft"],
    }
    for reason, args in cases.items():
        capsys.readouterr()
        assert main(["export", *args]) == 2, reason
        err = capsys.readouterr().err
        assert reason in err and err.count("\n") == 1, (reason, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["missing_run", "moved_run", "taken"]
    moved_source = [str(missing / "checkpoints" / "step_000002"), "--out", str(tmp_path / "b"),
                    "--source", str(root / "janus")]  # the folder the run trained from, at its new place
    assert main(["export", *moved_source]) == 0 and (tmp_path / "b" / "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "b")
    assert [p.name for p in taken.iterdir()] == ["file"]
    unknown = tmp_path / "unknown_run"
    shutil.copytree(runs["causal_lm", "full"], unknown)
    config = OmegaConf.load(unknown / "checkpoints" / "step_000002" / "config.yaml")
    config.policy._component_ = "grpo_image.decoders.palette.PaletteDecoder"  # builds no policy of a known family
    OmegaConf.save(config, unknown / "checkpoints" / "step_000002" / "config.yaml")
    with pytest.raises(ExportError, match="unknown model family"):
        export(unknown / "checkpoints" / "step_000002", tmp_path / "e", progress=lambda line: None)
    assert not (tmp_path / "e").exists() and not (tmp_path / ".e.partial").exists()


def test_an_rl_sized_update_survives_the_fp32_export_whole(trained, tmp_path):
    """An adapter that moves each weight by 1e-5 of its size (a few hundred RL steps at LoRA learning rates): merged
    in fp32 into the source's own weights, all of it is in the export, up to fp32's rounding of W + delta."""
    from grpo_image.base.config import instantiate
    from grpo_image.training.weights import make_weights

    root, _, runs = trained
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    shutil.copytree(runs["causal_lm", "lora"] / "checkpoints" / "step_000002", checkpoint)
    cfg = OmegaConf.load(checkpoint / "config.yaml")
    weights = make_weights(instantiate(cfg.policy), cfg.train)
    small_update(weights, seed=3, relative=1e-5)
    weights.save(checkpoint / "policy")
    export(checkpoint, tmp_path / "out", dtype="float32", progress=lambda line: None)
    name = "model.layers.0.self_attn.q_proj"
    module = weights.policy.model.base_model.model.get_submodule(name)
    delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight  # [out, in]
    source = load_file(root / "causal_lm" / "model.safetensors")[f"{name}.weight"]  # fp32, as tiny_policy saved it
    got = load_file(tmp_path / "out" / "model.safetensors")[f"{name}.weight"]
    # fp32 rounding of W + delta: half an fp32 ULP of W, 6e-8 of W, is 6e-3 of a 1e-5 update
    assert (got - (source + delta)).norm() <= 1e-2 * delta.norm()
    kept = (got - source).flatten() @ delta.flatten() / delta.norm() ** 2
    assert abs(kept - 1) <= 1e-2, kept


def test_a_sharded_source_exports_into_shards_with_an_index(trained, exports, tmp_path):
    """A source in shards (as the real checkpoints are) and an export in shards of at most 100 kB: the same tensors
    as the single-file export, and transformers reads them through the index."""
    from transformers import AutoModelForCausalLM

    root, _, runs = trained
    out, _ = exports
    sharded = tmp_path / "causal_lm_sharded"
    AutoModelForCausalLM.from_pretrained(root / "causal_lm").save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(root / "causal_lm" / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    shutil.copytree(runs["causal_lm", "lora"] / "checkpoints" / "step_000002", checkpoint)
    config = OmegaConf.load(checkpoint / "config.yaml")
    config.policy.path = str(sharded)
    OmegaConf.save(config, checkpoint / "config.yaml")
    export(checkpoint, tmp_path / "out", dtype="float32", max_shard_size="100KB", progress=lambda line: None)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "out" / shard).is_file() for shard in shards)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    whole = load_file(out / "causal_lm_lora_float32" / "model.safetensors")
    parts = {name: value for shard in shards for name, value in load_file(tmp_path / "out" / shard).items()}
    assert parts.keys() == whole.keys() and all(torch.equal(parts[k], whole[k]) for k in whole)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in whole.items())
