"""X-Omni's FLUX decoder as decoder GRPO's velocity field: `sample_xomni_flux`'s own denoising, step for step.

Tiny fp32 parts (the reference folder's projector, transformers, VAE and scheduler, as tests/test_xomni_decoder.py
builds them), the en variant's text conditioning from the stand-in embeddings of that test.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tests.helpers_flow import assert_one_update_raises_the_window
from grpo_image.core.flow_window import denoise_with_window, window_logprobs
from grpo_image.decoders.flow_lora import add_decoder_lora
from grpo_image.decoders.xomni_flux import PrecomputedPromptEmbeds, XOmniFluxDecoder, sample_xomni_flux
from grpo_image.decoders.xomni_flux_flow import XOmniFluxFlow
from tests.test_xomni_decoder import GRID, PROMPT, REF, en_pipe_text

STEPS, CFG = 4, 3.0  # 4 steps: a window of 2 fits before the last one; CFG 3.0, the reference run's scale

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: see conftest.py


def make_decoder(variant: str) -> XOmniFluxDecoder:
    text = PrecomputedPromptEmbeds([PROMPT, ""], *en_pipe_text()) if variant == "en" else None
    return XOmniFluxDecoder(projector=str(REF / "projector.safetensors"),
                            transformer=str(REF / f"transformer_{variant}"), vae=str(REF / "vae"),
                            scheduler=str(REF / "scheduler"), text_encoder=text, num_inference_steps=2,
                            cfg_scale=CFG, dtype="float32", device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def decoders() -> dict[str, XOmniFluxDecoder]:
    return {"en": make_decoder("en"), "zh": make_decoder("zh")}


def codes(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (rows, GRID[0] * GRID[1]), generator=torch.Generator().manual_seed(seed))  # [m, 15]


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def sampled(decoder: XOmniFluxDecoder, rows: torch.Tensor, latents: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """What `XOmniFluxDecoder.denoise` runs, with STEPS steps and the given CFG scale: final latents [m, L, C]."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    with torch.no_grad():
        features = decoder.projector(rows, GRID)  # [m, L, z]
    img_ids = FluxPipeline._prepare_latent_image_ids(1, *GRID, decoder.device, decoder.dtype)  # [L, 3]
    text = decoder.encode_prompts([PROMPT] * len(rows)) if decoder.needs_prompts else None
    return sample_xomni_flux(decoder.transformer, decoder.scheduler, latents.clone(), features, img_ids, STEPS,
                             cfg_scale, decoder.guidance_scale, text)  # fmt: skip


@pytest.mark.parametrize("variant, guidance", [("en", CFG), ("zh", CFG), ("en", 1.0)])
def test_the_windowed_loop_at_noise_0_is_sample_xomni_flux(decoders, variant, guidance):
    decoder = decoders[variant]
    rows, latents = codes(2), decoder.initial_latents([1, 2], GRID)  # [2, 15], fp32 [2, 15, 16]
    want = sampled(decoder, rows, latents, guidance)  # [2, 15, 16]
    flow = decoder.flow()
    flow.set_timesteps(GRID, STEPS)
    velocity = flow.velocity(rows, GRID, PROMPT, guidance)
    got = denoise_with_window(flow.scheduler, velocity, latents, start=1, window=2, noise_level=0.0, kind="sde",
                              generators=generators(3, 4)).final  # fmt: skip
    if guidance != 1:
        assert torch.equal(got, want)  # the same batched calls, the same CFG mix, the same Euler steps, in order
        return
    # At scale 1 the sampler still runs [cond; uncond] (2m rows) and mixes u + 1 (c - u); the flow runs the m
    # conditional rows alone. Each step's velocity then differs by the mix's two roundings, |u + (c - u) - c| <=
    # 2 u32 max(|c|, |u|) (u32 = 2^-24), plus whatever the 2m-row matmuls round differently from the m-row ones
    # (a few u32 relative each, the same order). The Euler steps sum |dt| = 1 of these, and each later velocity
    # carries the earlier latents' difference through the transformer (a Lipschitz factor of order 1 to 10 for
    # these tiny random blocks, 4 steps). So bound by 1e3 u32 times the largest velocity seen, with |v| <= 10 here
    # (checked below): about 6e-4 (observed 4.8e-7), while a wrong conditioning row or a dropped step moves the
    # latents by O(1).
    speeds = velocity(latents, flow.scheduler.timesteps[:1].expand(2)).abs().max()
    assert speeds <= 10
    assert (got - want).abs().max() <= 1e3 * 2**-24 * 10, (got - want).abs().max()


