"""The memory plan of decoder GRPO (train.target decoder | both) against what the code allocates and builds.

The adapters are counted from the DiT's module shapes and the family's regex: exactly the parameters that
`add_decoder_lora` creates. One decoder batch's forward and backward (every window step's passes kept for one
backward, as DecoderTrainer.update runs it) is measured on the CPU with the profiler, as tests/test_memory_plan.py
measures the policy's, for a toy GLM-Image DiT with a bf16 base and fp32 adapters (the GPU's precisions), and the
plan's estimate must lie within 15% of it: the per-token terms it counts were within 7% of the measured peak on this
DiT for 1 to 2 decodes, 1 or 2 window steps, with and without guidance, at 261 and 581 tokens (what it leaves out:
the embedders and output head, a few latent-sized tensors), and 15% leaves room for another CPU's kernels.
"""

from __future__ import annotations

import pytest
import torch

from grpo_image.app.cli import main
from grpo_image.base.config import load_recipe
from grpo_image.core.flow_loss import flow_grpo_loss
from grpo_image.core.flow_window import denoise_with_window, window_logprobs
from grpo_image.planning.decoder_sizes import decoder_shape
from grpo_image.planning.decoder_training import lora_params, train_activation_bytes
from grpo_image.planning.memory_plan import plan_recipe
from tests.test_memory_plan import REPO, peak_bytes

PROMPT = 'a sign that says "OPEN"'  # 4 quoted bytes and an end id: 5 glyph tokens
GRID = (8, 8)  # 256 px: 32 x 32 latents, 16 x 16 DiT patches
NODE = "grpo_image.decoders.glm_image.GlmImageDecoder"


def toy_parts() -> dict:
    """A GLM-Image DiT of 2 blocks of 4 heads of 64 (wide enough that per-token terms dominate), a tiny VAE and ByT5
    glyph encoder: the same weights at every call."""
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return dict(
            transformer=GlmImageTransformer2DModel(
                patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=64,
                num_attention_heads=4, text_embed_dim=32, time_embed_dim=32, condition_dim=8,
                prior_vq_quantizer_codebook_size=256).eval(),
            vae=AutoencoderKL(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                              norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
                              up_block_types=("UpDecoderBlock2D",) * 4, latents_mean=[0.0] * 4,
                              latents_std=[1.0] * 4).eval(),
            text_encoder=T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                 num_heads=4, feed_forward_proj="gated-gelu")).eval(),
        )  # fmt: skip


def toy_pipeline():
    """The toy parts as a bf16 pipeline (the GPU's precision: a bf16 base under fp32 adapters)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline
    from transformers import ByT5Tokenizer

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                base_shift=0.25, max_shift=0.75)  # fmt: skip
    return GlmImagePipeline(processor=None, vision_language_encoder=None, tokenizer=ByT5Tokenizer(),
                            scheduler=scheduler, **toy_parts()).to(torch.bfloat16)  # fmt: skip


@pytest.fixture(scope="module")
def toy_dit(tmp_path_factory):
    """The toy parts saved as a GLM-Image folder's transformer/, vae/ and text_encoder/ (what the plan reads)."""
    root = tmp_path_factory.mktemp("toy_dit")
    for name, module in toy_parts().items():
        module.save_pretrained(root / name)
    return root


def test_decoder_adapters_are_counted_exactly(toy_dit):
    from grpo_image.decoders.flow_lora import add_decoder_lora
    from grpo_image.decoders.glm_image_flow import DIT_LORA_TARGETS
    from grpo_image.planning.decoder_sizes import glyph_tokens

    shape = decoder_shape({"_component_": NODE, "path": str(toy_dit)}, GRID, [PROMPT])
    # 2 blocks x (q, k, v, out: 256 -> 256; the MLP's 256 -> 1024 and 1024 -> 256), r (in + out) each
    assert shape.adapted == (((256, 256),) * 4 + ((256, 1024), (1024, 256))) * 2
    assert (shape.blocks, shape.heads, shape.inner, shape.image_tokens) == (2, 4, 256, 256)
    assert shape.tokens == 256 + glyph_tokens([PROMPT]) == 261 and shape.latent_elements == 4 * 32 * 32
    transformer = toy_parts()["transformer"]
    made = add_decoder_lora(transformer, r=8, alpha=16, targets=DIT_LORA_TARGETS)
    assert lora_params(shape, 8) == sum(p.numel() for p in made) == 2 * 8 * (4 * 512 + 2 * 1280)


