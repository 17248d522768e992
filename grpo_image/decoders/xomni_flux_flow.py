"""X-Omni's FLUX decoder as the velocity field of decoder GRPO: one iteration of `sample_xomni_flux`'s loop.

`sample_xomni_flux` (grpo_image/decoders/xomni_flux.py, X-Omni's `FluxPipelineWithSigLIP.__call__` on current
diffusers) runs, at each timestep t of FLUX.1-dev's shifted schedule: one batched transformer call on [cond; uncond]
rows (the code features and zeroed features; for X-Omni-En the prompt's T5/CLIP embeddings and the empty prompt's),
FLUX's embedded guidance, the timestep cast to the transformer's dtype before the division by 1000, then true CFG
u + s (c - u) in that dtype and the scheduler's Euler step. This module computes the same velocity, with grad when
grad is enabled, so that grpo_image/core/flow_window.py can put the stochastic step of grpo_image/core/flow.py
around it. Three things differ from the sampler, on purpose:

- the loop keeps its latents in fp32 and casts them to the decoder's dtype at the transformer's input (the sampler
  keeps them in the decoder's dtype; in fp32 the two are the same computation);
- a guidance scale of 1 runs the conditional rows alone (half the compute; the sampler always runs both halves, so
  at scale 1 the two differ by the rounding of u + (c - u));
- the conditioning (projected code features, text embeddings, image and text position ids) is computed once per
  rollout batch, without grad: the projector is not trained, and the training pass reuses what the rollout saw.

LoRA targets. flow_grpo's FLUX training adapts the attention projections of both streams (to_q, to_k, to_v,
to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out), and Flow-GRPO's LoRA on FLUX-class transformers is
described as covering attention and MLP projections; so here: every double-stream block's attention projections of
both streams and both feed-forwards (ff, ff_context: their first and last Linear), and every single-stream block's
q/k/v, its MLP input (`proj_mlp`) and its fused output (`proj_out`). Not adapted: the time/text/guidance embedders,
`x_embedder`, `context_embedder`, `siglip_embed` (the code features' entry), every AdaLN modulation (`norm*.linear`)
and the output head (`norm_out`, the top-level `proj_out`). The names are diffusers' `FluxTransformer2DModel`'s,
which `XOmniFluxTransformer2DModel` inherits; the Chinese variant's image-only double blocks have no text stream (no
add_*, no ff_context) and never apply `attn.to_out` (grpo_image/decoders/xomni_transformer.py), so that adapter
matches but receives no gradient.
"""

from __future__ import annotations

import numpy as np
import torch

_DOUBLE = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)" \
          r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
_SINGLE = r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"
FLUX_LORA_TARGETS = f"({_DOUBLE}|{_SINGLE})"  # peft matches a str target with re.fullmatch over full module names


class XOmniFluxVelocity:
    """The guided velocity for m rollouts of one prompt: `(latents fp32 [m, L, C], timestep [m]) -> fp32 [m, L, C]`.

    `cfg_scale` > 1: one call on 2m rows (conditional, then zeroed features and the empty prompt), mixed as the
    sampler mixes; 1: the m conditional rows alone.
    """

    def __init__(self, decoder, codes: torch.Tensor, grid: tuple[int, int], prompt: str, cfg_scale: float) -> None:
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        self.transformer, self.dtype, self.cfg_scale = decoder.transformer, decoder.dtype, float(cfg_scale)
        device, m = decoder.device, codes.shape[0]
        self.guided = self.cfg_scale != 1
        rows = 2 * m if self.guided else m
        h, w = grid
        with torch.no_grad():
            features = decoder.projector(codes.to(device), grid).to(self.dtype)  # [m, L, z]
            zeros = torch.zeros_like(features)  # [m, L, z]: the unconditional rows' features
            self.features = torch.cat([features, zeros]) if self.guided else features  # [rows, L, z]
            self.img_ids = FluxPipeline._prepare_latent_image_ids(1, h, w, device, self.dtype)  # [L, 3]
            self.text: dict[str, torch.Tensor] = {}
            if decoder.needs_prompts:
                embeds, pooled = decoder.encode_prompts([prompt] * m)  # [2m, S, J], [2m, P]: cond rows, then uncond
                self.text = {"encoder_hidden_states": embeds[:rows], "pooled_projections": pooled[:rows],
                             "txt_ids": torch.zeros(embeds.shape[1], 3, device=device, dtype=self.dtype)}  # [S, 3]
        self.guidance = None
        if self.transformer.config.guidance_embeds:  # FLUX.1-dev's embedded guidance, X-Omni's fixed 1.0
            self.guidance = torch.full([rows], decoder.guidance_scale, device=device, dtype=torch.float32)  # [rows]

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = latents.to(self.dtype)  # [m, L, C], as the sampler holds its latents
        t = timestep.to(self.dtype) / 1000  # [m]: cast before /1000, as upstream (rounds in bf16)
        if self.guided:
            x, t = torch.cat([x, x]), torch.cat([t, t])  # [2m, L, C], [2m]
        out = self.transformer(hidden_states=x, timestep=t, img_ids=self.img_ids, siglip_tensor=self.features,
                               guidance=self.guidance, return_dict=False, **self.text)[0]  # [rows, L, C]
        if not self.guided:
            return out.float()
        pos, neg = out.chunk(2)  # [m, L, C] each
        return (neg + self.cfg_scale * (pos - neg)).float()  # true CFG in the transformer's dtype, as the sampler


class XOmniFluxFlow:
    """X-Omni's decoder as the decoder decoder GRPO trains (the `FlowDecoder` protocol of grpo_image/core/types.py).

    Wraps an `XOmniFluxDecoder` (already on the trainer's device): its schedule, conditioning, initial noise and VAE
    decode, with the denoising loop left to grpo_image/core/flow_window.py.
    """

    lora_targets = FLUX_LORA_TARGETS

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.transformer, self.scheduler = decoder.transformer, decoder.scheduler
        self.max_batch_size = decoder.max_batch_size

    def set_timesteps(self, grid: tuple[int, int], num_inference_steps: int) -> None:
        from grpo_image.decoders.xomni_flux import set_xomni_timesteps

        set_xomni_timesteps(self.scheduler, grid[0] * grid[1], num_inference_steps, self.decoder.device)

    def velocity(self, codes: torch.Tensor, grid: tuple[int, int], prompt: str,
                 guidance_scale: float | None) -> XOmniFluxVelocity:
        """codes int64 [m, h*w]; guidance_scale None: the decoder's cfg_scale."""
        scale = self.decoder.cfg_scale if guidance_scale is None else guidance_scale
        return XOmniFluxVelocity(self.decoder, codes, grid, prompt, scale)

    def initial_latents(self, grid: tuple[int, int], generators: list[torch.Generator]) -> torch.Tensor:
        return self.decoder.noise(generators, grid).float()  # [m, L, C]: the decoder's draw, kept in fp32

    @torch.no_grad()
    def to_images(self, latents: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
        from grpo_image.decoders.xomni_flux import to_uint8

        latents = latents.to(self.decoder.dtype)  # [m, L, C], in the dtype the sampler ends in
        return to_uint8(self.decoder.latents_to_images(latents, grid))  # uint8 [m, H, W, 3]
