"""What a training process holds all run long, and at its start-up peak: the memory plan's resident terms.

`held_terms` names them (weights, reference, gradients, optimizer) as tests/test_fsdp_memory.py reads them back from
two gloo ranks after every phase; `resident_rows` is their table in `grpo-image plan`; `startup_bytes` is the peak
before the first step, when the weights and the reference are built (grpo_image.training.weights and .fsdp).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from grpo_image.planning.memory_plan import Setup
    from grpo_image.planning.model_sizes import PolicyShape

BUCKET_BYTES = 256 * 2**20  # a flat bucket of replicated tensors (training.distributed: averaging, broadcast)


def count(value: float) -> str:
    """A parameter count as a person reads it: 9.60 B, 207.6 M, 109.8 k."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}" if unit == "B" else f"{value / scale:.1f} {unit}"
    return f"{value:.0f}"


def held_terms(p: PolicyShape, s: Setup) -> dict[str, float]:
    """What a training process holds all run long, by name: weights, reference, gradients, optimizer.

    Full fine-tuning's reference copy: every decoder-layer parameter in the compute dtype under FSDP (what the
    policy's layers are gathered in), otherwise trained parameters that only Linears hold in the compute dtype and
    the other trained ones in fp32; frozen parameters are shared with the policy.
    """
    w = s.processes if s.fsdp else 1
    b = p.dtype_bytes
    trained = p.trainable_sharded / w + p.trainable_params - p.trainable_sharded
    frozen_sharded = p.sharded_params - p.trainable_sharded
    frozen = frozen_sharded / w + (p.params - p.trainable_params) - frozen_sharded
    if s.mode == "lora":
        adapters = p.lora_params
        return {"weights": p.params * b + 4 * (adapters + stage_adapters(p, s)), "reference": 0.0,
                "gradients": 4 * adapters, "optimizer": 8 * adapters}  # fmt: skip
    if s.beta <= 0:
        reference = 0.0
    elif s.fsdp:
        linear_outside = p.trainable_linear - p.trainable_linear_sharded
        outside = p.trainable_params - p.trainable_sharded
        reference = b * p.sharded_params / w + b * linear_outside + 4 * (outside - linear_outside)
    else:
        reference = b * p.trainable_linear + 4 * (p.trainable_params - p.trainable_linear)
    return {"weights": 4 * trained + b * frozen, "reference": reference, "gradients": 4 * trained,
            "optimizer": 8 * trained}  # fmt: skip


def stage_adapters(p: PolicyShape, s: Setup) -> int:
    """The earlier stages' frozen fp32 adapters a LoRA run holds: as saved, or, before they are, one of the recipe's
    own adapter shape (a stage continued with the same train.lora settings)."""
    return p.lora_params if s.stage_adapters is None else s.stage_adapters


def startup_bytes(p: PolicyShape, s: Setup, held: dict[str, float]) -> float:
    """The start-up's peak per GPU, before the first step: the weights and the reference once built, and a transient.

    Without FSDP the whole model is on the device (the policy's dtype, turned into fp32 masters a parameter at a
    time), then replicas become rank 0's through flat buckets of up to 256 MB, then the reference is copied. Under
    FSDP the model reaches the device layer by layer (grpo_image.training.fsdp): the worst moment is the last layer,
    all others sharded (policy and reference), whole in fp32 (4 bytes a parameter) alongside its reference copy in
    the compute dtype while that copy is sharded (b + b/W), or its own shard while it is sharded (4/W, plus the
    reference's shard b/W). Equal layers assumed: the largest stands for the last.
    """
    built = held["weights"] + held["reference"]
    if not s.fsdp:
        replicas = min(BUCKET_BYTES, held["weights"]) if s.processes > 1 else 0.0
        return held["weights"] + max(replicas, held["reference"])
    w, b, layer = s.processes, p.dtype_bytes, p.largest_layer_params
    copy = b if s.beta > 0 else 0
    others = held["weights"] + copy * p.sharded_params / w - (4 + copy) * layer / w  # every other layer sharded
    in_flight = 4 * layer + max(copy * (1 + 1 / w) * layer, (4 + copy) * layer / w)
    return max(built, others + in_flight)


def resident_rows(p: PolicyShape, s: Setup) -> tuple[list[tuple[str, float, str]], float]:
    """What a training process holds all run long, row by row, and its sum."""
    held = held_terms(p, s)
    per = f", decoder layers split over {s.processes} processes" if s.fsdp else ""
    if s.mode == "lora":
        adapters = p.lora_params
        rows = [("weights (frozen, the policy's dtype)", p.params * p.dtype_bytes, f"{count(p.params)} parameters"),
                ("master weights (fp32 adapters)", 4 * adapters, f"{count(adapters)} adapter parameters"),
                *([("earlier stages' adapters (fp32, frozen)", 4 * stage_adapters(p, s),
                    f"{count(stage_adapters(p, s))} parameters"
                    + (", assumed: one stage of this adapter's shape" if s.stage_adapters is None else ""))]
                  if stage_adapters(p, s) else []),
                ("gradients (fp32)", held["gradients"], ""),
                ("optimizer state (AdamW, 2 x fp32)", held["optimizer"], ""),
                ("reference copy", 0, "none: the base with adapters off")]  # fmt: skip
    else:
        note = f"{count(p.trainable_params)} trained, in fp32: the master weights"
        if p.params > p.trainable_params:
            note += f"; {count(p.params - p.trainable_params)} frozen, in the policy's dtype"
        how = "in fp32, as the policy computes"
        if p.dtype_bytes < 4:
            how = ("layers" if s.fsdp else "Linear weights") + " in bf16, embeddings, norms and image head in fp32"
        if p.params > p.trainable_params:
            how += ", frozen weights shared"
        rows = [(f"weights{per}", held["weights"], note), ("gradients (fp32)", held["gradients"], ""),
                ("optimizer state (AdamW, 2 x fp32)", held["optimizer"], ""),
                ("reference copy (frozen)", held["reference"], how if s.beta > 0 else "none: train.beta is 0")]
    if s.processes > 1 and not s.fsdp:
        grads = 4 * (p.lora_params if s.mode == "lora" else p.trainable_params)
        rows.append(("gradient averaging buckets", min(BUCKET_BYTES, grads), "replicated gradients, 256 MB at a time"))
    return rows, sum(b for _, b, _ in rows)
