"""GLM-Image's DiT as the velocity field of decoder GRPO: what `GlmImagePipeline` computes at each denoising step.

The pipeline's loop (diffusers, pipeline_glm_image.py, text-to-image) at step t: the DiT in the transformer's dtype on
the latents, once with the prompt's glyph embeddings and the prior tokens kept, once (with classifier-free guidance)
with the empty prompt's and the prior tokens dropped, each output in fp32, mixed as u + s (c - u), then the
scheduler's Euler step. The timesteps are the pipeline's own: `num_inference_steps` linearly from the scheduler's
`num_train_timesteps` to 1, shifted by `mu` for the image's token count. This module computes the same velocity
(with grad, for the training pass, where the guidance is recomputed as at sampling) so that the step around it can be
the stochastic one of grpo_image/core/flow.py.
"""

from __future__ import annotations

import numpy as np
import torch

# The DiT's attention and MLP projections in every block (not the embedders, the AdaLN modulations or the output
# head), as flow_grpo adapts SD3's: attention q, k, v, out and the feed-forward's two Linears.
DIT_LORA_TARGETS = r"transformer_blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"


def add_dit_lora(transformer, *, r: int, alpha: int, targets: str = DIT_LORA_TARGETS) -> list[torch.nn.Parameter]:
    """LoRA adapters (fp32, B zero: the decoder unchanged until trained) on the DiT's projections, in place; only they
    are trainable. Returns them."""
    from peft import LoraConfig, inject_adapter_in_model

    transformer.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets), transformer)
    adapters = [p for name, p in transformer.named_parameters() if "lora_" in name]
    for param in adapters:
        param.data = param.data.float()
        param.requires_grad_(True)
    return adapters


def pipeline_timesteps(pipe, height: int, width: int, num_inference_steps: int) -> torch.Tensor:
    """Set `pipe.scheduler` to the timesteps (and shifted sigmas) the pipeline samples `height` x `width` with."""
    from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps

    config = pipe.scheduler.config
    seq_len = (height // pipe.vae_scale_factor) * (width // pipe.vae_scale_factor) // pipe.transformer.config.patch_size**2
    timesteps = np.linspace(config.num_train_timesteps, 1.0, num_inference_steps + 1)[:-1]
    timesteps = timesteps.astype(np.int64).astype(np.float32)
    mu = calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("base_shift", 0.25),
                         config.get("max_shift", 0.75))
    found, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, pipe.device, timesteps,
                                  timesteps / config.num_train_timesteps, mu=mu)
    return found


class GlmImageVelocity:
    """The guided DiT velocity for one prompt's rollouts: `(latents [n, C, h, w], timestep [n]) -> fp32 [n, C, h, w]`.

    `prior_token_ids` [n, T]: each rollout's large-grid codes upsampled as the pipeline does; `guidance_scale` 1: no
    unconditional pass.
    """

    def __init__(self, pipe, prompt: str, prior_token_ids: torch.Tensor, height: int, width: int,
                 guidance_scale: float) -> None:
        rows = len(prior_token_ids)
        self.pipe, self.guidance_scale, self.prior = pipe, float(guidance_scale), prior_token_ids
        guided = self.guidance_scale > 1
        with torch.no_grad():
            prompt_embeds, negative = pipe.encode_prompt([prompt] * rows, guided, device=pipe.device,
                                                         dtype=pipe.dtype)  # as GlmImageDecoder calls the pipeline
        self.prompt_embeds, self.negative_embeds = prompt_embeds, negative
        self.target_size = torch.tensor([[height, width]], dtype=pipe.dtype, device=pipe.device).repeat(rows, 1)
        self.crops = torch.zeros((rows, 2), dtype=pipe.dtype, device=pipe.device)  # crops_coords_top_left (0, 0)

    def _dit(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, drop: bool) -> torch.Tensor:
        transformer = self.pipe.transformer
        return transformer(
            hidden_states=latents.to(transformer.dtype), encoder_hidden_states=embeds, prior_token_id=self.prior,
            prior_token_drop=torch.full_like(self.prior, drop, dtype=torch.bool), timestep=timestep - 1,
            target_size=self.target_size, crop_coords=self.crops, return_dict=False,
        )[0].float()  # [n, C, h, w]

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        cond = self._dit(latents, timestep, self.prompt_embeds, drop=False)  # [n, C, h, w]
        if self.guidance_scale <= 1:
            return cond
        uncond = self._dit(latents, timestep, self.negative_embeds, drop=True)  # [n, C, h, w]
        return uncond + self.guidance_scale * (cond - uncond)
