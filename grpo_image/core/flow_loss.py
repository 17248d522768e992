"""The decoder's GRPO loss over its window steps, as Flow-GRPO computes it.

Per window step k of rollout i: the ratio r = exp(logp - logp_old) of the step's log-probs (grpo_image/core/flow.py,
per-element means), the advantage clipped to [-adv_clip, adv_clip], and PPO's pessimistic objective
max(-A r, -A clip(r, 1 - eps, 1 + eps)), averaged over rollouts and window steps; plus beta times the KL of the
step's mean to the reference decoder's (adapters off). The defaults are flow_grpo's (config/base.py: clip_range 1e-4,
adv_clip_max 5, beta 0): its ratios are of per-element mean log-probs, so a clip range of 1e-4 there is not the AR
policy's 0.2.
"""

from __future__ import annotations

import torch

FLOW_GRPO_CLIP = 1e-4  # flow_grpo config/base.py, train.clip_range
FLOW_GRPO_ADV_CLIP = 5.0  # flow_grpo config/base.py, train.adv_clip_max


def flow_grpo_loss(
    logprobs: torch.Tensor,  # [B, w], with grad
    old_logprobs: torch.Tensor,  # [B, w], the rollout's
    advantages: torch.Tensor,  # [B]
    *,
    clip_range: float = FLOW_GRPO_CLIP,
    adv_clip: float = FLOW_GRPO_ADV_CLIP,
    kl: torch.Tensor | None = None,  # [B, w], per step (grpo_image.core.flow.step_kl)
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss (a scalar) and its parts for logging: policy loss, KL, clipped fraction, mean ratio."""
    advantage = advantages.float().clamp(-adv_clip, adv_clip).unsqueeze(1)  # [B, 1]
    ratio = torch.exp(logprobs.float() - old_logprobs.float())  # [B, w]
    unclipped = -advantage * ratio  # [B, w]
    clipped = -advantage * ratio.clamp(1 - clip_range, 1 + clip_range)  # [B, w]
    policy_loss = torch.maximum(unclipped, clipped).mean()
    kl_mean = kl.float().mean() if kl is not None else torch.zeros((), device=logprobs.device)
    loss = policy_loss + beta * kl_mean if beta else policy_loss
    with torch.no_grad():
        stats = {"policy_loss": policy_loss.item(), "kl": kl_mean.item(),
                 "clip_frac": ((ratio - 1).abs() > clip_range).float().mean().item(), "ratio_mean": ratio.mean().item()}
    return loss, stats
