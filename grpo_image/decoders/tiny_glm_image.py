"""A tiny GLM-Image DiT decoder of the real classes, built offline from configs: what the CPU demo of decoder GRPO,
the tests and a recipe without a downloaded GLM-Image decode with.

GLM-Image's pipeline in miniature: `GlmImageTransformer2DModel` (patch 2, one block), an `AutoencoderKL` with 8 px
per latent (so 32 px per large-grid code, as GLM-Image's), a ByT5 glyph encoder and the shifted flow-matching
scheduler with GLM-Image's dynamic shift settings. Seeded: the same weights on every call.
"""

from __future__ import annotations

import torch

from grpo_image.decoders.glm_image import GlmImageDecoder


def tiny_dit_parts(num_codes: int, seed: int = 0, vae_width: int = 8, vae_groups: int = 4) -> dict:
    """The DiT, VAE, ByT5 encoder and tokenizer, and scheduler of a tiny GlmImagePipeline (no AR model).

    `vae_width` channels in each of the VAE's blocks, normalised in `vae_groups` groups. A random VAE's GroupNorm
    removes each group's mean, so with narrow groups a change the DiT makes to a latent channel everywhere barely
    reaches the pixels' colour; one group over 32 channels passes it on (about 10 levels of 255 per unit of a
    latent channel): what the decoder demo needs for a colour to be learnable at all.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImageTransformer2DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = GlmImageTransformer2DModel(
            patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            text_embed_dim=16, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=num_codes,
        )  # fmt: skip
        vae = AutoencoderKL(
            latent_channels=4, block_out_channels=(vae_width,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=vae_groups,
            latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.0, 0.9, 1.1, 1.2],
        )  # fmt: skip
        text_encoder = T5EncoderModel(T5Config(vocab_size=384, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                               feed_forward_proj="gated-gelu"))  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                base_shift=0.25, max_shift=0.75)  # fmt: skip
    return dict(transformer=transformer.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                tokenizer=ByT5Tokenizer(), scheduler=scheduler)  # fmt: skip


def tiny_glm_image_decoder(
    num_codes: int = 64,
    num_inference_steps: int = 10,
    guidance_scale: float = 1.5,
    max_batch_size: int | None = None,
    seed: int = 0,
    vae_width: int = 8,
    vae_groups: int = 4,
    dtype: str = "float32",
    device: str | None = None,
) -> GlmImageDecoder:
    """A `GlmImageDecoder` around a tiny pipeline (its prior codebook: `num_codes`, the tiny policy's) in `dtype`."""
    from diffusers import GlmImagePipeline

    parts = tiny_dit_parts(num_codes, seed, vae_width, vae_groups)
    for name in ("transformer", "vae", "text_encoder"):  # nn.Module's own cast: diffusers' would warn of fp32
        torch.nn.Module.to(parts[name], getattr(torch, dtype))  # modules this VAE does not have
    pipe = GlmImagePipeline(processor=None, vision_language_encoder=None, **parts)
    return GlmImageDecoder.from_pipeline(pipe, num_inference_steps, guidance_scale, max_batch_size,
                                         device or "cpu")  # fmt: skip
