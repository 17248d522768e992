"""GRPO loss against hand-computed values (derivations in the comments).

Log-probs are float64 so that ratios such as exp(log 1.1) are exact to ~1e-15 and tolerances stay tight: abs=1e-12
(and rtol 1e-12 on gradients) bounds float64 rounding over a handful of operations on values of order 1 (an ulp is
2.2e-16), while any wrong term or sign moves a result by 1e-2 or more. `clip_frac` is a float32 mean of flags: 2/6 in
float32 is off by 1e-8, hence abs=1e-7 for it.
"""

import math

import pytest
import torch

from grpo_image.core.loss import grpo_loss, truncated_is_weights

LOG2 = math.log(2.0)


def logps(log_ratios: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp with grad, old_logp) whose ratio exp(logp - old_logp) has the given logs."""
    old = torch.full((len(log_ratios), len(log_ratios[0])), -3.0, dtype=torch.float64)
    logp = (old + torch.tensor(log_ratios, dtype=torch.float64)).requires_grad_()
    return logp, old


def test_ratio_one_gives_minus_mean_advantage():
    # ratio 1 everywhere, so both terms equal A; N=2, L=2: loss = -(1 + 1 - 3 - 3) / 4 = 1
    logp, old = logps([[0.0, 0.0], [0.0, 0.0]])
    loss, stats = grpo_loss(logp, old, None, torch.tensor([1.0, -3.0]), clip_eps_low=0.2, clip_eps_high=0.2, beta=0.0)
    assert loss.item() == pytest.approx(1.0, abs=1e-12)
    assert stats == {
        "loss": pytest.approx(1.0, abs=1e-12),
        "policy_loss": pytest.approx(1.0, abs=1e-12),
        "kl": 0.0,
        "clip_frac": 0.0,
        "ratio_mean": pytest.approx(1.0, abs=1e-12),
        "ratio_max": pytest.approx(1.0, abs=1e-12),
    }
    assert all(type(v) is float for v in stats.values())


# High side, eps_low 0.2, eps_high 0.28 (upper bound 1.28):
#   row 0, A = +1, ratios [2, 1]:   min(2, 1.28) = 1.28 (clipped);      min(1, 1) = 1
#   row 1, A = +2, ratios [1.1, 1.5]: min(2.2, 2.2) = 2.2;               min(3, 2.56) = 2.56 (clipped)
#   row 2, A = -1, ratios [2, 0.9]: min(-2, -1.28) = -2 (not clipped: A < 0 above the band); min(-0.9, -0.9)
# sum = 1.28 + 1 + 2.2 + 2.56 - 2 - 0.9 = 4.14 over 6 tokens -> loss = -0.69; clip_frac 2/6
HIGH = ([[LOG2, 0.0], [math.log(1.1), math.log(1.5)], [LOG2, math.log(0.9)]], [1.0, 2.0, -1.0])


def test_clip_high_side_positive_advantage():
    logp, old = logps(HIGH[0])
    loss, stats = grpo_loss(logp, old, None, torch.tensor(HIGH[1]), clip_eps_low=0.2, clip_eps_high=0.28, beta=0.0)
    assert loss.item() == pytest.approx(-4.14 / 6, abs=1e-12)
    assert stats["clip_frac"] == pytest.approx(2 / 6, abs=1e-7)
    # ratios [2, 1, 1.1, 1.5, 2, 0.9]: sum 8.5 -> mean 8.5 / 6, max 2
    assert stats["ratio_mean"] == pytest.approx(8.5 / 6, abs=1e-12)
    assert stats["ratio_max"] == pytest.approx(2.0, abs=1e-12)


# Low side, eps_low 0.2 (lower bound 0.8), eps_high 0.28:
#   row 0, A = -1, ratios [0.5, 0.9]: min(-0.5, -0.8) = -0.8 (clipped);  min(-0.9, -0.9) = -0.9
#   row 1, A = -2, ratios [0.5, 2]:   min(-1, -1.6) = -1.6 (clipped);    min(-4, -2.56) = -4
#   row 2, A = +1, ratios [0.5, 1]:   min(0.5, 0.8) = 0.5 (not clipped: A > 0 below the band); 1
# sum = -0.8 - 0.9 - 1.6 - 4 + 0.5 + 1 = -5.8 over 6 tokens -> loss = 5.8 / 6; clip_frac 2/6
LOW = ([[-LOG2, math.log(0.9)], [-LOG2, LOG2], [-LOG2, 0.0]], [-1.0, -2.0, 1.0])


def test_clip_low_side_negative_advantage():
    logp, old = logps(LOW[0])
    loss, stats = grpo_loss(logp, old, None, torch.tensor(LOW[1]), clip_eps_low=0.2, clip_eps_high=0.28, beta=0.0)
    assert loss.item() == pytest.approx(5.8 / 6, abs=1e-12)
    assert stats["policy_loss"] == pytest.approx(5.8 / 6, abs=1e-12)
    assert stats["clip_frac"] == pytest.approx(2 / 6, abs=1e-7)


@pytest.mark.parametrize(
    ("case", "clipped"),
    [
        (HIGH, [[True, False], [False, True], [False, False]]),
        (LOW, [[True, False], [True, False], [False, False]]),
    ],
)
def test_gradient_zero_when_clipped_else_minus_a_ratio_over_tokens(case, clipped):
    # d/dlogp of -(ratio * A) / (N * L) is -A * ratio / (N * L), N * L = 6; clipped tokens: 0
    log_ratios, adv = case
    logp, old = logps(log_ratios)
    loss, _ = grpo_loss(logp, old, None, torch.tensor(adv), clip_eps_low=0.2, clip_eps_high=0.28, beta=0.0)
    loss.backward()
    ratio = torch.tensor(log_ratios, dtype=torch.float64).exp()
    expected = -torch.tensor(adv, dtype=torch.float64)[:, None] * ratio / 6
    expected[torch.tensor(clipped)] = 0.0
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-15)


def test_k3_kl_value():
    # ref - logp = [log 2, -log 2]: k3 = [2 - log 2 - 1, 1/2 + log 2 - 1] -> sum 0.5, mean 0.25
    # A = 0 and ratio 1: policy loss 0, so loss = beta * 0.25 = 0.025
    logp, old = logps([[0.0, 0.0]])
    ref = logp.detach() + torch.tensor([[LOG2, -LOG2]], dtype=torch.float64)
    loss, stats = grpo_loss(logp, old, ref, torch.tensor([0.0]), clip_eps_low=0.2, clip_eps_high=0.2, beta=0.1)
    assert stats["kl"] == pytest.approx(0.25, abs=1e-12)
    assert loss.item() == pytest.approx(0.025, abs=1e-12)


def test_beta_weighting_and_kl_gradient():
    # A = 1, ratio 1: policy loss -1; kl 0.25 (as above); beta 0.04 -> loss -1 + 0.01 = -0.99
    # d k3 / d logp = 1 - exp(ref - logp) = [1 - 2, 1 - 0.5] = [-1, 0.5];
    # grad = (-A * ratio + beta * [-1, 0.5]) / 2 = [(-1 - 0.04) / 2, (-1 + 0.02) / 2] = [-0.52, -0.49]
    logp, old = logps([[0.0, 0.0]])
    ref = logp.detach() + torch.tensor([[LOG2, -LOG2]], dtype=torch.float64)
    loss, stats = grpo_loss(logp, old, ref, torch.tensor([1.0]), clip_eps_low=0.2, clip_eps_high=0.2, beta=0.04)
    assert loss.item() == pytest.approx(-0.99, abs=1e-12)
    assert stats["policy_loss"] == pytest.approx(-1.0, abs=1e-12)
    loss.backward()
    expected = torch.tensor([[-0.52, -0.49]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-15)


def test_beta_zero_reports_kl_but_does_not_add_it():
    logp, old = logps([[0.0, 0.0]])
    ref = logp.detach() + torch.tensor([[LOG2, -LOG2]], dtype=torch.float64)
    loss, stats = grpo_loss(logp, old, ref, torch.tensor([1.0]), clip_eps_low=0.2, clip_eps_high=0.2, beta=0.0)
    assert loss.item() == pytest.approx(-1.0, abs=1e-12)
    assert stats["kl"] == pytest.approx(0.25, abs=1e-12)


def test_truncated_is_weights_are_the_capped_ratios_of_trainer_to_behaviour():
    # trainer_old - behaviour = [log 0.5, 0, log 3, log 1.5]: ratios 0.5, 1, 3, 1.5; cap 2 -> 0.5, 1, 2, 1.5
    behaviour = torch.full((2, 2), -2.0, dtype=torch.float64)
    trainer_old = behaviour + torch.tensor([[math.log(0.5), 0.0], [math.log(3.0), math.log(1.5)]], dtype=torch.float64)
    weights = truncated_is_weights(trainer_old, behaviour, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[0.5, 1.0], [2.0, 1.5]], dtype=torch.float64),
                               rtol=1e-15, atol=0)  # float64: exp(log x) = x within 1 ulp
    with pytest.raises(ValueError, match="cap > 0"):
        truncated_is_weights(trainer_old, behaviour, cap=0.0)


def test_is_weights_scale_each_tokens_objective_and_its_gradient_not_the_kl():
    # HIGH's tokens (see above) weighted w = [[0.5, 1], [2, 1.5], [1, 0.25]]:
    #   objectives 1.28, 1, 2.2, 2.56, -2, -0.9 -> weighted 0.64 + 1 + 4.4 + 3.84 - 2 - 0.225 = 7.655 -> loss -7.655 / 6
    #   gradient: -w * A * ratio / 6 where unclipped, 0 where clipped (w is a constant)
    # plus beta 0.1 x k3 = 0 (ref = logp): the weights never touch the KL term, whose gradient is 1 - exp(0) = 0
    log_ratios, adv = HIGH
    weights = torch.tensor([[0.5, 1.0], [2.0, 1.5], [1.0, 0.25]], dtype=torch.float64)
    logp, old = logps(log_ratios)
    loss, stats = grpo_loss(logp, old, logp.detach(), torch.tensor(adv), clip_eps_low=0.2, clip_eps_high=0.28,
                            beta=0.1, is_weights=weights)  # fmt: skip
    assert loss.item() == pytest.approx(-7.655 / 6, abs=1e-12) and stats["kl"] == pytest.approx(0.0, abs=1e-15)
    loss.backward()
    ratio = torch.tensor(log_ratios, dtype=torch.float64).exp()
    expected = -weights * torch.tensor(adv, dtype=torch.float64)[:, None] * ratio / 6
    expected[torch.tensor([[True, False], [False, True], [False, False]])] = 0.0  # the clipped tokens
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-15)


def test_unit_is_weights_change_nothing():
    log_ratios, adv = LOW
    results = []
    for weights in (None, torch.ones(3, 2, dtype=torch.float64)):
        logp, old = logps(log_ratios)
        loss, stats = grpo_loss(logp, old, None, torch.tensor(adv), clip_eps_low=0.2, clip_eps_high=0.28, beta=0.0,
                                is_weights=weights)  # fmt: skip
        loss.backward()
        results.append((loss.item(), stats, logp.grad))
    assert results[0][0] == results[1][0] and results[0][1] == results[1][1]  # multiplying by 1.0 is exact
    assert torch.equal(results[0][2], results[1][2])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"ref_logp": None, "beta": 0.1}, "needs ref_logp"),
        ({"old_logp": torch.zeros(2, 4)}, "old_logp shape"),
        ({"ref_logp": torch.zeros(3, 3)}, "ref_logp shape"),
        ({"advantages": torch.zeros(3)}, r"advantages must be \[N\] = \[2\]"),
        ({"logp": torch.zeros(2, 3, 1)}, "2-D"),
        ({"clip_eps_low": 1.0}, "clip_eps_low"),
        ({"is_weights": torch.ones(2, 4)}, "is_weights shape"),
    ],
)
def test_bad_inputs(change, match):
    args = {
        "logp": torch.zeros(2, 3),
        "old_logp": torch.zeros(2, 3),
        "ref_logp": torch.zeros(2, 3),
        "advantages": torch.zeros(2),
        "clip_eps_low": 0.2,
        "clip_eps_high": 0.2,
        "beta": 0.1,
    } | change
    with pytest.raises(ValueError, match=match):
        grpo_loss(**args)
