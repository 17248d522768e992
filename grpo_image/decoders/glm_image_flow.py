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


class GlmImageFlow:
    """GLM-Image's DiT as the decoder decoder GRPO trains (the `FlowDecoder` protocol of grpo_image/core/types.py).

    Wraps a `GlmImageDecoder` (its pipeline, already on the trainer's device): the same conditioning, initial noise
    and VAE decode as its pipeline calls, with the denoising loop left to grpo_image/core/flow_window.py.
    """

    lora_targets = DIT_LORA_TARGETS

    def __init__(self, decoder) -> None:
        self.decoder, self.pipe = decoder, decoder.pipe
        self.transformer, self.scheduler = self.pipe.transformer, self.pipe.scheduler
        self.max_batch_size = decoder.max_batch_size

    def _size(self, grid: tuple[int, int]) -> tuple[int, int]:
        return grid[0] * self.decoder.code_px, grid[1] * self.decoder.code_px  # (height, width) in pixels

    def set_timesteps(self, grid: tuple[int, int], num_inference_steps: int) -> None:
        pipeline_timesteps(self.pipe, *self._size(grid), num_inference_steps)

    def velocity(self, codes: torch.Tensor, grid: tuple[int, int], prompt: str,
                 guidance_scale: float | None) -> GlmImageVelocity:
        from grpo_image.decoders.glm_image import upsample_codes

        h, w = grid
        large = codes[:, codes.shape[1] - h * w :]  # [m, h*w]: the large grid, after the preview
        scale = self.decoder.guidance_scale if guidance_scale is None else guidance_scale
        prior = upsample_codes(large.cpu(), grid).to(self.pipe.device)  # [m, 4*h*w]
        return GlmImageVelocity(self.pipe, prompt, prior, *self._size(grid), scale)

    def initial_latents(self, grid: tuple[int, int], generators: list[torch.Generator]) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        height, width = self._size(grid)
        factor = self.pipe.vae_scale_factor
        shape = (len(generators), self.transformer.config.in_channels, height // factor, width // factor)
        noise = randn_tensor(shape, generator=generators, device=self.pipe.device, dtype=self.pipe.dtype)
        return noise.float()  # [m, C, H/8, W/8]: the pipeline's prepare_latents draw, kept in fp32

    @torch.no_grad()
    def to_images(self, latents: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)  # [m, C, h, w], un-normalised with the VAE's statistics as the pipeline does
        channels = (1, vae.config.latent_channels, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(channels).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(channels).to(latents.device, latents.dtype)
        images = vae.decode(latents * std + mean, return_dict=False)[0]  # [m, 3, H, W] in [-1, 1]
        images = self.pipe.image_processor.postprocess(images, output_type="np")  # float [m, H, W, 3] in [0, 1]
        return (images * 255).round().astype(np.uint8)  # as GlmImageDecoder rounds
