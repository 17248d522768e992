"""recipes/xomni_en_decoder.yaml (decoder GRPO on X-Omni-En's FLUX decoder) validates and trains one step through the
CLI, its model paths overridden to the tiny X-Omni and the tiny decoder parts saved by X-Omni's own code, in bf16 as
the recipe runs (the policy, as the family recipes' test saves it, and the decoder, X-Omni's vision_config dtype)."""

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

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/xomni_en_decoder.yaml"
PARTS = DATA / "xomni_tiny_decoder_reference"
PROMPTS = [("a shop sign that says OPEN", "OPEN"), ("a poster that reads SALE", "SALE")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, list[str]]:
    """A saved tiny bf16 X-Omni (64 codes, the decoder parts' codebook), a tiny HPS checkpoint, the prompts and their
    en text embeddings; returns the folder and the recipe overrides that point at them."""
    from grpo_image.decoders.xomni_flux import PrecomputedPromptEmbeds, save_prompt_embeds
    from grpo_image.policies.xomni import tiny_xomni_policy

    root = tmp_path_factory.mktemp("xomni_decoder")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "metadata": {"text": t}}) + "\n"
                                                for p, t in PROMPTS))  # fmt: skip
    policy = tiny_xomni_policy(grid=(2, 3), image_vocab_size=64, dtype="bfloat16")
    with torch.no_grad():  # a peaked head, as a trained model's: min-p 0.03 keeps a few of the 64 codes
        policy.model.mm_head.weight.mul_(40.0)
    policy.save_pretrained(root / "xomni")
    hps_model, _, _ = write_tiny_hps(root)
    texts = [p for p, _ in PROMPTS] + [""]
    g = torch.Generator().manual_seed(0)
    table = PrecomputedPromptEmbeds(texts, torch.randn(3, 7, 32, generator=g), torch.randn(3, 32, generator=g))
    save_prompt_embeds(root / "embeds.safetensors", texts[:2], table)
    overrides = [
        f"policy.path={root / 'xomni'}", "policy.height=32", "policy.width=48",
        "decoder.xomni_path=null", "decoder.flux_path=null", f"decoder.projector={PARTS / 'projector.safetensors'}",
        f"decoder.transformer={PARTS / 'transformer_en'}", f"decoder.vae={PARTS / 'vae'}",
        f"decoder.scheduler={PARTS / 'scheduler'}", f"decoder.text_encoder={root / 'embeds.safetensors'}",
        "decoder.num_inference_steps=2", "decoder.cfg_scale=3.0", "decoder.dtype=bfloat16", "decoder.device=cpu",
        f"rewards.0.scorer.checkpoint={root / 'HPS_v2.1_compressed.pt'}", f"rewards.0.scorer.model_name={hps_model}",
        f"data.prompts={root / 'prompts.jsonl'}",
    ]  # fmt: skip
    return root, overrides


def test_the_recipe_validates(assets, monkeypatch, capsys):
    _, overrides = assets
    monkeypatch.chdir(REPO)
    assert main(["validate", RECIPE, *overrides[:-1]]) == 0, capsys.readouterr().err  # its own prompt set
    assert "components checked" in capsys.readouterr().out


@pytest.mark.timeout(900)
def test_one_decoder_step_trains_the_flux_adapters(assets, tmp_path):
    from safetensors.torch import load_file

    _, overrides = assets
    # 2 prompts x 2 code samples x 2 decodes = 8 images; 4 denoising steps hold a window of 2 before the last step
    code = main(["train", str(REPO / RECIPE), *overrides, "steps=1", "data.batch_size=2", "data.group_size=2",
                 "decoder_train.group_size=2", "decoder_train.num_inference_steps=4", "decoder_train.minibatches=1",
                 "sampling.batch_size=0", "workers.backend=inprocess", "logging.num_samples=2", "sample_every=1",
                 "train.logprob_chunk=4", f"output_dir={tmp_path}"])  # fmt: skip
    assert code == 0
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    decoder = {key: value for key, value in row.items() if key.startswith("decoder/")}
    assert decoder and all(v is not None and math.isfinite(v) for v in decoder.values()), decoder
    assert row["decoder/skipped_updates"] == 0
    # on-policy: the training pass runs the rollout's velocity (the same conditioning, the same bf16 transformer
    # calls on the same stored latents), so each window step's log-prob is recomputed by the same kernels and the
    # first minibatch's ratio is exp(0) = 1; allow the float32 rounding of exp and of the mean over 8 x 2 ratios,
    # a few ULPs of 1 (2^-23 each): 1e-6
    assert abs(row["decoder/ratio_mean_first"] - 1) <= 1e-6, row["decoder/ratio_mean_first"]
    saved = load_file(tmp_path / "checkpoints" / "step_000001" / "decoder" / "adapter_model.safetensors")
    lora_b = {name: value for name, value in saved.items() if "lora_B" in name}
    assert lora_b and any(value.abs().max() > 0 for value in lora_b.values())  # B starts at zero: the adapters moved
    assert all("transformer_blocks." in name for name in saved)  # adapters on the blocks only
    assert (tmp_path / "samples" / "step_000001.png").is_file()
