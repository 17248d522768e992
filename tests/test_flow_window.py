"""The decoder rollout's window (grpo_image/core/flow_window.py): where it falls, what it keeps, what training
recomputes, and that the same seeds give the same rollout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grpo_image.core.flow_window import denoise_with_window, window_logprobs, window_start
from tests.test_flow import scheduler

STEPS, WINDOW = 10, 3


class ToyVelocity(nn.Module):
    """An element-wise velocity field (a row's output depends on that row alone, bit for bit in any batch)."""

    def __init__(self, channels: int = 4):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.scale = nn.Parameter(torch.randn(channels, 1, 1, generator=generator))
        self.bias = nn.Parameter(torch.randn(channels, 1, 1, generator=generator))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = (timestep.float() / 1000).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
        return torch.tanh(x) * self.scale + self.bias * t  # [B, C, H, W]


def start_latents(rows: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 4, 5, 5, generator=torch.Generator().manual_seed(seed))


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def test_the_window_starts_in_the_high_noise_half_and_never_holds_the_last_step():
    starts = {window_start(0, step, STEPS, WINDOW) for step in range(400)}
    assert starts == set(range(0, STEPS // 2 + 1))  # 0..5: every start of the first half, each drawn
    assert max(starts) + WINDOW <= STEPS - 1  # the last step (index 9) stays an Euler step
    assert window_start(0, 7, STEPS, WINDOW) == window_start(0, 7, STEPS, WINDOW)  # a function of (seed, step)
    with pytest.raises(ValueError, match="does not fit"):
        window_start(0, 0, 3, 3)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_only_the_window_is_stochastic_and_stored(kind):
    made, velocity = scheduler(steps=STEPS), ToyVelocity()
    start = 2
    rollout = denoise_with_window(made, velocity, start_latents(), start=start, window=WINDOW, noise_level=0.7,
                                  kind=kind, generators=generators([5, 6, 7]))
    assert rollout.latents.shape == (3, WINDOW + 1, 4, 5, 5) and rollout.logprobs.shape == (3, WINDOW)
    assert torch.equal(rollout.timesteps, made.timesteps[start : start + WINDOW])
    x = start_latents()  # the scheduler's own Euler loop up to the window, and on from the window's end
    with torch.no_grad():
        for index, t in enumerate(made.timesteps):
            if index == start:
                assert torch.equal(rollout.latents[:, 0], x)  # the window starts where the ODE left off
                x = rollout.latents[:, -1]
            if start <= index < start + WINDOW:
                continue
            step = scheduler(steps=STEPS)
            step.set_begin_index(index)
            x = step.step(velocity(x, t.expand(3)), t, x).prev_sample
    assert torch.equal(rollout.final, x)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_training_recomputes_the_windows_logprobs(kind):
    made, velocity = scheduler(steps=STEPS), ToyVelocity()
    rollout = denoise_with_window(made, velocity, start_latents(), start=1, window=WINDOW, noise_level=0.7,
                                  kind=kind, generators=generators([1, 2, 3]))
    logprobs, means, stds = window_logprobs(made, velocity, rollout, noise_level=0.7, kind=kind)
    assert torch.equal(logprobs.detach(), rollout.logprobs)  # the same velocities on the same latents: ratio 1
    assert logprobs.requires_grad and means.shape == (3, WINDOW, 4, 5, 5)
    logprobs.sum().backward()
    assert velocity.scale.grad is not None and velocity.scale.grad.abs().sum() > 0


def test_the_same_seeds_give_the_same_rollout_in_any_batch():
    made, velocity = scheduler(steps=STEPS), ToyVelocity()
    latents, seeds = start_latents(), [11, 12, 13]
    run = lambda x, s: denoise_with_window(made, velocity, x, start=3, window=WINDOW, noise_level=0.7,  # noqa: E731
                                           kind="sde", generators=generators(s))
    whole, again, alone = run(latents, seeds), run(latents, seeds), run(latents[1:2], seeds[1:2])
    assert torch.equal(whole.final, again.final) and torch.equal(whole.logprobs, again.logprobs)
    assert torch.equal(whole.final[1:2], alone.final)  # a rollout's noise is its own generator's
    other = run(latents, [11, 12, 14])
    assert torch.equal(other.final[:2], whole.final[:2]) and not torch.equal(other.final[2], whole.final[2])
