"""GLM-Image's DiT as decoder GRPO's velocity field: the pipeline's own denoising, step for step."""

from __future__ import annotations

import pytest
import torch

from grpo_image.core.flow_window import denoise_with_window, window_logprobs
from grpo_image.decoders.glm_image_flow import GlmImageVelocity, pipeline_timesteps
from grpo_image.decoders.tiny_glm_image import tiny_dit_parts
from tests.helpers_flow import assert_one_update_raises_the_window

HEIGHT, WIDTH, STEPS, CODES = 64, 96, 4, 64
PROMPT = 'a sign that reads "OPEN"'


@pytest.fixture(scope="module")
def pipe():
    from diffusers import GlmImagePipeline

    made = GlmImagePipeline(processor=None, vision_language_encoder=None, **tiny_dit_parts(CODES))
    made.set_progress_bar_config(disable=True)
    return made


def prior(rows: int) -> torch.Tensor:
    return torch.randint(0, CODES, (rows, 24), generator=torch.Generator().manual_seed(0))  # [n, 2 x 3 x 4]


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_the_windowed_loop_at_noise_0_is_the_pipelines_denoising(pipe, guidance):
    rows = 2
    latents = torch.randn(rows, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(1))
    want = pipe(prompt=[PROMPT] * rows, prior_token_ids=prior(rows), height=HEIGHT, width=WIDTH,
                num_inference_steps=STEPS, guidance_scale=guidance, latents=latents.clone(),
                output_type="latent").images  # as GlmImageDecoder calls it: one prompt per rollout
    pipeline_timesteps(pipe, HEIGHT, WIDTH, STEPS)
    velocity = GlmImageVelocity(pipe, PROMPT, prior(rows), HEIGHT, WIDTH, guidance)
    got = denoise_with_window(pipe.scheduler, velocity, latents, start=1, window=1, noise_level=0.0, kind="sde",
                              generators=[torch.Generator().manual_seed(s) for s in range(rows)])
    assert torch.equal(got.final, want.float())  # the same DiT calls, the same Euler steps, in the same order


def test_the_training_pass_recomputes_the_guided_windows_logprobs_with_grad(pipe):
    rows = 2
    latents = torch.randn(rows, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(2))
    pipeline_timesteps(pipe, HEIGHT, WIDTH, STEPS)
    velocity = GlmImageVelocity(pipe, PROMPT, prior(rows), HEIGHT, WIDTH, 1.5)
    rollout = denoise_with_window(pipe.scheduler, velocity, latents, start=0, window=2, noise_level=0.7, kind="sde",
                                  generators=[torch.Generator().manual_seed(s) for s in (3, 4)])
    logprobs, _, _ = window_logprobs(pipe.scheduler, velocity, rollout, noise_level=0.7, kind="sde")
    assert torch.equal(logprobs.detach(), rollout.logprobs)  # guidance recomputed in training equals sampling's
    logprobs.sum().backward()
    grads = [p.grad for p in pipe.transformer.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    pipe.transformer.zero_grad(set_to_none=True)


def test_a_lora_update_on_a_positive_advantage_raises_its_window_and_moves_only_the_adapters():
    from diffusers import GlmImagePipeline

    from grpo_image.decoders.flow_lora import add_decoder_lora
    from grpo_image.decoders.glm_image_flow import DIT_LORA_TARGETS

    made = GlmImagePipeline(processor=None, vision_language_encoder=None, **tiny_dit_parts(CODES))
    adapters = add_decoder_lora(made.transformer, r=4, alpha=8, targets=DIT_LORA_TARGETS)
    names = {n for n, p in made.transformer.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n and "transformer_blocks." in n for n in names)
    with torch.no_grad():
        for name, param in made.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02, generator=torch.Generator().manual_seed(5))  # a trained-looking adapter
    pipeline_timesteps(made, HEIGHT, WIDTH, STEPS)
    velocity = GlmImageVelocity(made, PROMPT, prior(1), HEIGHT, WIDTH, 1.5)
    latents = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(6))
    rollout = denoise_with_window(made.scheduler, velocity, latents, start=0, window=2, noise_level=0.7, kind="sde",
                                  generators=[torch.Generator().manual_seed(7)])
    assert_one_update_raises_the_window(made.scheduler, velocity, rollout, made.transformer, adapters, names)
