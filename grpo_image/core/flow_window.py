"""A decoder's denoising loop with a window of stochastic, scored steps: the rollout of decoder GRPO.

Flow-GRPO-Fast's schedule: the loop runs the scheduler's deterministic Euler steps, except for `window` consecutive
steps that start at a random step in the high-noise half (where the image's layout is still being decided), which
take the stochastic step of grpo_image/core/flow.py and keep the latents they start from and their log-probs. The
last step is never in the window (it ends at sigma' = 0, where cps has no noise left to score and low-precision
log-probs are least accurate). Training recomputes the window's log-probs from the stored latents, so only `window`
of the N velocity evaluations need a backward.

Everything random derives from seeds: the window's start from (seed, step), each rollout's noise from its own
generator, so a resumed run draws the same windows and the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from grpo_image.core.flow import sde_step

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents [B, ...], timestep [B]) -> [B, ...]


@dataclass
class WindowRollout:
    """What a decoder rollout keeps for training: its final latents and its window's steps."""

    final: torch.Tensor  # fp32 [B, ...], the latents the decoder turns into the image
    start: int  # the window's first step index
    timesteps: torch.Tensor  # [w], the window's timesteps
    latents: torch.Tensor  # fp32 [B, w + 1, ...]: the latents each window step starts from, and the last one's result
    logprobs: torch.Tensor  # fp32 [B, w]


def window_start(seed: int, step: int, num_steps: int, window: int) -> int:
    """The window's first step: uniform over the high-noise half, the window ending before the last step."""
    last_start = min(num_steps // 2, num_steps - 1 - window)
    if window < 1 or last_start < 0:
        raise ValueError(f"a window of {window} steps does not fit {num_steps} steps with the last one left out")
    return int(np.random.default_rng([seed, step]).integers(0, last_start + 1))


def denoise_with_window(
    scheduler, velocity: Velocity, latents: torch.Tensor, *, start: int, window: int, noise_level: float,
    kind: str, generators: list[torch.Generator],
) -> WindowRollout:
    """Run the scheduler's timesteps from `latents` [B, ...]: Euler steps, stochastic ones in the window."""
    timesteps = scheduler.timesteps
    stored, logprobs = [], []
    x = latents.float()
    for index, timestep in enumerate(timesteps):
        at = timestep.expand(x.shape[0])  # [B]
        with torch.no_grad():
            v = velocity(x, at)  # [B, ...]
        inside = start <= index < start + window
        if inside:
            stored.append(x)
        x, logprob, _, _ = sde_step(  # outside the window: the Euler step exactly (sde at noise level 0)
            scheduler, v, x, at, noise_level=noise_level if inside else 0.0, kind=kind if inside else "sde",
            generator=generators if inside else None,
        )
        if inside:
            logprobs.append(logprob)
            if index == start + window - 1:
                stored.append(x)
    return WindowRollout(final=x, start=start, timesteps=timesteps[start : start + window],
                         latents=torch.stack(stored, dim=1), logprobs=torch.stack(logprobs, dim=1))


def window_step_logprob(
    scheduler, velocity: Velocity, rollout: WindowRollout, k: int, *, noise_level: float, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window step k of the training pass: its log-prob [B] of the stored next latents under `velocity` (with grad),
    its mean [B, ...] and std [B or 1, ...] (for a KL to a reference velocity). Steps are independent terms of the
    loss, so a trainer may run one step's backward before the next step's forward (one step's graph at a time)."""
    x = rollout.latents[:, k]  # [B, ...]
    at = rollout.timesteps[k].expand(x.shape[0])  # [B]
    _, logprob, mean, std = sde_step(scheduler, velocity(x, at), x, at, noise_level=noise_level, kind=kind,
                                     prev_sample=rollout.latents[:, k + 1])
    return logprob, mean, std


def window_logprobs(
    scheduler, velocity: Velocity, rollout: WindowRollout, *, noise_level: float, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every window step's `window_step_logprob`, stacked: [B, w], [B, w, ...], [B or 1, w, ...]."""
    steps = [window_step_logprob(scheduler, velocity, rollout, k, noise_level=noise_level, kind=kind)
             for k in range(len(rollout.timesteps))]  # fmt: skip
    return tuple(torch.stack(parts, dim=1) for parts in zip(*steps))
