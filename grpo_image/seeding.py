"""Every random draw of a step comes from a seed derived from (master seed, step, stream), never from hidden state.

That is what makes a resumed run continue exactly and what lets any logged rollout be reproduced: the seeds of
step s are a pure function of the recipe's seed and s. Streams separate independent uses within one step.
"""

from __future__ import annotations

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


def minibatch_order(seed: int, step: int, epoch: int, count: int) -> torch.Tensor:
    """A seeded permutation of the N rollouts for one inner epoch: int64 [N]."""
    rng = np.random.default_rng([seed, step, STREAM_MINIBATCH, epoch])
    return torch.from_numpy(rng.permutation(count))
