"""Group advantages against hand-derived numbers (derivations in the comments).

eps=0.0 is passed where a test wants exact values; every std below is the population std (ddof=0).
"""

import math

import numpy as np
import pytest
import torch

from grpo_image.core.advantages import group_advantages

NAN = float("nan")


def check(adv: torch.Tensor, expected: list[float]) -> None:
    assert adv.dtype == torch.float32 and adv.shape == (len(expected),)
    # advantages are float32 from a mean, a population std and a division over at most a few numbers (|a| <= 4):
    # each op rounds by half a float32 ULP (6e-8 relative), so a few of them stay within 3e-7 relative; atol 1e-7
    # covers the centred values that should be exactly 0 (a mean's rounding, about 1e-7 at totals up to 11).
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float32), rtol=3e-7, atol=1e-7)


# B=2, G=2, K=1: group 0 = [1, 3] (mean 2), group 1 = [5, 9] (mean 7).
TWO_GROUPS = np.array([[1.0], [3.0], [5.0], [9.0]], dtype=np.float32)


def test_scale_group():
    # group [1, 3]: mean 2, std 1 -> [-1, 1]; group [5, 9]: mean 7, std 2 -> [-1, 1]
    adv, stats = group_advantages(TWO_GROUPS, [1.0], group_size=2, scale="group", eps=0.0)
    check(adv, [-1.0, 1.0, -1.0, 1.0])
    assert stats == {"zero_std_frac": 0.0, "nan_frac": 0.0}


def test_scale_group_adds_eps_to_std():
    # group [1, 3]: std 1 -> [-1, 1] / (1 + 1e-3)
    adv, _ = group_advantages(TWO_GROUPS[:2], [1.0], group_size=2, eps=1e-3)
    check(adv, [-1 / 1.001, 1 / 1.001])


def test_scale_batch():
    # centred by group mean: [-1, 1, -2, 2]; batch of [1, 3, 5, 9]: mean 4.5,
    # squared deviations 12.25 + 2.25 + 0.25 + 20.25 = 35 -> var 8.75 -> std sqrt(8.75)
    adv, _ = group_advantages(TWO_GROUPS, [1.0], group_size=2, scale="batch", eps=0.0)
    s = math.sqrt(8.75)
    check(adv, [-1 / s, 1 / s, -2 / s, 2 / s])


def test_scale_none():
    # centring only: [1 - 2, 3 - 2, 5 - 7, 9 - 7]
    adv, _ = group_advantages(torch.from_numpy(TWO_GROUPS), [1.0], group_size=2, scale="none")
    check(adv, [-1.0, 1.0, -2.0, 2.0])


# B=1, G=3, K=2, weights [1, 0.5]: reward 0 = [0, 3, 6], reward 1 = [1, 1, 4].
WEIGHTED = np.array([[0.0, 1.0], [3.0, 1.0], [6.0, 4.0]], dtype=np.float32)


def test_sum_then_normalize_with_weights():
    # totals 0 + 0.5, 3 + 0.5, 6 + 2 = [0.5, 3.5, 8]: mean 4, deviations [-3.5, -0.5, 4],
    # var (12.25 + 0.25 + 16) / 3 = 9.5 -> [-3.5, -0.5, 4] / sqrt(9.5)
    adv, _ = group_advantages(WEIGHTED, [1.0, 0.5], group_size=3, eps=0.0)
    s = math.sqrt(9.5)
    check(adv, [-3.5 / s, -0.5 / s, 4 / s])


def test_normalize_then_sum_with_weights():
    # reward 0 [0, 3, 6]: mean 3, var 18/3 = 6 -> [-3, 0, 3] / sqrt(6)
    # reward 1 [1, 1, 4]: mean 2, var 6/3 = 2 -> [-1, -1, 2] / sqrt(2)
    # advantage = a0 + 0.5 * a1
    adv, _ = group_advantages(
        WEIGHTED, [1.0, 0.5], group_size=3, aggregation="normalize_then_sum", eps=0.0
    )
    r6, r2 = math.sqrt(6), math.sqrt(2)
    check(adv, [-3 / r6 - 0.5 / r2, -0.5 / r2, 3 / r6 + 1 / r2])


