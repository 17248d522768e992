"""Group-relative advantages from raw reward scores.

Input: scores [N, K] (N = B * G rollouts, groups contiguous: rows g*G .. g*G+G-1 share a prompt; K rewards
in the recipe's order) and recipe weights [K]. Output: one advantage per rollout [N].

Semantics:

- Centring is always by the group mean: GRPO's baseline is "the other samples of the same prompt".
- scale="group": divide by the group's std + eps (GRPO). "batch": divide by the std of the same values over
  all valid rows of the batch + eps (so easy prompts with tiny spread are not blown up; TRL's
  scale_rewards="batch"). "none": centring only (Dr. GRPO). Every std is the population std (ddof=0).
- NaN means "reward not applicable to this sample" (types.RewardOutput), so a NaN is left out of every
  mean and std. A row whose K scores are all NaN carries no signal: its advantage is exactly 0 and it is
  left out of every statistic.
- aggregation="sum_then_normalize": the row total is sum_k w_k * s_k, where a NaN s_k is replaced by the
  mean of reward k over the group's non-NaN rows, a neutral value that neither helps nor hurts the row
  against its group; a reward that is NaN for the whole group contributes 0 to every row of the group.
  The totals are then centred and scaled as above.
- aggregation="normalize_then_sum": each reward column is centred and scaled on its own (its own group mean,
  its own group or batch std, over its non-NaN entries), NaN entries become 0, and the advantage is
  sum_k w_k * a_k. Rewards on different scales then weigh as the recipe's weights say.

Stats: "zero_std_frac" is the fraction of groups whose weighted totals (as in sum_then_normalize) have
std <= 1e-8 over their valid rows, or fewer than 2 valid rows: such groups give no learning signal.
"nan_frac" is the fraction of NaN entries in scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
ZERO_STD = 1e-8


def _masked_moments(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std of x over the entries where mask is True, along dim (kept).

    Where no entry is valid both are NaN (0 / 0); callers mask those positions out afterwards.
    """
    count = mask.sum(dim, keepdim=True)
    mean = torch.where(mask, x, 0.0).sum(dim, keepdim=True) / count
    var = torch.where(mask, x - mean, 0.0).square().sum(dim, keepdim=True) / count
    return mean, var.sqrt()


def _normalize(x: torch.Tensor, mask: torch.Tensor, scale: str, eps: float) -> torch.Tensor:
    """Centre x [B, G, C] by its group mean and scale it; entries outside mask become exactly 0."""
    mean, group_std = _masked_moments(x, mask, dim=1)  # [B, 1, C]
    centred = x - mean  # [B, G, C]
    if scale == "group":
        centred = centred / (group_std + eps)  # [B, G, C]
    elif scale == "batch":
        _, batch_std = _masked_moments(x, mask, dim=(0, 1))  # [1, 1, C]
        centred = centred / (batch_std + eps)  # [B, G, C]
    return torch.where(mask, centred, 0.0)  # [B, G, C]


def group_advantages(
    scores: np.ndarray | torch.Tensor,
    weights: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    group_size: int,
    scale: str = "group",
    aggregation: str = "sum_then_normalize",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages float32 [N] and stats {"zero_std_frac", "nan_frac"}; see the module docstring."""
    if scale not in SCALES:
        raise ValueError(f"advantages: unknown scale {scale!r}; valid options: {', '.join(SCALES)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"advantages: unknown aggregation {aggregation!r}; valid options: {', '.join(AGGREGATIONS)}"
        )
    s = torch.as_tensor(scores).detach().to("cpu", torch.float64)  # [N, K]
    w = torch.as_tensor(weights).detach().to("cpu", torch.float64)  # [K]
    if s.ndim != 2:
        raise ValueError(f"advantages: scores must be 2-D [N, K], got shape {tuple(s.shape)}")
    n, k = s.shape
    if n == 0 or k == 0:
        raise ValueError(f"advantages: scores [N, K] must be non-empty, got shape {tuple(s.shape)}")
    inf_rows = s.isinf().any(-1).nonzero().flatten().tolist()
    if inf_rows:
        raise ValueError(f"advantages: scores must be finite or NaN; rows {inf_rows[:10]} hold inf")
    if w.shape != (k,):
        raise ValueError(
            f"advantages: weights must have one entry per reward (K={k}), got shape {tuple(w.shape)}"
        )
    if not w.isfinite().all():
        raise ValueError(f"advantages: weights must be finite, got {w.tolist()}")
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"advantages: N={n} rows is not a multiple of group_size={group_size}")

    s = s.reshape(n // group_size, group_size, k)  # [B, G, K]
    valid = ~s.isnan()  # [B, G, K]
    row_valid = valid.any(-1, keepdim=True)  # [B, G, 1]

    reward_mean, _ = _masked_moments(s, valid, dim=1)  # [B, 1, K], NaN where the group has no value
    filled = torch.where(valid, s, reward_mean.nan_to_num(0.0))  # [B, G, K]
    total = (filled * w).sum(-1, keepdim=True)  # [B, G, 1]

    if aggregation == "sum_then_normalize":
        adv = _normalize(total, row_valid, scale, eps).squeeze(-1)  # [B, G]
    else:
        adv = (_normalize(s, valid, scale, eps) * w).sum(-1)  # [B, G]

    # one valid row has std 0; no valid row gives NaN, which `not >` also counts as zero spread
    _, total_std = _masked_moments(total, row_valid, dim=1)  # [B, 1, 1]
    zero_spread = ~(total_std.flatten() > ZERO_STD)  # [B]
    stats = {
        "zero_std_frac": zero_spread.double().mean().item(),
        "nan_frac": (~valid).double().mean().item(),
    }
    return adv.reshape(n).float(), stats  # [N]


def weighted_total(scores: np.ndarray, weights: list[float]) -> np.ndarray:
    """Each sample's weighted sum of its scores [N, K] -> [N], NaN scores left out; NaN when all K are NaN.

    What training logs as `reward/total` and evaluation reports as the total, so that the two agree.
    """
    weighted = scores * np.asarray(weights, dtype=np.float32)  # [N, K]
    total = np.nansum(weighted, axis=1)  # [N]
    total[np.isnan(scores).all(axis=1)] = np.nan
    return total
