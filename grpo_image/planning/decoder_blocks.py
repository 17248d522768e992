"""What decoder GRPO's backward keeps of a DiT's blocks, read from the module tree on the meta device.

The adapters are counted exactly: each Linear whose full name the family's LoRA regex matches (as peft matches a
string target). What each kind of block keeps per token is read from its code (diffusers' blocks) and checked
against measured peaks by tests/test_decoder_training_plan.py; grpo_image.planning.decoder_training sums it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockKind:
    """One kind of transformer block that decoder GRPO differentiates through, and what autograd keeps of it per
    token that passes through it (H the transformer's width, b the bytes of its dtype), read from the block's code
    and checked by tests/test_decoder_training_plan.py: `low` H-wide tensors in the compute dtype (LayerNorm inputs,
    SDPA's query, key, value and output, GELU's 4H-wide input), `fp32` H-wide fp32 tensors (FLUX's q/k RMSNorm
    computes on an fp32 copy), `scalars` fp32 numbers (norm statistics, SDPA's log-sum-exp per head), and the
    (in, out) features of the adapted Linears that token runs through (peft keeps an fp32 copy of each one's input
    and its rank-r output). A two-stream block counts one stream's adapters: each token runs through one of them."""

    count: int
    low: int
    fp32: int
    scalars: int
    adapted: tuple[tuple[int, int], ...]


def adapted_linears(transformer, targets: str) -> tuple[tuple[int, int], ...]:
    """(in, out) features of each Linear whose full name matches the LoRA regex `targets` as peft matches a string
    (the whole name): decoder GRPO's adapters, counted exactly from the module shapes on the meta device."""
    return tuple(_adapted(transformer, targets).values())


def token_adapters(transformer, targets: str, block: str, skip: str = "") -> tuple[tuple[int, int], ...]:
    """(in, out) of the adapted Linears inside the module `block` (a representative block of its kind), but those
    whose name within it matches `skip` (adapters a token of the counted stream does not run through)."""
    prefix = block + "."
    return tuple(shape for name, shape in _adapted(transformer, targets).items() if name.startswith(prefix)
                 and not (skip and re.match(skip, name[len(prefix):])))  # fmt: skip


def _adapted(transformer, targets: str) -> dict[str, tuple[int, int]]:
    from torch import nn

    return {name: (m.in_features, m.out_features) for name, m in transformer.named_modules()
            if isinstance(m, nn.Linear) and re.fullmatch(targets, name)}  # fmt: skip


def flux_blocks(transformer, targets: str, variant: str) -> tuple[BlockKind, ...]:
    """X-Omni's FLUX blocks as decoder GRPO's backward keeps them (diffusers' FluxTransformerBlock and
    FluxSingleTransformerBlock, X-Omni-Zh's XOmniImageOnlyBlock), per token:

    - a double block: its two LayerNorms' inputs (norm1's, norm2's), SDPA's four and GELU's 4H input in the compute
      dtype (10 H), the fp32 copies that the q and k RMSNorms compute on (2 H), the norms' mean and rstd and 3 per
      head (q and k rstd, the log-sum-exp), and one stream's adapters: an image token runs through to_q, to_k, to_v,
      to_out.0 and ff, a text token through add_q/k/v_proj, to_add_out and ff_context, the same shapes. Zh's
      image-only block has no text stream and never applies to_out (its adapter holds parameters, no activation);
    - a single block: one LayerNorm's input, SDPA's four and GELU's 4H input (9 H), the q/k RMSNorms' fp32 copies,
      and to_q, to_k, to_v, proj_mlp and proj_out (whose input is 5H wide: the attention's output beside the MLP's).
    """
    heads, config = transformer.config.num_attention_heads, transformer.config
    text_stream = r"attn\.(add_[qkv]_proj|to_add_out)|ff_context\."
    skip = text_stream if variant == "en" else rf"{text_stream}|attn\.to_out\."
    double = token_adapters(transformer, targets, "transformer_blocks.0", skip)
    return (BlockKind(config.num_layers, 10, 2, 3 * heads + 4, double),
            BlockKind(config.num_single_layers, 9, 2, 3 * heads + 2,
                      token_adapters(transformer, targets, "single_transformer_blocks.0")))  # fmt: skip


def glm_image_blocks(transformer, targets: str) -> tuple[BlockKind, ...]:
    """GLM-Image's DiT blocks (diffusers' GlmImageTransformerBlock) as decoder GRPO's backward keeps them, per token
    (image and glyph tokens alike: both streams share the block's attention and MLP): the inputs of its AdaLN norm,
    its MLP's norm and its q and k LayerNorms, SDPA's four and GELU's 4H input, all in the compute dtype (12 H); the
    two norms' mean and rstd, q's and k's per head, and the log-sum-exp per head; q, k, v, out and the MLP's two
    Linears, adapted (the regex of grpo_image/decoders/glm_image_flow.py)."""
    heads = transformer.config.num_attention_heads
    adapted = token_adapters(transformer, targets, "transformer_blocks.0")
    return (BlockKind(transformer.config.num_layers, 12, 0, 5 * heads + 4, adapted),)