# B=1, G=3, K=2, weights [1, 1]; row 1's reward 1 is NaN (not applicable).
ONE_NAN = np.array([[1.0, 2.0], [3.0, NAN], [5.0, 6.0]], dtype=np.float32)


def test_nan_entry_sum_then_normalize_uses_group_mean_of_that_reward():
    # reward 1 over the group's non-NaN rows: mean(2, 6) = 4 replaces the NaN
    # totals [1 + 2, 3 + 4, 5 + 6] = [3, 7, 11]: mean 7, var 32/3 -> [-4, 0, 4] / sqrt(32/3)
    adv, stats = group_advantages(ONE_NAN, [1.0, 1.0], group_size=3, eps=0.0)
    s = math.sqrt(32 / 3)
    check(adv, [-4 / s, 0.0, 4 / s])
    assert stats["nan_frac"] == pytest.approx(1 / 6, abs=1e-12)  # a count over a count in float64: exact to 1e-16


def test_nan_entry_normalize_then_sum_drops_it():
    # reward 0 [1, 3, 5]: mean 3, var 8/3 -> [-2, 0, 2] / sqrt(8/3)
    # reward 1 [2, NaN, 6]: mean 4, std 2 over the two valid rows -> [-1, 0 (NaN), 1]
    adv, _ = group_advantages(ONE_NAN, [1.0, 1.0], group_size=3, aggregation="normalize_then_sum", eps=0.0)
    s = math.sqrt(8 / 3)
    check(adv, [-2 / s - 1, 0.0, 2 / s + 1])


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_all_nan_row_gets_zero_and_is_left_out_of_group_stats(aggregation):
    # valid totals [2, 6]: mean 4, std 2 -> [-1, 0, 1] (per reward: [1, 3] -> [-1, 1], summed twice
    # at weight 0.5). Were the NaN row filled with the group means (total 4) and counted, totals [2, 4, 6]
    # would have std sqrt(8/3) and row 0 would get -2 / sqrt(8/3) = -1.22.
    scores = np.array([[1.0, 1.0], [NAN, NAN], [3.0, 3.0]], dtype=np.float32)
    adv, stats = group_advantages(scores, [0.5, 0.5], group_size=3, aggregation=aggregation, eps=0.0)
    check(adv, [-1.0, 0.0, 1.0])
    assert adv[1].item() == 0.0
    assert stats == {"zero_std_frac": 0.0, "nan_frac": pytest.approx(1 / 3, abs=1e-12)}  # counts: exact in float64


def test_all_nan_row_is_left_out_of_batch_std():
    # B=2, G=2: group 0 = [0, 2] (mean 1); group 1 = [NaN, 4] -> one valid row: advantage 4 - 4 = 0.
    # batch std over the valid rows [0, 2, 4]: mean 2, var 8/3 -> group 0: [-1, 1] / sqrt(8/3)
    # (with the NaN row counted as anything, the std would change). Group 1 has < 2 valid rows: zero spread.
    scores = np.array([[0.0], [2.0], [NAN], [4.0]], dtype=np.float32)
    adv, stats = group_advantages(scores, [1.0], group_size=2, scale="batch", eps=0.0)
    s = math.sqrt(8 / 3)
    check(adv, [-1 / s, 1 / s, 0.0, 0.0])
    assert stats == {"zero_std_frac": 0.5, "nan_frac": 0.25}


# B=2, G=2, K=2, weights [1, 1]; reward 1 is NaN for the whole of group 0.
GROUP_NAN = np.array([[1.0, NAN], [3.0, NAN], [0.0, 1.0], [0.0, 3.0]], dtype=np.float32)


