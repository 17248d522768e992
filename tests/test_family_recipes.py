"""Each real recipe runs one GRPO step through the CLI, its model paths overridden to tiny models of its family.

Same code path as a real run, tiny weights: a saved tiny X-Omni (with the X-Omni tokenizer layout) and the tiny
X-Omni decoder parts saved by X-Omni's own code, a saved tiny Janus-Pro, a tiny HPS checkpoint in the real format,
rapidocr for real, and one chat-completions server on 127.0.0.1 standing in for the UnifiedReward and VLM judges.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from grpo_image.app.cli import main
from grpo_image.base.logging import read_metrics
from tests.data import DATA
from tests.helpers_rewards import write_tiny_hps
from tests.helpers_sampling import assert_on_policy_ratio_within_the_logged_mismatch
from tests.rewards_servers import ChatServer, Reply, completion

REPO = Path(__file__).resolve().parents[1]
DECODER_PARTS = DATA / "xomni_tiny_decoder_reference"
PROMPTS = [("a shop sign that says OPEN", "OPEN"), ("一块写着开业的招牌", "开业")]
PEAKED_HEAD = 40.0
# The recipes' own precision, sampling and minibatch settings at test size: 2 prompts x 4 rollouts = 8 rollouts, so
# the recipes' 8 minibatches hold one rollout each.
ONE_STEP = ["steps=1", "data.batch_size=2", "data.group_size=4", "sample_every=1", "workers.backend=inprocess",
            "workers.prefetch=false", "train.logprob_chunk=4", "logging.num_samples=2", "sampling.batch_size=0",
            "train.micro_batch_size=0"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Every tiny model and file the recipes point at, built once."""
    root = tmp_path_factory.mktemp("family")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "metadata": {"text": t}}, ensure_ascii=False) + "\n"
                               for p, t in PROMPTS))
    from grpo_image.policies.janus import tiny_janus_policy
    from grpo_image.training.weights import LoraWeights
    from grpo_image.policies.xomni import tiny_xomni_policy

    xomni = tiny_xomni_policy(grid=(2, 3), image_vocab_size=64, dtype="bfloat16")  # the decoder parts: 64 codes
    with torch.no_grad():  # a head as peaked as a trained model's: min-p 0.03 keeps a few codes of the 64
        xomni.model.mm_head.weight.mul_(PEAKED_HEAD)
    xomni.save_pretrained(root / "xomni")
    adapter = LoraWeights(tiny_xomni_policy(grid=(2, 3), image_vocab_size=64), r=4, alpha=8, dropout=0.0,
                          target_modules=["q_proj", "v_proj"])
    for name, param in adapter.policy.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # a non-trivial English-stage adapter to continue from
    adapter.save(root / "en_adapter")
    janus = tiny_janus_policy()
    janus.model.to(torch.bfloat16)  # saved in the recipes' dtype, as the real checkpoints are
    janus.save_pretrained(root / "janus")
    hps_model, _, _ = write_tiny_hps(root)
    from grpo_image.decoders.xomni_flux import PrecomputedPromptEmbeds, save_prompt_embeds

    texts = [p for p, _ in PROMPTS] + [""]
    generator = torch.Generator().manual_seed(0)
    table = PrecomputedPromptEmbeds(texts, torch.randn(3, 7, 32, generator=generator), torch.randn(3, 32, generator=generator))
    save_prompt_embeds(root / "embeds.safetensors", texts[:2], table, batch_size=2)
    return root, hps_model


def reply(seen, hit) -> Reply:
    """A judge that gives every image 4 out of 5 and says "Yes" with probability 0.9."""
    return Reply(completion("Final Score: 4", logprobs=[("Yes", math.log(0.9)), ("No", math.log(0.1))]))


def xomni_decoder(root: Path, variant: str) -> list[str]:
    return [
        "decoder.xomni_path=null", "decoder.flux_path=null",
        f"decoder.projector={DECODER_PARTS / 'projector.safetensors'}",
        f"decoder.transformer={DECODER_PARTS / f'transformer_{variant}'}",
        f"decoder.vae={DECODER_PARTS / 'vae'}", f"decoder.scheduler={DECODER_PARTS / 'scheduler'}",
        "decoder.num_inference_steps=2", "decoder.cfg_scale=3.0", "decoder.dtype=float32", "decoder.device=cpu",
        *([f"decoder.text_encoder={root / 'embeds.safetensors'}"] if variant == "en" else []),
    ]


def overrides(recipe: str, root: Path, hps_model: str, url: str) -> list[str]:
    hps = [f"rewards.{{hps}}.scorer.checkpoint={root / 'HPS_v2.1_compressed.pt'}", f"rewards.{{hps}}.scorer.model_name={hps_model}"]
    xomni_policy = [f"policy.path={root / 'xomni'}", "policy.height=32", "policy.width=48"]
    if recipe.startswith("xomni_en"):
        order = {"hps": 0, "unified": 1, "alignment": 2}
        one_process = ["train.fsdp=false", "hardware.gpus=1"] if recipe == "xomni_en_full" else []  # it shards over 8
        return [*xomni_policy, *one_process, *xomni_decoder(root, "en"), *[h.format(**order) for h in hps],
                f"rewards.1.scorer.base_url={url}", f"rewards.2.scorer.base_url={url}"]
    if recipe == "xomni_zh_stage":
        return [*xomni_policy, *xomni_decoder(root, "zh"), f"train.init_from={root / 'en_adapter'}",
                *[h.format(hps=1) for h in hps], f"rewards.2.scorer.base_url={url}"]
    return [f"policy.path={root / 'janus'}", f"decoder.path_or_model={root / 'janus'}",
            *[h.format(hps=0) for h in hps], f"rewards.1.scorer.base_url={url}"]