@pytest.mark.parametrize("rows, guidance, window", [(1, 1.5, 2), (2, 1.0, 1)])
def test_one_decoder_batch_is_within_15_percent_of_the_measured_peak(toy_dit, rows, guidance, window):
    from grpo_image.decoders.glm_image import GlmImageDecoder
    from grpo_image.decoders.flow_lora import add_decoder_lora

    pipe = toy_pipeline()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small calls: extra threads only wait on each other
    try:
        flow = GlmImageDecoder.from_pipeline(pipe, 10, guidance, rows, "cpu").flow()
        params = add_decoder_lora(flow.transformer, r=8, alpha=16, targets=flow.lora_targets)
        codes = torch.randint(0, 256, (rows, GRID[0] * GRID[1]), generator=torch.Generator().manual_seed(0))
        generators = [torch.Generator().manual_seed(i) for i in range(rows)]
        flow.set_timesteps(GRID, 10)
        with torch.no_grad():
            velocity = flow.velocity(codes, GRID, PROMPT, guidance)
            rollout = denoise_with_window(flow.scheduler, velocity, flow.initial_latents(GRID, generators), start=1,
                                          window=window, noise_level=0.7, kind="sde", generators=generators)

        def update():
            logprobs, _, _ = window_logprobs(flow.scheduler, velocity, rollout, noise_level=0.7, kind="sde")  # [m, w]
            loss, _ = flow_grpo_loss(logprobs, rollout.logprobs, torch.ones(rows), clip_range=1e-4, adv_clip=5.0)
            loss.backward()

        update()  # the first backward allocates the adapters' gradients, which the plan holds all run long
        measured = peak_bytes(update)
    finally:
        torch.set_num_threads(threads)
    shape = decoder_shape({"_component_": NODE, "path": str(toy_dit), "dtype": "bfloat16"}, GRID, [PROMPT])
    planned = train_activation_bytes(shape, rows, 8, window, guidance > 1)
    assert params and measured > 16 * 2**20  # large enough that allocator noise is small
    assert planned == pytest.approx(measured, rel=0.15), (planned, measured)


def test_the_plan_moves_the_decoder_from_the_reward_workers_to_the_trainer(toy_dit, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    recipe = "recipes/tiny_cpu.yaml"  # its tiny policy (4 x 4 codes: 128 px through the DiT) and the toy DiT
    overrides = ["decoder={_component_: %s, path: '%s', max_batch_size: 4}" % (NODE, toy_dit), "data.batch_size=4",
                 "data.group_size=2", "decoder_train.group_size=3", "workers.backend=ray", "workers.num_gpus=1"]
    plan = plan_recipe(load_recipe(recipe, overrides), "policy")
    both = plan_recipe(load_recipe(recipe, [*overrides, "train.target=both"]), "both")
    assert any(label.startswith("GLM-Image DiT decoder: one call") for label, _, _ in plan.worker_rows)
    assert plan.decoder_train is None and "decoder update" not in plan.phases
    assert both.worker_rows == []  # the workers score images only (the tiny recipe's rewards hold no GPU model)
    rows = {label: value for label, value, _ in both.rows}
    dt, d = both.decoder_train, both.decoder
    # 16 fp32 bytes per adapter parameter (the adapter, its gradient, two moments) beside the decoder's weights
    assert dt.resident == sum(part.bytes for part in d.parts) + 16 * lora_params(d, 64)
    assert rows["decoder: transformer (GLM-Image DiT)"] == d.parts[0].bytes
    # B*K = 8 code samples on the one process, G = 3 decodes each, window 2: 3 latents of 4 x 16 x 16, and 2 log-probs
    assert rows["decoder window latents (24 decodes x 3 x 1,024, fp32)"] == 24 * (3 * 1024 + 2) * 4
    assert dt.batch == 4  # the decoder's max_batch_size, below a prompt's K*G = 6 decodes
    assert both.phases["decoder update"] == pytest.approx(both.resident + dt.kept + dt.update)
    assert both.phases["update"] == pytest.approx(plan.phases["update"] + dt.resident + dt.kept)
    frozen = plan_recipe(load_recipe(recipe, [*overrides, "train.target=decoder"]), "decoder")
    assert "update" not in frozen.phases and frozen.held["gradients"] > 0  # the policy is frozen: no update phase
    assert frozen.resident == pytest.approx(both.resident - both.held["gradients"] - both.held["optimizer"])
    assert main(["plan", recipe, *overrides, "train.target=both", "--gpus", "1", "--gpu-memory", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "decoder forward+backward of 4 decodes" in out and "DOES NOT FIT" in out
    for key in ("decoder.max_batch_size", "decoder_train.guidance_scale=1", "decoder_train.window=1",
                "decoder_train.lora.r"):
        assert key in out, key