def test_whole_group_nan_reward_contributes_zero_sum_then_normalize():
    # totals: group 0 [1 + 0, 3 + 0] = [1, 3], group 1 [0 + 1, 0 + 3] = [1, 3]; centred [-1, 1, -1, 1]
    # batch std of [1, 3, 1, 3]: mean 2, std 1 -> [-1, 1, -1, 1]. (Filling group 0 with any other constant c
    # would give totals [1 + c, 3 + c, 1, 3] and a larger batch std.)
    adv, stats = group_advantages(GROUP_NAN, [1.0, 1.0], group_size=2, scale="batch", eps=0.0)
    check(adv, [-1.0, 1.0, -1.0, 1.0])
    assert stats == {"zero_std_frac": 0.0, "nan_frac": 0.25}


def test_whole_group_nan_reward_normalize_then_sum_batch():
    # reward 0 [1, 3, 0, 0]: group-centred [-1, 1, 0, 0]; batch mean 1, var (0 + 4 + 1 + 1) / 4 = 1.5
    # reward 1 [NaN, NaN, 1, 3]: group-centred [0, 0, -1, 1]; batch std over the valid [1, 3] = 1
    adv, _ = group_advantages(
        GROUP_NAN, [1.0, 1.0], group_size=2, scale="batch", aggregation="normalize_then_sum", eps=0.0
    )
    s = math.sqrt(1.5)
    check(adv, [-1 / s, 1 / s, -1.0, 1.0])


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_zero_variance_groups(aggregation):
    # groups [2, 2], [1, 3], [5, 5]: the constant groups get exactly 0 (0 / eps),
    # [1, 3] -> [-1, 1] / (1 + eps); zero_std_frac = 2 / 3
    scores = np.array([[2.0], [2.0], [1.0], [3.0], [5.0], [5.0]], dtype=np.float32)
    adv, stats = group_advantages(scores, [1.0], group_size=2, aggregation=aggregation)
    check(adv, [0.0, 0.0, -1 / (1 + 1e-6), 1 / (1 + 1e-6), 0.0, 0.0])
    assert stats["zero_std_frac"] == pytest.approx(2 / 3, abs=1e-12)  # a count over a count: exact in float64


def test_zero_std_frac_uses_weighted_totals():
    # group 0: rewards [1, 0] and [0, 1] with weights [1, 1]: both rows total 1 -> zero spread, although
    # each reward column varies; normalize_then_sum gets [1 - 1, -1 + 1] / (0.5 + eps) * 0.5 = [0, 0].
    # group 1: reward 0 [0, 1] -> [-0.5, 0.5] / (0.5 + eps); reward 1 [0, 0] -> 0 / eps = 0.
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    adv, stats = group_advantages(scores, [1.0, 1.0], group_size=2, aggregation="normalize_then_sum")
    a = 0.5 / (0.5 + 1e-6)
    check(adv, [0.0, 0.0, -a, a])
    assert stats["zero_std_frac"] == 0.5


def test_zero_std_threshold_and_all_nan_group():
    # float64 input keeps the tiny differences: group [0, 1e-9] has std 5e-10 <= 1e-8 (zero spread),
    # group [0, 1e-7] has std 5e-8 > 1e-8 (not), an all-NaN group has no valid row (zero spread, advantages 0)
    scores = torch.tensor([[0.0], [1e-9], [0.0], [1e-7], [NAN], [NAN]], dtype=torch.float64)
    adv, stats = group_advantages(scores, [1.0], group_size=2, scale="none")
    assert adv[4:].tolist() == [0.0, 0.0]
    assert stats["zero_std_frac"] == pytest.approx(2 / 3, abs=1e-12)  # a count over a count: exact in float64
    assert stats["nan_frac"] == pytest.approx(1 / 3, abs=1e-12)  # a count over a count: exact in float64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group_size": 3}, "not a multiple of group_size=3"),
        ({"weights": [1.0]}, "one entry per reward"),
        ({"scale": "global"}, "group, batch, none"),
        ({"aggregation": "mean"}, "sum_then_normalize, normalize_then_sum"),
        ({"scores": np.zeros(4, dtype=np.float32)}, "2-D"),
        ({"scores": np.array([[0, 0], [0, 0], [0, np.inf], [0, 0]])}, r"rows \[2\] hold inf"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = {"scores": np.zeros((4, 2), dtype=np.float32), "weights": [1.0, 1.0], "group_size": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        group_advantages(**args)
