"""The decoder's GRPO loss (grpo_image/core/flow_loss.py): its value by hand, and one update on a window."""

from __future__ import annotations

import pytest
import torch

from grpo_image.core.flow_loss import flow_grpo_loss
from grpo_image.core.flow_window import denoise_with_window, window_logprobs
from tests.test_flow import scheduler
from tests.test_flow_window import ToyVelocity, generators, start_latents


def test_the_loss_by_hand():
    old = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])  # [B 2, w 2]
    new = old + torch.tensor([[0.0, 2e-4], [-5e-5, 0.0]])  # ratios 1, e^2e-4 (outside 1e-4), e^-5e-5, 1
    advantages = torch.tensor([1.0, -8.0])  # the second clipped to -5
    loss, stats = flow_grpo_loss(new, old, advantages, clip_range=1e-4, adv_clip=5.0)
    r = torch.exp(new - old)
    # rollout 0 (A = 1): max(-r, -clip(r)) = -min(r, clip(r)): -1 and -(1 + 1e-4); rollout 1 (A = -5): 5 max(r, clip r)
    want = (-1 - (1 + 1e-4) + 5 * r[1, 0] + 5 * 1.0) / 4
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)  # float32 sums of four terms of order 5
    assert stats["clip_frac"] == 0.25  # only the ratio e^2e-4 lies outside 1 +- 1e-4
    kl = torch.full((2, 2), 0.5)
    with_kl, _ = flow_grpo_loss(new, old, advantages, kl=kl, beta=0.1)
    assert with_kl.item() == pytest.approx(loss.item() + 0.05, rel=1e-6)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_one_update_on_a_positive_advantage_raises_its_window_logprobs(kind):
    made, velocity = scheduler(steps=10), ToyVelocity()
    rollout = denoise_with_window(made, velocity, start_latents(1), start=1, window=2, noise_level=0.7, kind=kind,
                                  generators=generators([9]))
    logprobs, _, _ = window_logprobs(made, velocity, rollout, noise_level=0.7, kind=kind)
    loss, stats = flow_grpo_loss(logprobs, rollout.logprobs, torch.tensor([1.0]))
    assert stats["ratio_mean"] == 1.0  # on-policy: the recomputed log-probs are the rollout's exactly
    loss.backward()
    with torch.no_grad():
        for param in velocity.parameters():
            param -= 0.05 * param.grad  # one gradient step, small enough for the first-order change to dominate
    after, _, _ = window_logprobs(made, velocity, rollout, noise_level=0.7, kind=kind)
    gain = (after.detach() - rollout.logprobs).sum()  # the loss is -mean(ratio): its step raises the window's sum
    # well above the fp32 rounding of the two log-probs (ten of their ULPs), which is all a no-op step could show
    assert gain > 10 * 2**-24 * rollout.logprobs.abs().sum(), (after, rollout.logprobs)
