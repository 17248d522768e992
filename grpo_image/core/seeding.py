"""Every random draw of a step comes from a seed derived from (master seed, step, stream), never from hidden state.

That is what makes a resumed run continue exactly and what lets any logged rollout be reproduced: the seeds of
step s are a pure function of the recipe's seed and s. Streams separate independent uses within one step.
"""

from __future__ import annotations

import math

import numpy as np
import torch

STREAM_SAMPLE = 0  # per-rollout sampling seeds
STREAM_DECODE = 1  # per-rollout decoder seeds
STREAM_MINIBATCH = 2  # minibatch order of the update
STREAM_EVAL_SAMPLE = 16  # images sampled outside training (`sample`, `eval`): (seed, prompt id) instead of (seed, step)
STREAM_EVAL_DECODE = 17


def derive_seeds(seed: int, step: int, stream: int, count: int) -> torch.Tensor:
    """`count` independent 63-bit seeds for (seed, step, stream): int64 [count]."""
    words = np.random.SeedSequence([seed, step, stream]).generate_state(count, dtype=np.uint64)  # [count]
    return torch.from_numpy((words >> np.uint64(1)).astype(np.int64))


def decode_seeds(seed: int, step: int, group_size: int, count: int, per: str = "rollout") -> torch.Tensor:
    """The decoder's seed of each of a step's `count` rollouts (groups of `group_size`, contiguous): int64 [count].

    per "rollout": each its own; "group": every rollout of a group takes its group's first seed, so that a diffusion
    decoder adds the same noise to all of them and only their codes tell them apart.
    """
    seeds = derive_seeds(seed, step, STREAM_DECODE, count)  # [count]
    if per == "rollout":
        return seeds
    if per != "group":
        raise ValueError(f"decoder seeds are per 'rollout' or per 'group', got {per!r}")
    return seeds[::group_size].repeat_interleave(group_size)  # [count]


def minibatch_order(
    *, seed: int, step: int, epoch: int, group_size: int, minibatches: int, first_row: int, count: int
) -> torch.Tensor:
    """Rows first_row .. first_row+count-1 of the batch, ordered minibatch after minibatch: int64 [count] of
    indices relative to first_row; `order.split(count // minibatches)` gives this range's part of each minibatch.

    The batch is cut into blocks of whole groups, each the fewest rows (lcm(G, M)) that split evenly into the M
    minibatches; a seeded permutation of each block deals its rows out, block/M to every minibatch. A block's draw
    depends on (seed, step, epoch, block index) only, so a rank holding rows a..b of the batch computes exactly
    its rows of the minibatches one process would use, and every rank holds the same number of them (which is
    what makes averaging gradients over ranks equal the single-process minibatch mean).
    """
    block = math.lcm(group_size, minibatches)
    if first_row % block or count % block:
        raise ValueError(
            f"rows {first_row}..{first_row + count - 1} are not whole blocks of lcm(G={group_size}, "
            f"minibatches={minibatches}) = {block} rows"
        )
    perms = np.stack([
        np.random.default_rng([seed, step, STREAM_MINIBATCH, epoch, start // block]).permutation(block)
        + (start - first_row)
        for start in range(first_row, first_row + count, block)
    ])  # [count / block, block]
    share = block // minibatches
    order = perms.reshape(len(perms), minibatches, share).transpose(1, 0, 2).reshape(-1)  # [count]
    return torch.from_numpy(order)
