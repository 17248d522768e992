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
  rank 0 writes logs and sample grids; every rank writes its shard of a checkpoint (grpo_image/training/checkpoint.py).

The process group comes from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
NCCL when CUDA is present, else gloo, so the same code runs two CPU processes in the tests. The World owns the
device every collective's tensors live on (NCCL takes CUDA tensors only); replicas are broadcast from rank 0 at
start, so they are equal however each process initialised them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from grpo_image.core.types import ScoredBatch


BUCKET_ELEMENTS = 1 << 26  # gradients per all-reduce: 256 MB in fp32


@dataclass(frozen=True)
class World:
    """This process's place among the W training processes (rank 0 of 1 when launched alone), and its device.

    `device` is where this process trains (its GPU, cuda:LOCAL_RANK, when CUDA is present; else the CPU) and the
    device of every tensor handed to a collective: NCCL accepts CUDA tensors only. `collective_tensor` is the one
    place tensors for collectives are made and checked.
    """

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    process_group: bool | None = None  # collectives run through torch.distributed (default: when size > 1)

    def __post_init__(self) -> None:
        if self.process_group is None:
            object.__setattr__(self, "process_group", self.size > 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether collectives go through a process group (also a group of one, as the GPU check runs NCCL)."""
        return self.process_group

    def rows(self, total: int) -> slice:
        """This rank's contiguous share of `total` rows (total is divisible by W: preflight checks it)."""
        per_rank = total // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def collective_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` checked to be on this world's device before it reaches a collective (a clear error, not NCCL's)."""
        if tensor.device != self.device:
            raise RuntimeError(
                f"a collective got a tensor on {tensor.device} but the process group's device is {self.device}"
            )
        return tensor


def training_device() -> torch.device:
    """This process's GPU when CUDA is present (LOCAL_RANK picks it among the node's GPUs), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def join_world() -> World:
    """Join the launcher's process group (once); a process started without a launcher is a world of one."""
    device = training_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def leave_world(world: World) -> None:
    """Tear the process group down once every rank is here: a rank that left first would close the connections
    under a peer's last collective, and gloo aborts that peer ("terminate called without an active exception")."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_from_rank0(world: World, module: torch.nn.Module) -> None:
    """Every rank's parameters and buffers become rank 0's, so replicas start equal however each was initialised
    (a seed that differs, an adapter initialised from another RNG state). Called before any sharding."""
    if not world.distributed:
        return
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.numel()]
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        for bucket in _buckets([t for t in tensors if t.dtype == dtype]):
            flat = world.collective_tensor(torch.cat([t.detach().reshape(-1) for t in bucket]))  # [sum of numels]
            dist.broadcast(flat, src=0)
            _unflatten_into(flat, [t.data for t in bucket])


def broadcast_in_place_from_rank0(world: World, tensors: list[torch.Tensor]) -> None:
    """`tensors` become rank 0's, each received in its own storage (a tensor listed twice, a tied weight, once).

    One collective per tensor and no flat copy: FSDP's start-up sends a layer's tensors just before sharding them and
    needs no memory beyond the layer itself (a flat bucket would also be freed only when the backend lets it go).
    """
    if not world.distributed:
        return
    for tensor in {id(t): t for t in tensors if t.numel()}.values():
        dist.broadcast(world.collective_tensor(tensor.detach()), src=0)


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
    value = world.collective_tensor(torch.tensor([1.0 if flag else 0.0], device=world.device))
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)


def average_replicated_gradients(world: World, params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters every rank holds whole, a few all-reduces of flat buckets.

    Why not DDP: DDP's reducer hooks the forward of the module it wraps, but the policy's forward is the decoder
    and then a row slice of the head's weight (`image_logits`), and the sampler and reference passes run the same
    modules without gradients; averaging after the backward is the same mean with none of those constraints.
    Sharded (FSDP) parameters are left alone: FSDP has already averaged their gradients. Buckets bound the extra
    memory of the flat copies (a replicated full model's gradients are not copied at once).
    """
    if not world.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None and not _is_sharded(p.grad)]
    for bucket in _buckets(grads):
        flat = world.collective_tensor(torch.cat([g.reshape(-1) for g in bucket]))  # [sum of numels]
        dist.all_reduce(flat)
        flat /= world.size
        _unflatten_into(flat, bucket)


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive groups of at least BUCKET_ELEMENTS elements (the last one smaller)."""
    buckets, bucket = [], []
    for index, tensor in enumerate(tensors):
        bucket.append(tensor)
        if index == len(tensors) - 1 or sum(t.numel() for t in bucket) >= BUCKET_ELEMENTS:
            buckets.append(bucket)
            bucket = []
    return buckets


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def apply_update(world: World, params: list[torch.nn.Parameter], optimizer, max_norm: float, finite: bool,
                 before_step=None) -> tuple[float, bool]:
    """Finish a minibatch's update: average the replicated gradients, clip the global norm, and step the optimizer
    only if every rank's loss and gradient were finite (else drop the gradients: a non-finite update would poison the
    weights and Adam's moments). `before_step` runs just before the step. Returns (gradient norm, applied)."""
    average_replicated_gradients(world, params)
    grad_norm = clip_gradients(world, params, max_norm)
    applied = all_ranks_agree(world, finite and bool(torch.isfinite(grad_norm)))
    if applied:
        if before_step is not None:
            before_step()
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), applied


def clip_gradients(world: World, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` and return it (the same value on every rank).

    Replicated gradients count once; the shards of FSDP parameters are summed over ranks.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not any(_is_sharded(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    sharded = torch.zeros((), dtype=torch.float32, device=world.device)
    replicated = torch.zeros((), dtype=torch.float32, device=world.device)
    for grad in grads:
        if _is_sharded(grad):
            sharded += grad.to_local().float().pow(2).sum()
        else:
            replicated += grad.float().pow(2).sum()
    dist.all_reduce(world.collective_tensor(sharded))
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
    every = gather_objects(world, (scored.scores, scored.info, scored.worker_seconds))
    return dataclasses.replace(
        scored,
        scores=np.concatenate([part[0] for part in every], axis=0),  # [N, K]
        info=_summed([part[1] for part in every]),
        worker_seconds=max(part[2] for part in every),
    )


def _summed(counts: list[dict]) -> dict:
    total: dict = {}
    for part in counts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total
