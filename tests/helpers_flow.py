"""One Flow-GRPO update on a single positive-advantage rollout, for each family's decoder tests."""

from __future__ import annotations

import torch

from grpo_image.core.flow_loss import flow_grpo_loss
from grpo_image.core.flow_window import window_logprobs


def assert_one_update_raises_the_window(scheduler, velocity, rollout, transformer, adapters, adapted: set[str]):
    """The training pass recomputes the rollout's window log-probs exactly (guidance included); one SGD step on
    Flow-GRPO's loss with advantage +1 raises them and moves only the adapters (`adapted`: their names)."""
    before = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    logprobs, _, _ = window_logprobs(scheduler, velocity, rollout, noise_level=0.7, kind="sde")
    loss, stats = flow_grpo_loss(logprobs, rollout.logprobs, torch.tensor([1.0]))
    assert stats["ratio_mean"] == 1.0  # guidance recomputed in training equals sampling's: on-policy exactly
    loss.backward()
    torch.optim.SGD(adapters, lr=1.0).step()  # per-element mean log-probs: their gradients are small
    after, _, _ = window_logprobs(scheduler, velocity, rollout, noise_level=0.7, kind="sde")
    # ten fp32 ULPs of the window's log-probs: more than a no-op step's rounding could show
    gain = (after.detach() - rollout.logprobs).sum()
    assert gain > 10 * 2**-24 * rollout.logprobs.abs().sum()
    moved = {n for n, p in transformer.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= adapted  # only adapter parameters changed
