"""The memory plan as a user reads it: a table per GPU, whether it fits, and which keys to change when it does not.

`grpo-image plan RECIPE` prints `format_plan`; `grpo-image validate` prints `fit_warning` when the recipe names its
hardware (`hardware.gpus`) and does not fit it.
"""

from __future__ import annotations

import textwrap
from dataclasses import replace

from grpo_image.planning.decoder_training import largest_decoder_batch
from grpo_image.planning.memory_plan import GIB, USABLE, Plan, rollout_bytes, update_bytes
from grpo_image.planning.resident_memory import count, held_terms, resident_rows, startup_bytes
from grpo_image.planning.resume_plan import resume_rows

LABEL = 72  # width of the label column
LINE = 118


def size(value: float) -> str:
    """Bytes as a person reads them: 12.3 GiB, 45.6 MiB, 7.0 KiB."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, LINE, subsequent_indent="    ")


def _table(title: str, rows: list[tuple[str, float, str]], scale: float, unit: str) -> list[str]:
    lines = [f"  {title:<{LABEL}}{unit:>9}"]
    for label, value, note in rows:
        shown = "-" if value == 0 else f"{value / scale:.2f}" if value < 10 * scale else f"{value / scale:.1f}"
        lines.append(f"    {label:<{LABEL - 2}}{shown:>9}  {note}".rstrip())
    return lines


def format_plan(plan: Plan) -> str:
    """The whole plan: the policy and the step, a table per training GPU and per reward actor, advice."""
    s, p = plan.setup, plan.policy
    scale, unit = (GIB, "GiB") if max(plan.peak, plan.worker_peak) >= GIB else (2**20, "MiB")
    processes = f"{s.processes} training process{'es' if s.processes > 1 else ''}"
    dtype = "bf16" if p.dtype_bytes == 2 else "fp32"
    lines = _wrap(
        f"{plan.recipe}: {processes}{'' if s.stated else ' (hardware.gpus not set)'}, {s.gpu_gib:g} GB per GPU, of "
        f"which {USABLE:.0%} is planned for ({size(plan.usable)}; the rest: CUDA context, library workspaces, "
        "allocator fragmentation)"
    )
    lines += _wrap(
        f"policy: {count(p.params)} parameters ({p.source}); {p.layers} layers, hidden {p.hidden}, {p.heads} heads and "
        f"{p.kv_heads} KV heads of {p.head_dim}, MLP {p.intermediate}; {dtype}; L = {p.positions:,} codes of "
        f"{p.codes:,}; P = {p.prompt_tokens} prompt tokens ({p.prompt_note})"
    )
    lines += _wrap(
        f"step: {s.rollouts} rollouts per process; sampler calls of {s.sampler_rows} rows"
        f"{' (2 per sample: CFG)' if s.cfg_rows == 2 else ''}; minibatches of {s.minibatch}, micro-batches of "
        f"{s.micro}{' (x2 rows: the guidance mixture)' if s.mix_rows == 2 else ''}, gradient checkpointing "
        f"{'on' if s.checkpointing else 'off'}; image head chunks of {s.chunk} positions"
    )
    mode = f"train.mode {s.mode}{', FSDP' if s.fsdp else ''}"
    lines += [""] + _table(f"per training GPU ({mode})", plan.rows, scale, unit)
    phases = ", ".join(f"{name} {value / scale:.1f}" for name, value in plan.phases.items())
    verdict = "fits" if plan.peak <= plan.usable else "DOES NOT FIT"
    off, on = plan.largest_micro[False], plan.largest_micro[True]
    lines += [f"  peak by phase ({unit}): {phases} -> {verdict} in {plan.usable / scale:.1f}",
              f"  largest that fit: sampling.batch_size {plan.largest_sampler_rows} rows; train.micro_batch_size "
              f"{off} without gradient checkpointing, {on} with"]  # fmt: skip
    lines += _worker_lines(plan, scale, unit)
    lines += _resume_lines(plan)
    advice = plan_advice(plan)
    if advice:
        lines += ["", "to fit:"] + [line for item in advice for line in _wrap(f"  - {item}")]
    return "\n".join(lines)


def _worker_lines(plan: Plan, scale: float, unit: str) -> list[str]:
    d, budget = plan.decoder, plan.worker_budget
    if budget is not None:
        title = f"per reward actor (workers.num_gpus: {budget / plan.setup.gpu_gib / GIB:g} of a GPU)"
    else:
        title = "decoder and rewards (CPU reward actors, or the trainer's own GPU: in-process)"
    lines = [""] + _table(title, plan.worker_rows, scale, unit)
    notes = [d.note] if d.note else []
    if plan.unknown_rewards:
        notes.append(f"not counted: the models of rewards {', '.join(plan.unknown_rewards)}")
    lines += [line for note in notes for line in _wrap(f"  ({note})")]
    if budget is not None:
        usable = USABLE * budget
        verdict = "fits" if plan.worker_peak <= usable else "DOES NOT FIT"
        largest = ("the decoder is the trainer's (decoder GRPO)" if plan.decoder_train is not None
                   else f"largest decoder.max_batch_size that fits: {plan.largest_decode}")
        lines.append(f"  peak {plan.worker_peak / scale:.1f} -> {verdict} in {usable / scale:.1f}; {largest}")
    return lines


def _resume_lines(plan: Plan) -> list[str]:
    """The checkpoint's size and the host memory (not the GPU's) a resume needs, per process and per node."""
    rows = resume_rows(plan.policy, plan.setup, plan.decoder_train.adapters if plan.decoder_train else 0)
    scale, unit = (GIB, "GiB") if max(b for _, b, _ in rows) >= GIB else (2**20, "MiB")
    return [""] + _table("checkpoints and resume (disk and host memory)", rows, scale, unit)


def plan_advice(plan: Plan) -> list[str]:
    """What to change, phase by phase, when the plan does not fit (empty when it does)."""
    s, usable, advice = plan.setup, plan.usable, []
    if plan.resident > usable:
        line = f"what a training process holds all run long needs {size(plan.resident)}"
        processes = smallest_fsdp(plan) if s.mode == "full" else None
        if processes:
            return [f"{line}: shard it with train.fsdp=true over at least {processes} processes (hardware.gpus), "
                    "or use train.mode=lora"]  # fmt: skip
        return [f"{line}: use train.mode=lora"]
    too_few = "even one row per micro-batch does not fit: lower train.logprob_chunk"
    if plan.phases["start-up"] > usable:
        advice.append(f"start-up: building the weights and the reference needs {size(plan.phases['start-up'])}: "
                      "shard over more processes (train.fsdp=true, hardware.gpus)")  # fmt: skip
    if plan.phases["rollout"] > usable:
        rows = plan.largest_sampler_rows
        advice.append(f"rollouts: set sampling.batch_size <= {rows} (rows per sampler call)" if rows
                      else "rollouts: even one sample per sampler call does not fit")  # fmt: skip
    if max(plan.phases.get("update", 0), plan.phases.get("reference", 0)) > usable:
        off, on = plan.largest_micro[False], plan.largest_micro[True]
        if s.checkpointing or not off:
            advice.append(f"update: set train.gradient_checkpointing=true and train.micro_batch_size <= {on}" if on
                          else f"update: {too_few}")  # fmt: skip
        else:
            advice.append(f"update: set train.micro_batch_size <= {off}, or train.gradient_checkpointing=true with "
                          f"train.micro_batch_size <= {on}")  # fmt: skip
    if plan.worker_budget is not None and plan.worker_peak > USABLE * plan.worker_budget:
        advice.append(f"reward actors: set decoder.max_batch_size <= {plan.largest_decode}" if plan.largest_decode else
                      "reward actors: their models alone do not fit: give each more of a GPU (workers.num_gpus), or "
                      "precompute the prompt embeddings (decoder.text_encoder: a .safetensors file)")  # fmt: skip
    if plan.decoder_train is not None:
        advice += decoder_advice(plan)
    if "decode" in plan.phases and plan.phases["decode"] > usable:
        advice.append("decoding in the trainer's process: use workers.backend=ray with actors on their own GPUs")
    return advice


def decoder_advice(plan: Plan) -> list[str]:
    """The keys that shrink decoder GRPO's phases: the DiT's gradient checkpointing, decodes per decoder batch (the
    decoder's max_batch_size), one pass instead of two (decoder_train.guidance_scale 1), a smaller adapter rank. The
    window is not among them: its steps run their forward and backward one at a time."""
    dt, advice = plan.decoder_train, []
    if plan.phases["decoder rollout"] > plan.usable:
        advice.append(f"decoder rollouts: {size(plan.phases['decoder rollout'])} with the window latents of "
                      f"this process's decodes: lower decoder.max_batch_size, or use more processes (hardware.gpus)")
    if plan.phases["decoder update"] > plan.usable:
        largest = largest_decoder_batch(plan, dt.checkpointing)
        keys = [f"set decoder.max_batch_size <= {largest}" if largest else "even one decode per decoder batch "
                "does not fit"]  # fmt: skip
        if not dt.checkpointing:
            on = largest_decoder_batch(plan, True)
            keys.append("decoder_train.gradient_checkpointing=true (each DiT block keeps only its input)"
                        + (f" with decoder.max_batch_size <= {on}" if on else ""))
        if dt.guided:
            keys.append("decoder_train.guidance_scale=1 (one transformer pass a step instead of two)")
        keys.append(f"a smaller decoder_train.lora.r (now {dt.lora_r}: adapters, their gradients and AdamW, and "
                    "their fp32 activations)")
        advice.append(f"decoder update: one window step's forward and backward of {dt.batch} decodes needs "
                      f"{size(dt.update)}: {'; or '.join(keys)}")
    return advice


def smallest_fsdp(plan: Plan, most: int = 256) -> int | None:
    """The fewest FSDP processes with which full fine-tuning fits with its smallest batches (None: not even `most`)."""
    p, s = plan.policy, plan.setup
    for processes in range(2, most + 1):
        sharded = replace(s, processes=processes, fsdp=True)
        _, resident = resident_rows(p, sharded)
        smallest = max(rollout_bytes(p, sharded, s.cfg_rows), update_bytes(p, sharded, 1, True))
        startup = startup_bytes(p, sharded, held_terms(p, sharded))
        if max(resident + smallest, startup) <= plan.usable:
            return processes
    return None


def fit_warning(plan: Plan) -> str | None:
    """One line for `grpo-image validate` when the recipe does not fit the hardware it names, else None."""
    if plan.fits:
        return None
    s = plan.setup
    if plan.peak > plan.usable:
        worst = max(plan.phases, key=plan.phases.get)
        need = f"its {worst} phase needs {size(plan.peak)} per training GPU, {size(plan.usable)} usable"
    else:
        need = f"a reward actor needs {size(plan.worker_peak)}, {size(USABLE * plan.worker_budget)} usable"
    return (f"{plan.recipe} does not fit the {s.processes} x {s.gpu_gib:g} GB GPUs of its hardware section: {need}; "
            f"{'; '.join(plan_advice(plan))} (`grpo-image plan {plan.recipe}` shows every term)")