FAMILY_RECIPES = ["xomni_en_lora", "xomni_en_full", "xomni_zh_stage", "janus_pro_7b"]
VALIDATED_ELSEWHERE = {"glm_image_lora", "glm_image_full", "glm_image_decoupled", "tiny_text_en", "tiny_text_zh",
                       "xomni_en_decoder", "tiny_decoder_cpu"}  # by their own tests (test_glm_image, test_decoder_demo)


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("recipe", FAMILY_RECIPES)

def test_family_recipe_runs_one_step_on_tiny_models(assets, tmp_path, recipe, mode):
    root, hps_model = assets
    with ChatServer(reply) as server:
        code = main(["train", str(REPO / "recipes" / f"{recipe}.yaml"), *ONE_STEP, f"train.mode={mode}",
                     f"data.prompts={root / 'prompts.jsonl'}", f"output_dir={tmp_path}",
                     *overrides(recipe, root, hps_model, server.base_url)])
    assert code == 0
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    for key, value in row.items():
        if key.startswith(("reward/", "train/", "adv/")) and not key.endswith(("/nan", "/std")):
            assert value is not None and math.isfinite(value), (key, row)
    # before the first update the policy is its reference, bit for bit: the base with a zero adapter, the English
    # stage's adapter attached frozen under the new one (xomni_zh_stage), or the reference copy of the fp32 masters
    assert row["train/kl_first"] == 0.0, row["train/kl_first"]
    if "reward/unified/mean" in row:
        assert row["reward/unified/mean"] == pytest.approx(0.8)  # "Final Score: 4" / 5, a float32 mean: rel 1e-6
    if "reward/alignment/mean" in row:
        assert row["reward/alignment/mean"] == pytest.approx(0.9, abs=1e-6)  # P("Yes") = exp(log 0.9), float32
    assert (tmp_path / "samples" / "step_000001.png").is_file()
    saved = tmp_path / "checkpoints" / "step_000001" / "policy"
    assert (saved / ("adapter_model.safetensors" if mode == "lora" else ".metadata")).is_file()


@pytest.mark.timeout(900)
def test_xomni_lora_recipe_trains_in_bf16_with_its_own_settings(assets, tmp_path):
    """xomni_en_lora.yaml as shipped (bf16, min-p 0.03, temperature 1, 8 minibatches, clip 0.2 / 0.28, KL 0.01) on
    the peaked tiny X-Omni, 3 steps at an lr that moves the policy: no update is skipped, every KL is finite and each
    step's first minibatch, which is on-policy, has a ratio of 1."""
    root, hps_model = assets
    with ChatServer(reply) as server:
        code = main(["train", str(REPO / "recipes" / "xomni_en_lora.yaml"), *ONE_STEP, "steps=3", "train.lr=2e-2",
                     "sample_every=0", f"data.prompts={root / 'prompts.jsonl'}", f"output_dir={tmp_path}",
                     *overrides("xomni_en_lora", root, hps_model, server.base_url)])
    assert code == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["train/skipped_updates"] for row in rows] == [0, 0, 0]
    for row in rows:
        assert row["train/kl"] is not None and math.isfinite(row["train/kl"])
        assert_on_policy_ratio_within_the_logged_mismatch(row)
    assert rows[-1]["train/kl"] > 1e-6  # the policy moved away from its reference
    assert rows[-1]["train/clip_frac"] is not None


def test_sample_and_eval_decode_x_omni_en_with_its_prompts(assets, tmp_path):
    """X-Omni's English decoder is conditioned on the prompt: `sample` and `eval` pass it as the workers do."""
    root, hps_model = assets
    recipe = str(REPO / "recipes" / "xomni_en_lora.yaml")
    with ChatServer(reply) as server:
        extra = overrides("xomni_en_lora", root, hps_model, server.base_url)
        assert main(["sample", recipe, *extra, "--prompts", str(root / "prompts.jsonl"), "--n", "2",
                     "--out", str(tmp_path / "samples")]) == 0
        assert main(["eval", recipe, *extra, "--prompts", str(root / "prompts.jsonl"), "--n", "1",
                     "--rewards", "unified", "--out", str(tmp_path / "eval")]) == 0
    images = sorted(path.name for path in (tmp_path / "samples").glob("*.png"))
    assert images == ["0000_1.png", "0000_2.png", "0001_1.png", "0001_2.png"]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["summary"]["model"]["reward/unified"]["mean"] == pytest.approx(0.8)  # 4 / 5 in float32: rel 1e-6


def test_every_recipe_validates_with_its_own_prompt_set(assets, monkeypatch, capsys):
    """`grpo-image validate` on every recipe in recipes/, model paths pointed at the tiny models."""
    root, hps_model = assets
    monkeypatch.chdir(REPO)  # recipes name their prompt sets relative to the repository
    recipes = {path.stem for path in (REPO / "recipes").glob("*.yaml")}
    assert recipes == {"tiny_cpu", *FAMILY_RECIPES, *VALIDATED_ELSEWHERE}  # update when a recipe is added
    for recipe in sorted(recipes - VALIDATED_ELSEWHERE):
        extra = [] if recipe == "tiny_cpu" else overrides(recipe, root, hps_model, "http://127.0.0.1:9/v1")
        assert main(["validate", f"recipes/{recipe}.yaml", *extra]) == 0, capsys.readouterr().err
        assert "components checked" in capsys.readouterr().out
