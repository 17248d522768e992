"""GRPO loss: PPO-clip with asymmetric bounds, k3 KL to a reference policy, token mean.

Per token (N rollouts x L image codes, every rollout has exactly L codes, so no padding mask):

    ratio     = exp(logp - old_logp)                      behaviour policy -> current policy
    objective = min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    k3        = exp(ref - logp) - (ref - logp) - 1        Schulman's k3: >= 0, unbiased for KL(policy || ref)
    loss      = -mean(objective) + beta * mean(k3)        means over all N * L tokens

With truncated importance sampling (`train.tis_cap` C > 0; docs/algorithm.md, "Behaviour and training log-probs"),
old_logp is the trainer's own recomputation of the rollout policy, and each token's objective is weighted by
w = min(exp(old_logp - behaviour_logp), C), a constant (no gradient), as TRL's and verl's token-level TIS do:

    objective = w * min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)

The min makes the clip one-sided: a token is clipped (gets no gradient) only when moving further would
help the objective beyond the trust region, i.e. A > 0 and ratio > 1 + eps_high, or A < 0 and
ratio < 1 - eps_low. Separate bounds allow DAPO's "clip-higher" (eps_high > eps_low).
"""

from __future__ import annotations

import math

import torch


def _check_shapes(
    logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor
) -> None:
    """Fail with the offending argument's name and shape instead of a broadcast surprise."""
    if logp.ndim != 2 or logp.numel() == 0:
        raise ValueError(f"grpo_loss: logp must be non-empty 2-D [N, L], got shape {tuple(logp.shape)}")
    if old_logp.shape != logp.shape:
        raise ValueError(
            f"grpo_loss: old_logp shape {tuple(old_logp.shape)} != logp shape {tuple(logp.shape)}"
        )
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(
            f"grpo_loss: ref_logp shape {tuple(ref_logp.shape)} != logp shape {tuple(logp.shape)}"
        )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"grpo_loss: advantages must be [N] = [{logp.shape[0]}], got shape {tuple(advantages.shape)}"
        )


def truncated_is_weights(trainer_old: torch.Tensor, behaviour: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token weights min(exp(trainer_old - behaviour), cap) [N, L]: how much more (or less) likely the trainer's
    own computation of the rollout policy finds each sampled code than the sampler did, truncated at `cap`."""
    if not cap > 0:
        raise ValueError(f"truncated importance sampling needs a cap > 0, got {cap}")
    return torch.exp(trainer_old - behaviour).clamp(max=cap)  # [N, L]


def truncated_is_stats(trainer_old: torch.Tensor, behaviour: torch.Tensor, cap: float) -> dict[str, float]:
    """The step's truncated importance weights: their mean (tis/weight_mean) and the share of codes whose ratio
    exceeded the cap (tis/capped_frac)."""
    weights = truncated_is_weights(trainer_old, behaviour, cap)  # [N, L]
    capped = (trainer_old - behaviour) > math.log(cap)  # [N, L]
    return {"tis/weight_mean": float(weights.mean()), "tis/capped_frac": float(capped.float().mean())}


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    beta: float,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss (with grad through logp) and python-float stats.

    logp, old_logp, ref_logp: [N, L]; ref_logp may be None only when beta == 0 (reference pass skipped).
    advantages: [N], one per rollout, shared by its L tokens.
    is_weights: [N, L] truncated importance weights (`truncated_is_weights`), or None for none.
    Stats: loss, policy_loss, kl (token-mean k3; 0.0 without a reference), clip_frac, ratio_mean, ratio_max.
    """
    _check_shapes(logp, old_logp, ref_logp, advantages)
    if is_weights is not None and is_weights.shape != logp.shape:
        raise ValueError(f"grpo_loss: is_weights shape {tuple(is_weights.shape)} != logp shape {tuple(logp.shape)}")
    if ref_logp is None and beta != 0:
        raise ValueError(f"grpo_loss: beta={beta} needs ref_logp; pass reference log-probs or set beta to 0")
    if not (0 <= clip_eps_low < 1 and clip_eps_high >= 0 and beta >= 0):
        raise ValueError(
            "grpo_loss: need 0 <= clip_eps_low < 1, clip_eps_high >= 0 and beta >= 0, got "
            f"clip_eps_low={clip_eps_low}, clip_eps_high={clip_eps_high}, beta={beta}"
        )

    adv = advantages.to(device=logp.device, dtype=logp.dtype).unsqueeze(1)  # [N, 1]
    ratio = torch.exp(logp - old_logp.detach())  # [N, L]
    unclipped = ratio * adv  # [N, L]
    clipped = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * adv  # [N, L]
    objective = torch.minimum(unclipped, clipped)  # [N, L]
    if is_weights is not None:
        objective = is_weights.detach().to(objective.dtype) * objective
    policy_loss = -objective.mean()

    if ref_logp is None:
        kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    else:
        log_ref_ratio = ref_logp.detach() - logp  # [N, L]
        kl = (torch.exp(log_ref_ratio) - log_ref_ratio - 1).mean()
    loss = policy_loss + beta * kl if beta != 0 else policy_loss

    with torch.no_grad():
        clip_high = (adv > 0) & (ratio > 1 + clip_eps_high)  # [N, L]
        clip_low = (adv < 0) & (ratio < 1 - clip_eps_low)  # [N, L]
        stats = {
            "loss": loss.item(),
            "policy_loss": policy_loss.item(),
            "kl": kl.item(),
            "clip_frac": (clip_high | clip_low).float().mean().item(),
            "ratio_mean": ratio.mean().item(),
            "ratio_max": ratio.max().item(),
        }
    return loss, stats