def test_the_training_pass_recomputes_the_guided_windows_logprobs_with_grad():
    decoder = make_decoder("en")
    decoder.transformer.requires_grad_(True)  # loaded frozen; here every weight may take a gradient,
    decoder.projector.requires_grad_(True)  # the projector's included, to show the conditioning holds none
    flow = decoder.flow()
    flow.set_timesteps(GRID, STEPS)
    velocity = flow.velocity(codes(2, seed=1), GRID, PROMPT, None)  # None: the decoder's cfg_scale
    assert velocity.cfg_scale == CFG
    latents = flow.initial_latents(GRID, generators(5, 6))  # fp32 [2, 15, 16]
    rollout = denoise_with_window(flow.scheduler, velocity, latents, start=0, window=2, noise_level=0.7, kind="sde",
                                  generators=generators(7, 8))  # fmt: skip
    logprobs, _, _ = window_logprobs(flow.scheduler, velocity, rollout, noise_level=0.7, kind="sde")  # [2, 2]
    assert torch.equal(logprobs.detach(), rollout.logprobs)  # guidance recomputed in training equals sampling's
    logprobs.sum().backward()
    grads = [p.grad for p in decoder.transformer.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in decoder.projector.parameters())  # the conditioning is computed without grad


def test_a_lora_update_on_a_positive_advantage_raises_its_window_and_moves_only_the_adapters():
    decoder = make_decoder("en")
    flow = decoder.flow()
    adapters = add_decoder_lora(flow.transformer, r=4, alpha=8, targets=XOmniFluxFlow.lora_targets)
    names = {n for n, p in flow.transformer.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n for n in names) and len(adapters) == len(names)
    with torch.no_grad():
        for name, param in flow.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02, generator=torch.Generator().manual_seed(5))  # a trained-looking adapter
    flow.set_timesteps(GRID, STEPS)
    velocity = flow.velocity(codes(1, seed=2), GRID, PROMPT, None)
    latents = flow.initial_latents(GRID, generators(9))
    rollout = denoise_with_window(flow.scheduler, velocity, latents, start=0, window=2, noise_level=0.7, kind="sde",
                                  generators=generators(10))  # fmt: skip
    assert_one_update_raises_the_window(flow.scheduler, velocity, rollout, flow.transformer, adapters, names)


# every projection of the blocks' attention and MLPs; not the embedders, modulations, feature entry or output head
PROJECTION = re.compile(r"(single_)?transformer_blocks\.\d+\."
                        r"(attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2)"
                        r"|proj_mlp|proj_out)")
NOT_ADAPTED = re.compile(r"(^|\.)(time_text_embed|x_embedder|context_embedder|siglip_embed|norm\w*|norm_out)(\.|$)"
                         r"|^proj_out$")


@pytest.mark.parametrize("variant, double, single", [("en", 12, 5), ("zh", 6, 5)])
def test_the_adapted_modules_are_the_blocks_attention_and_mlp_projections(variant, double, single):
    decoder = make_decoder(variant)
    add_decoder_lora(decoder.transformer, r=4, alpha=8, targets=XOmniFluxFlow.lora_targets)
    adapted = sorted({n.split(".lora_")[0] for n, _ in decoder.transformer.named_parameters() if ".lora_" in n})
    assert all(PROJECTION.fullmatch(n) and not NOT_ADAPTED.search(n) for n in adapted), adapted
    # en double block: q, k, v, out and add_q, add_k, add_v, add_out, ff and ff_context (2 Linears each) = 12;
    # zh's image-only double block: q, k, v, out, ff = 6; a single block: q, k, v, proj_mlp, proj_out = 5
    config = decoder.transformer.config
    assert len(adapted) == double * config.num_layers + single * config.num_single_layers
    linears = {n for n, m in decoder.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    missed = {n for n in linears if PROJECTION.fullmatch(n)} - set(adapted)
    assert not missed  # no projection of a block is left out


def test_to_images_of_the_ode_latents_is_the_decoders_own_decode(decoders):
    decoder = decoders["en"]
    rows, seeds = codes(2, seed=3), np.array([21, 22])
    flow = decoder.flow()
    flow.set_timesteps(GRID, decoder.num_inference_steps)
    latents = flow.initial_latents(GRID, generators(*seeds.tolist()))  # the decoder's seeds, its generators
    final = denoise_with_window(flow.scheduler, flow.velocity(rows, GRID, PROMPT, None), latents, start=0, window=1,
                                noise_level=0.0, kind="sde", generators=generators(0, 0)).final  # fmt: skip
    images = flow.to_images(final, GRID)  # uint8 [2, 48, 80, 3]
    assert images.dtype == np.uint8 and images.shape == (2, 48, 80, 3)
    assert np.array_equal(images, decoder(rows.numpy(), GRID, seeds, prompts=[PROMPT] * 2))
