"""A tiny GLM-Image DiT, VAE, glyph encoder and scheduler of the real classes, for the decoder and export tests."""

from __future__ import annotations

import torch


def tiny_dit_parts(num_codes: int) -> dict:
    """A toy DiT, VAE (8 px per latent: 32 px per large-grid code, as GLM-Image's), ByT5 and scheduler, seeded."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImageTransformer2DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = GlmImageTransformer2DModel(
            patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            text_embed_dim=16, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=num_codes,
        )  # fmt: skip
        vae = AutoencoderKL(
            latent_channels=4, block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
            latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.0, 0.9, 1.1, 1.2],
        )  # fmt: skip
        text_encoder = T5EncoderModel(T5Config(vocab_size=384, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                               feed_forward_proj="gated-gelu"))  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                base_shift=0.25, max_shift=0.75)  # fmt: skip
    return dict(transformer=transformer.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                tokenizer=ByT5Tokenizer(), scheduler=scheduler)  # fmt: skip
