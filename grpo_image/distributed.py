"""Several processes training one policy (`torchrun`/`accelerate launch`): what each rank holds and what they share.

A run with W processes computes exactly what one process computes at the same global batch:

- prompts: rank r holds whole groups (groups r*B/W .. (r+1)*B/W-1 of the step, `GroupSampler`), so a group never
  straddles ranks;
- seeds: every rank derives the seeds of all N rollouts from (seed, step, stream) and keeps its own rows, so
  rollout i gets the same sampling and decode seeds whatever W is;
- advantages: the scores are gathered to every rank before normalising ([N, K] is small), so batch-wide
  statistics (`advantages.scale: batch`) see the whole batch; each rank keeps the advantages of its rows;
- gradients: each rank's loss is the mean over its rows of the minibatch and every rank holds the same number of
  them, so averaging gradients over ranks gives the global minibatch mean. Replicated parameters (all of them
  under DDP; the heads and embeddings under FSDP) are averaged by an all-reduce; FSDP's sharded layers are
  averaged by FSDP's own reduce-scatter;
- metrics: reward metrics come from the gathered scores; train and time metrics are means over ranks; only
  rank 0 writes logs, sample grids and checkpoints.

The process group comes from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
NCCL when CUDA is present, else gloo, so the same code runs two CPU processes in the tests.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from grpo_image.types import ScoredBatch


BUCKET_ELEMENTS = 1 << 26  # gradients per all-reduce: 256 MB in fp32


@dataclass(frozen=True)
class World:
    """This process's place among the W training processes (rank 0 of 1 when launched alone)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def rows(self, total: int) -> slice:
        """This rank's contiguous share of `total` rows (total is divisible by W: preflight checks it)."""
        per_rank = total // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def join_world() -> World:
    """Join the launcher's process group (once); a process started without a launcher is a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" in a recipe means this GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def leave_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(world: World, value):
    """Every rank's `value`, in rank order, on every rank (small things: scores, metrics, error messages)."""
    if not world.distributed:
        return [value]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def gather_rows(world: World, rows: np.ndarray) -> np.ndarray:
    """Concatenate every rank's rows [n, ...] in rank order: [W * n, ...] on every rank."""
    return np.concatenate(gather_objects(world, rows), axis=0)


def mean_over_ranks(world: World, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over ranks (identical keys on every rank)."""
    if not world.distributed:
        return metrics
    every = gather_objects(world, metrics)
    return {key: float(np.mean([m[key] for m in every])) for key in metrics}


def all_ranks_agree(world: World, flag: bool) -> bool:
    """True only if `flag` is true on every rank (e.g. a finite loss everywhere)."""
    if not world.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)


def average_replicated_gradients(world: World, params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters every rank holds whole, a few all-reduces of flat buckets.

    Sharded (FSDP) parameters are left alone: FSDP has already averaged their gradients. Buckets bound the extra
    memory of the flat copies (a replicated full model's gradients are not copied all at once).
    """
    if not world.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None and not _is_sharded(p.grad)]
    bucket: list[torch.Tensor] = []
    for index, grad in enumerate(grads):
        bucket.append(grad)
        if index == len(grads) - 1 or sum(g.numel() for g in bucket) >= BUCKET_ELEMENTS:
            _all_reduce_mean(world, bucket)
            bucket = []


def _all_reduce_mean(world: World, grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])  # [sum of numels]
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def clip_gradients(world: World, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` and return it (the same value on every rank).

    Replicated gradients count once; the shards of FSDP parameters are summed over ranks.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not any(_is_sharded(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    sharded = torch.zeros((), dtype=torch.float32)
    replicated = torch.zeros((), dtype=torch.float32)
    for grad in grads:
        if _is_sharded(grad):
            sharded += grad.to_local().float().pow(2).sum().cpu()
        else:
            replicated += grad.float().pow(2).sum().cpu()
    dist.all_reduce(sharded)
    total = (sharded + replicated).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        (grad.to_local() if _is_sharded(grad) else grad).mul_(scale.to(grad.device))
    return total


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def gather_scored(world: World, scored: ScoredBatch) -> ScoredBatch:
    """The whole batch's scores [N, K] on every rank, counts summed and the slowest worker's time; thumbnails stay
    this rank's (rank 0's rows are the batch's first rows, so its thumbnail indices hold for the whole batch)."""
    if not world.distributed:
        return scored
    every = gather_objects(world, (scored.scores, scored.nan_counts, scored.info, scored.worker_seconds))
    return dataclasses.replace(
        scored,
        scores=np.concatenate([part[0] for part in every], axis=0),  # [N, K]
        nan_counts=_summed([part[1] for part in every]),
        info=_summed([part[2] for part in every]),
        worker_seconds=max(part[3] for part in every),
    )


def _summed(counts: list[dict]) -> dict:
    total: dict = {}
    for part in counts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total
