"""What the loop writes between steps, and what it does when a step fails.

A checkpoint after step s holds, besides the weights and optimizer, torch's RNG state and, with `workers.prefetch`,
the rollouts already sampled for step s + 1, which a resumed run must score instead of sampling again. A step either
completes or is never saved as completed (docs/algorithm.md, "When a step fails"): a reward failure happens before
any update, so the state after s - 1 is saved; any other failure saves it only if no optimizer step of s has run,
and says which checkpoint on disk `resume=` continues from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from grpo_image.training.checkpoint import (
    CHECKPOINTS, PREFIX, SIZES_ONLY, CheckpointError, find_checkpoint, save_checkpoint,
)
from grpo_image.training.distributed import gather_rows

if TYPE_CHECKING:
    from grpo_image.training.train import Trainer


class TrainingStopped(RuntimeError):
    """The run stopped cleanly: the message says why and where the last checkpoint is."""


@dataclass(frozen=True)
class StepStart:
    """What a checkpoint after a step holds besides the weights: torch's RNG, and rollouts already sampled for the
    next step (workers.prefetch), which a resumed run must score instead of sampling them again."""

    rng_state: torch.Tensor
    prefetched: tuple | None


def save_step(trainer: Trainer, run_dir: Path, step: int, state: StepStart) -> Path:
    return save_checkpoint(
        run_dir, step, trainer.weights, trainer.optimizer, trainer.scheduler, trainer.cfg,
        trainer.cfg.keep_checkpoints, prefetched=prefetched_tensors(trainer, state.prefetched, step + 1),
        world=trainer.world, timeout_s=trainer.cfg.checkpoint_timeout_s, rng_state=state.rng_state,
        loop_state={"health": trainer.health.state()}, decoder=trainer.decoder,
    )


def stop_cleanly(trainer: Trainer, run_dir: Path, step: int, before: StepStart, why: str):
    """Stop before `step` changed anything: checkpoint the state after step - 1 (unless it is on disk) and say so."""
    trainer.pool.close()
    raise TrainingStopped(f"{why}. Stopped: {checkpoint_before(trainer, run_dir, step, before)}")


def crash(trainer: Trainer, run_dir: Path, step: int, before: StepStart, err: Exception):
    """Any other failure of `step`. Once an optimizer step of `step` has run, the weights are half-way between two
    steps and are never saved; before that, they are the state after step - 1 and are checkpointed as such.
    An out-of-memory error stops with the phase that ran out and the recipe keys that shrink it; anything else
    is re-raised (its traceback is a bug report) with a note saying where the run can resume from."""
    phase = trainer.phase or "between phases"
    if trainer.moved_in_step == step:
        where = f"the update of step {step} had begun, so nothing was saved; {resume_hint(trainer, run_dir)}"
    elif trainer.world.distributed:
        where = f"nothing was saved (other processes may still be running); {resume_hint(trainer, run_dir)}"
    else:
        where = checkpoint_before(trainer, run_dir, step, before)
    try:
        trainer.pool.close()
    except Exception:  # the pool may be what failed; the note below matters more than its cleanup
        pass
    if is_out_of_memory(err):
        raise TrainingStopped(
            f"step {step} ran out of memory in phase '{phase}': {str(err).splitlines()[0]}. {SHRINK[phase]}. "
            f"Stopped: {where}"
        ) from err
    err.add_note(f"grpo-image: step {step} failed in phase '{phase}'. {where}")
    raise err


SHRINK = {
    "rollout": "Sample fewer rows at once: lower sampling.batch_size",
    "reference": "Compute fewer rows at once: lower train.micro_batch_size (or train.logprob_chunk)",
    "old log-probs": "Compute fewer rows at once: lower train.micro_batch_size (or train.logprob_chunk)",
    "decode and rewards": "Decode fewer images at once: lower the decoder's max_batch_size, or raise workers.chunks",
    "decoder rollouts": "Decode fewer images at once: lower the decoder's max_batch_size",
    "decoder update": "Decode fewer images at once (the decoder's max_batch_size: one decoder batch per backward), or "
                      "set decoder_train.guidance_scale 1 (one pass instead of two)",
    "update": "Lower train.micro_batch_size, turn on train.gradient_checkpointing, or lower train.logprob_chunk",
    "between phases": "See `grpo-image plan` for what the recipe needs",
}


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's, also when raised inside a Ray reward worker."""
    cause = getattr(err, "cause", None)  # a RayTaskError carries the worker's exception
    if cause is not None and cause is not err and is_out_of_memory(cause):
        return True
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def checkpoint_before(trainer: Trainer, run_dir: Path, step: int, before: StepStart) -> str:
    """Checkpoint the state after step - 1 when it is not on disk already; say where the run resumes from."""
    last = step - 1
    if last > trainer.start_step and not (run_dir / CHECKPOINTS / f"{PREFIX}{last:06d}").is_dir():
        return f"checkpoint {save_step(trainer, run_dir, last, before)}; continue with resume={run_dir}"
    return resume_hint(trainer, run_dir)


def resume_hint(trainer: Trainer, run_dir: Path) -> str:
    """Which checkpoint on disk a resumed run would continue from (by the files' sizes: no checkpoint is re-read)."""
    for folder in (run_dir, trainer.cfg.resume):
        if folder:
            try:
                return f"resume={folder} continues from {find_checkpoint(folder, hashed=SIZES_ONLY)}"
            except CheckpointError:
                continue
    return "no checkpoint is on disk, so there is nothing to resume"


def prefetched_tensors(trainer: Trainer, prefetched: tuple | None, step: int) -> dict[str, torch.Tensor] | None:
    """The whole batch's rollouts prefetched for `step` (gathered from every rank), so any number of ranks resume."""
    if prefetched is None or prefetched[0] != step:
        return None
    rollout, world = prefetched[1], trainer.world
    return {
        "codes": torch.from_numpy(gather_rows(world, rollout.codes.cpu().numpy())),  # [N, L]
        "old_logprobs": torch.from_numpy(gather_rows(world, rollout.old_logprobs.cpu().numpy())),  # [N, L]
        "filtered_mass": torch.from_numpy(gather_rows(world, rollout.filtered_mass.cpu().numpy())),  # [N, L]
    }
