"""X-Omni's FLUX transformer with SigLIP feature injection, on current diffusers.

X-Omni's own classes (`FluxTransformer2DModelWithSigLIP` in `modeling_siglip_flux.py` for X-Omni-En and in
`modeling_siglip_flux_zh.py` for the Chinese decoder) were written against diffusers 0.34 and fail on 0.35+.
Both are a FLUX.1-dev transformer plus one thing: the projected image-code features are added once to the image
tokens after the last double-stream block (`img = img + siglip_embed(siglip_tensor)`, no bias, so zero features
add exactly nothing). Here that add goes through the stock `FluxTransformer2DModel.forward` as a ControlNet-style
residual on the last double block, so the whole stock forward (RoPE, embeddings, blocks, caching hooks) is reused
rather than copied.

The zh variant has no text stream at all: its double blocks are image-only (`XOmniImageOnlyBlock`, which inherits
the "no `to_out`" quirk from diffusers' own `FluxAttnProcessor`), its pooled vector is a learned parameter, and
it runs the same stock forward with a zero-length text sequence, which makes every concat with the text stream an
identity. Both variants load the folders X-Omni saved (`config.json` with the extra fields `siglip_channels` and
`drop_token_prob`, `diffusion_pytorch_model*.safetensors`) with their original key names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import AdaLayerNormZero
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
from safetensors import safe_open
from torch import nn

VARIANTS = ("en", "zh")


class XOmniFluxTransformer2DModel(FluxTransformer2DModel):
    """X-Omni-En's decoder transformer: stock FLUX (T5 sequence + CLIP pooled) plus the SigLIP feature add.

    `siglip_channels` is the projector's feature width z (X-Omni passes `encoder.z_channels` at load time, so a
    saved config may lack it; `load_xomni_transformer` fills it in). `drop_token_prob` is X-Omni's training-only
    dropout of whole feature tokens; this decoder is frozen during RL, so training with it is refused rather than
    guessed at.
    """

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        siglip_channels: int | None = None,
        drop_token_prob: float = 0.0,
    ):
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )
        if siglip_channels is None:
            raise ValueError("XOmniFluxTransformer2DModel: config needs 'siglip_channels' (the feature width z)")
        if num_layers < 1:
            raise ValueError("XOmniFluxTransformer2DModel: features go in after the double blocks: num_layers >= 1")
        self.siglip_embed = nn.Linear(siglip_channels, self.inner_dim, bias=False)
        nn.init.zeros_(self.siglip_embed.weight)  # X-Omni starts it at zero: untrained, the model is stock FLUX

    def _siglip_residuals(self, siglip_tensor: torch.Tensor | None) -> list[torch.Tensor | float] | None:
        """One residual per double block: 0 for all but the last, which gets the projected features."""
        if siglip_tensor is None:
            return None
        if self.training and self.config.drop_token_prob > 0:
            raise NotImplementedError("drop_token_prob > 0 is X-Omni's training-time dropout; this is inference-only")
        feats = self.siglip_embed(siglip_tensor.to(self.siglip_embed.weight.dtype))  # [B, L, D]
        return [0.0] * (len(self.transformer_blocks) - 1) + [feats]

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        siglip_tensor: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ):
        """hidden_states [B, L, C] packed latents; timestep [B] sigma (x1000 inside); img_ids [L, 3];
        siglip_tensor [B, L, z] or None (= zeros);
        en: encoder_hidden_states [B, S, joint], pooled_projections [B, P], txt_ids [S, 3].
        Returns the velocity [B, L, C] (a Transformer2DModelOutput, or a 1-tuple when return_dict is False).
        """
        if encoder_hidden_states is None or pooled_projections is None or txt_ids is None:
            raise ValueError("X-Omni-En transformer: needs encoder_hidden_states, pooled_projections and txt_ids")
        return super().forward(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            joint_attention_kwargs=joint_attention_kwargs,
            controlnet_block_samples=self._siglip_residuals(siglip_tensor),
            controlnet_blocks_repeat=False,
            return_dict=return_dict,
        )


class XOmniImageOnlyBlock(nn.Module):
    """The zh double block: FLUX's image half alone (AdaLN-Zero, self-attention, MLP), no text stream.

    It keeps `attn.to_out` in its state dict but never applies it: `FluxAttnProcessor` projects out only when
    text states are given, the same behaviour X-Omni trained with (its `to_out` weights get no gradient).
    Call signature and return value match `FluxTransformerBlock`, so the stock forward can drive it; the
    (empty) text states pass through unchanged.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.attn = FluxAttention(
            query_dim=dim,
            dim_head=attention_head_dim,
            heads=num_attention_heads,
            out_dim=dim,
            bias=True,
            processor=FluxAttnProcessor(),
            eps=eps,
        )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)  # [B, L, D], 4x [B, D]
        attn_out = self.attn(norm_x, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))  # [B, L, D]
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_out  # [B, L, D]
        norm_x = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]  # [B, L, D]
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(norm_x)  # [B, L, D]
        return encoder_hidden_states, hidden_states


