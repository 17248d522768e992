"""The diffusion decoder's memory: one no-grad decoder call, and what decoder GRPO adds to a training process.

With `train.target: decoder | both` each training process builds the decoder on its own GPU and trains LoRA adapters
on its transformer (grpo_image/training/decoder_grpo.py); the reward workers then score images and hold no decoder.
What that process holds, term by term (the decoder's shape from grpo_image.planning.decoder_sizes):

- all run long: the decoder's weights in its dtype (transformer, VAE, and GLM-Image's ByT5 glyph encoder or X-Omni-En's
  text encoders), the adapters in fp32 (r x (in + out) for each Linear the family's regex adapts, counted from the
  module shapes), their fp32 gradients (kept from one update to the next) and AdamW's two fp32 moments;
- from the decodes to the decoder's update (through the reward wait and the policy's update): each of this process's
  B*K*G/W decodes' window latents, fp32 [window + 1, latent], their log-probs, and per decoder batch the conditioning
  its velocity keeps (the glyph embeddings of the prompt, and of the empty text under guidance; the prior codes);
- the decodes: one call of a decoder batch without grad (`decode_bytes`);
- the update: one window step's forward and backward of a decoder batch (`train_activation_bytes`), with or without
  the DiT's gradient checkpointing (decoder_train.gradient_checkpointing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from grpo_image.planning.decoder_blocks import BlockKind
from grpo_image.planning.decoder_sizes import DecoderShape

if TYPE_CHECKING:
    from grpo_image.planning.memory_plan import Plan

FLUX_WIDTHS = 20  # hidden-width tensors per row and token alive at once in a FLUX-like DiT block (qkv, RoPE, 4x MLP)


def decode_bytes(d: DecoderShape, images: int) -> float:
    """One decoder call of `images` images: a DiT's passes, then its VAE, or a conv decoder alone.

    X-Omni's FLUX transformer runs 2 rows per image (true CFG in one batched call) and its VAE decodes one image at a
    time (sliced); GLM-Image's DiT runs its conditional and unconditional passes one after the other (1 row per image
    each) and its VAE decodes the whole call at once, as Janus's VQ does. A conv decoder's worst moment is the first
    block at a resolution: about 3 x (in + out) channels of that size alive (the upsampled input, GroupNorm's output,
    the conv and shortcut outputs; measured on diffusers' VAE).
    """
    conv = max((3 * (c_in + c_out) * pixels for c_in, c_out, pixels in d.levels), default=0) * d.dtype_bytes
    if d.kind == "dit":
        transformer = d.rows_per_image * images * d.tokens * d.inner * FLUX_WIDTHS * d.dtype_bytes
        return max(transformer, conv * (images if d.vae_batched else 1))
    return images * conv


def lora_params(d: DecoderShape, r: int) -> int:
    """The adapters' parameters: A [r, in] and B [out, r] for each adapted Linear (0 when no regex is known)."""
    return sum(r * (fan_in + fan_out) for fan_in, fan_out in d.adapted or ())


def pass_tokens(d: DecoderShape, guided: bool) -> int:
    """Tokens one decode's velocity runs the transformer on: the conditional pass's (image + the prompt's glyph or
    text tokens), and under guidance the unconditional pass's (GLM-Image: the empty glyph text, one token; X-Omni:
    the same text stream, batched)."""
    if not guided:
        return d.tokens
    return 2 * d.tokens if d.rows_per_image == 2 else d.tokens + d.image_tokens + 1


def block_bytes(d: DecoderShape, kind: BlockKind, r: int) -> int:
    """What one block of `kind` keeps for its backward, per token (grpo_image.planning.decoder_sizes.BlockKind):
    its own tensors, and each adapter's fp32 copy of its input (peft casts it when the base computes in a lower
    precision) and fp32 rank-r output."""
    b, h = d.dtype_bytes, d.inner
    cast = 4 if b < 4 else 0
    adapters = sum(cast * fan_in + 4 * r for fan_in, _ in kind.adapted)
    return kind.low * b * h + kind.fp32 * 4 * h + 4 * kind.scalars + adapters


def backward_bytes(d: DecoderShape, kind: BlockKind) -> int:
    """The backward's working set in a block of `kind`, per token: its widest adapted Linear's input gradients at once
    (the fp32 adapter's, the base's, that of the cast back to the compute dtype and their sum: 4 + 3 b bytes per
    unit of width; GLM-Image's and FLUX's MLP are 4H wide, FLUX's single-block proj_out reads 5H)."""
    return max((max(shape) for shape in kind.adapted), default=4 * d.inner) * (4 + 3 * d.dtype_bytes)


def train_activation_bytes(d: DecoderShape, rows: int, r: int, guided: bool, checkpointing: bool = False) -> float:
    """One window step's forward and backward for a decoder batch of `rows` decodes (DecoderTrainer.update runs the
    window's steps one after the other, each its own term of the loss, so one step's graph is held at a time).

    The step's velocity runs the transformer once, or twice under guidance (GLM-Image: two calls in turn, both
    graphs kept for the one backward; X-Omni: one call on 2 rows a decode). Without gradient checkpointing every
    block keeps what its backward needs (`block_bytes`: about 60 H + 24 r bytes a token in GLM-Image's and FLUX's
    blocks at bf16), and the backward of one call adds the working set of its widest block (`backward_bytes`). With
    decoder_train.gradient_checkpointing each block keeps only its input in the compute dtype (b H a token: a
    two-stream block's two inputs, one per token), and the backward recomputes one block of one call at a time,
    whole, beside its working set.
    Not counted: the embedders and the output head (less than one block's worth; the first block's input needs no
    gradient either), RoPE's cos/sin and the conditioning (shared by the blocks), the scheduler step's latent-sized
    tensors (a few MiB), and a fp32 base's exact sharing of inputs between its Linears and their adapters. Counted
    above what is: FLUX's single block releases each adapter's saved fp32 input as its backward makes that input's
    gradient, so its working set is below `backward_bytes`. tests/test_decoder_training_plan.py measures a toy
    GLM-Image DiT and a toy X-Omni FLUX transformer (bf16 base, fp32 adapters) through the per-step update, with and
    without checkpointing: GLM-Image's within 4% of the peak, X-Omni's 4 to 10% above it.
    """
    b, h = d.dtype_bytes, d.inner
    kept_tokens = rows * pass_tokens(d, guided)  # every transformer call of the step, passes summed
    call_tokens = rows * (pass_tokens(d, guided) if d.rows_per_image == 2 else d.tokens)  # the largest one call
    kinds = [kind for kind in d.block_kinds if kind.count]
    if not checkpointing:
        kept = kept_tokens * sum(kind.count * block_bytes(d, kind, r) for kind in kinds)
        return kept + call_tokens * max((backward_bytes(d, kind) for kind in kinds), default=0)
    recomputed = max((block_bytes(d, kind, r) + backward_bytes(d, kind) for kind in kinds), default=0)
    return kept_tokens * d.blocks * b * h + call_tokens * recomputed


@dataclass(frozen=True)
class DecoderTraining:
    """What decoder GRPO adds to each training process, row by row, and the sizes the advice names."""

    rows: list[tuple[str, float, str]]  # (what, bytes, note)
    resident: float  # weights, adapters, their gradients and AdamW moments
    startup: float  # what building it adds before the first step: weights and adapters
    kept: float  # window latents, log-probs and conditioning, from the decodes to the decoder's update
    decode: float  # one no-grad call of a decoder batch
    update: float  # one window step's forward and backward of a decoder batch, as the recipe runs it
    batch: int  # decodes per decoder batch
    per_decode: dict[bool, float]  # checkpointing off / on -> the update's bytes per decode (linear in the batch)
    guided: bool
    checkpointing: bool  # decoder_train.gradient_checkpointing
    lora_r: int
    adapters: int  # the adapters' parameters (what a checkpoint's decoder/ holds, with AdamW's two moments)


def decoder_training(d: DecoderShape, cfg: DictConfig, rollouts: int) -> DecoderTraining:
    """The decoder-training terms of a recipe whose decoder learns, for `rollouts` code samples per process."""
    train = cfg.decoder_train
    decodes_per_sample, window, r = int(train.group_size), int(train.window), int(train.lora.r)
    decodes = rollouts * decodes_per_sample  # this process's: B*K*G/W
    group = cfg.data.group_size * decodes_per_sample  # a prompt's decodes
    batch = min(d.max_batch_size or group, group, decodes)
    guidance = d.guidance_scale if train.guidance_scale is None else float(train.guidance_scale)
    guided = guidance > 1
    adapters = lora_params(d, r)
    weights = sum(part.bytes for part in d.parts)
    latents = decodes * ((window + 1) * d.latent_elements + window) * 4  # fp32 latents and log-probs
    text_rows = (d.tokens - d.image_tokens) + (1 if guided and d.rows_per_image == 1 else 0)
    conditioning = decodes * (text_rows * d.text_width * d.dtype_bytes + 8 * d.image_tokens)  # embeddings, int64 ids
    decode = decode_bytes(d, batch)
    checkpointing = bool(train.get("gradient_checkpointing", False))
    updates = {c: train_activation_bytes(d, batch, r, guided, c) for c in (False, True)}
    what = f"{batch} decode{'s' if batch > 1 else ''} x {'2 passes (CFG)' if guided else '1 pass'}"
    regex = "" if d.adapted is not None else "not counted: no LoRA regex known for this decoder"
    rows = [(f"decoder: {part.name}", float(part.bytes), "") for part in d.parts] + [
        (f"decoder adapters (fp32, r {r})", 4.0 * adapters, regex or f"{adapters / 1e6:.1f} M parameters"),
        ("decoder adapter gradients (fp32)", 4.0 * adapters, ""),
        ("decoder optimizer state (AdamW, 2 x fp32)", 8.0 * adapters, ""),
        (f"decoder window latents ({decodes} decodes x {window + 1} x {d.latent_elements:,}, fp32)", float(latents),
         "from the decodes to the decoder's update"),
        ("decoder conditioning kept per decoder batch", float(conditioning), "glyph/text embeddings, prior codes"),
        (f"decoder rollout call of {batch} decode{'s' if batch > 1 else ''} (no grad)", decode,
         "decoder's max_batch_size"),
    ] + [(f"decoder forward+backward, {what}{', checkpointed' if c else ''}", updates[c],
          f"a window step, {'with' if c else 'no'} checkpointing{' <- the recipe' if c == checkpointing else ''}")
         for c in (False, True)]  # fmt: skip
    return DecoderTraining(
        rows=rows, resident=weights + 16.0 * adapters, startup=weights + 4.0 * adapters,
        kept=float(latents + conditioning), decode=decode, update=updates[checkpointing], batch=batch,
        per_decode={c: updates[c] / batch if batch else math.inf for c in updates}, guided=guided,
        checkpointing=checkpointing, lora_r=r, adapters=adapters,
    )  # fmt: skip


# the policy's rows about its own update: a frozen policy (train.target decoder) has none of them
POLICY_UPDATE_ROWS = ("gradients", "optimizer state", "gradient averaging", "activations per micro-batch",
                      "image head", "reference", "old log-probs")  # fmt: skip


def add_decoder_training(plan: Plan, cfg: DictConfig) -> None:
    """Count decoder GRPO on each training process (train.target decoder or both): its rows in the table, what it
    holds in every phase, and two phases of its own, the decodes and the decoder's update.

    The window latents are held from the decodes on, so the policy's reference pass and update (target both) carry
    them; the policy's rollouts come first and do not. A frozen policy (target decoder) is built as for training
    (its LoRA adapters included) but never computes a gradient: no gradients, AdamW moments, reference or update.
    """
    dt = decoder_training(plan.decoder, cfg, plan.setup.rollouts)
    plan.decoder_train = dt
    if cfg.train.target == "decoder":
        dropped = plan.held["gradients"] + plan.held["optimizer"]
        plan.resident -= dropped
        plan.rows = [row for row in plan.rows if not row[0].startswith(POLICY_UPDATE_ROWS)]
        plan.rows.append(("policy gradients and optimizer state", 0.0, "none: the policy is frozen (train.target "
                                                                       "decoder)"))  # fmt: skip
        plan.phases = {name: value - (dropped if name != "start-up" else 0.0) for name, value in plan.phases.items()
                       if name not in ("update", "reference")}  # fmt: skip
    plan.rows += dt.rows
    resident = plan.resident + dt.resident
    for name in plan.phases:
        plan.phases[name] += {"start-up": dt.startup, "rollout": dt.resident}.get(name, dt.resident + dt.kept)
    plan.phases["decoder rollout"] = resident + dt.kept + dt.decode
    plan.phases["decoder update"] = resident + dt.kept + dt.update
    plan.resident = resident


def largest_decoder_batch(plan: Plan, checkpointing: bool) -> int:
    """The most decodes per decoder batch whose window step's forward and backward fit beside what the process holds
    then, with decoder_train.gradient_checkpointing off or on."""
    dt = plan.decoder_train
    room, per_decode = plan.usable - (plan.phases["decoder update"] - dt.update), dt.per_decode[checkpointing]
    return max(0, min(dt.batch, int(room // per_decode))) if per_decode > 0 else dt.batch