class XOmniFluxTransformer2DModelZh(XOmniFluxTransformer2DModel):
    """The Chinese decoder transformer: no text stream, a learned pooled vector, image-only double blocks.

    `context_embedder` stays (it is in the saved state dict) but only ever sees a zero-length sequence.
    """

    _no_split_modules = ["XOmniImageOnlyBlock", "FluxSingleTransformerBlock"]
    _repeated_blocks = ["XOmniImageOnlyBlock", "FluxSingleTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        siglip_channels: int | None = None,
        drop_token_prob: float = 0.0,
    ):
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__(**config)  # by keyword: positional args would mark every field a default in the config
        self.transformer_blocks = nn.ModuleList(
            [XOmniImageOnlyBlock(self.inner_dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        )
        self.pooled_embeds = nn.Parameter(torch.zeros(1, pooled_projection_dim))  # [1, P]

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        siglip_tensor: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ):
        """Same arguments as the en forward; text inputs must be None (the zh decoder has no text stream)."""
        if encoder_hidden_states is not None or pooled_projections is not None or txt_ids is not None:
            raise ValueError("X-Omni-Zh transformer takes no text conditioning (it uses a learned pooled vector)")
        batch = hidden_states.shape[0]
        no_text = hidden_states.new_zeros(batch, 0, self.config.joint_attention_dim)  # [B, 0, joint]
        return super().forward(
            hidden_states=hidden_states,
            timestep=timestep,
            img_ids=img_ids,
            siglip_tensor=siglip_tensor,
            guidance=guidance,
            encoder_hidden_states=no_text,
            pooled_projections=self.pooled_embeds.expand(batch, -1),  # [B, P]
            txt_ids=img_ids.new_zeros(0, 3),  # RoPE over the image ids only
            joint_attention_kwargs=joint_attention_kwargs,
            return_dict=return_dict,
        )


def weight_names(folder: str | Path) -> set[str]:
    """The parameter names saved in a diffusers model folder (single file or sharded), read from headers only."""
    folder = Path(folder)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = folder / "diffusion_pytorch_model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: no diffusion_pytorch_model.safetensors (or its .index.json) found")
    with safe_open(single, framework="pt") as f:
        return set(f.keys())


def detect_variant(folder: str | Path) -> str:
    """'zh' when the saved weights carry the learned pooled vector, else 'en' (both configs look the same)."""
    return "zh" if "pooled_embeds" in weight_names(folder) else "en"


def load_xomni_transformer(
    folder: str | Path,
    variant: str = "auto",
    siglip_channels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> XOmniFluxTransformer2DModel:
    """Load an X-Omni transformer folder as saved, failing on any missing or unexpected weight.

    `siglip_channels` (the projector's z) fills the config field when the saved config lacks it, as X-Omni's
    `init_vision` does, and must agree with it otherwise.
    """
    folder = Path(folder)
    if variant == "auto":
        variant = detect_variant(folder)
    if variant not in VARIANTS:
        raise ValueError(f"X-Omni transformer variant must be 'auto', 'en' or 'zh', got {variant!r}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: X-Omni transformer config not found")
    saved = json.loads(config_path.read_text()).get("siglip_channels")
    if saved is not None and siglip_channels is not None and saved != siglip_channels:
        raise ValueError(
            f"{config_path}: siglip_channels={saved} but the projector's feature width is {siglip_channels}"
        )
    overrides = {} if saved is not None or siglip_channels is None else {"siglip_channels": siglip_channels}
    cls = XOmniFluxTransformer2DModelZh if variant == "zh" else XOmniFluxTransformer2DModel
    model, info = cls.from_pretrained(folder, dtype=dtype, output_loading_info=True, **overrides)
    kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
    bad = {k: sorted(map(str, v)) for k, v in info.items() if v and k in kinds}
    bad = {k: v[:4] + ([f"... {len(v) - 4} more"] if len(v) > 4 else []) for k, v in bad.items()}
    if bad:
        raise ValueError(f"{folder}: weights do not fit the X-Omni-{variant} transformer: {bad}")
    return model.eval().requires_grad_(False)
