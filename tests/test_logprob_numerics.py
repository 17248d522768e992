"""Behaviour and training log-probs: the fp32 image head, the mismatch metrics, truncated importance sampling.

The sampler (one token at a time against a KV cache) and the trainer (a whole sequence) compute the same log-probs
through different kernels. On this CPU the two paths agree bit for bit in bf16, so where a test needs the two paths
to differ it says how it makes them differ.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from grpo_image.base.config import load_recipe
from grpo_image.core.sampling import SamplingSettings, code_logprobs, left_pad, policy_rows, sample_codes
from grpo_image.policies.xomni import tiny_xomni_policy
from grpo_image.core.logprobs import logprob_mismatch
from grpo_image.training.train import _submit, build_trainer, grpo_step, sample_rollout
from tests.test_cli_train import RECIPE, SMALL

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: see conftest.py

PROMPTS = ["a red square", "x", "paint it all blue, from edge to edge", "a cat"]
PEAKED = 4.0  # the head rows' mean norm: logits up to about 15 on normed hidden states, a trained head's range


def test_mismatch_statistics_by_hand():
    # differences 0, 0.1, -0.1, 0.3, -0.5 (and 95 zeros): |d| sorted 95 x 0, 0.1, 0.1, 0.3, 0.5;
    # quantiles of 100 values (linear interpolation at (n - 1) q): p50 = 0, p90 = 0, p99 at 98.01 -> 0.3 + 0.01 * 0.2
    # ratios exp(d): 1.105 and 0.905 inside [0.8, 1.28]; exp(0.3) = 1.35 and exp(-0.5) = 0.61 outside: 2 of 100
    diff = torch.zeros(100)
    diff[:5] = torch.tensor([0.0, 0.1, -0.1, 0.3, -0.5])
    metrics = logprob_mismatch(diff, clip_eps_low=0.2, clip_eps_high=0.28)
    assert metrics["logprob_diff/p50"] == 0.0 and metrics["logprob_diff/p90"] == 0.0
    # float32 quantile of float32 values: a few ulps of 0.3
    assert metrics["logprob_diff/p99"] == pytest.approx(0.302, abs=1e-6)
    assert metrics["logprob_diff/max"] == pytest.approx(0.5, abs=1e-7)  # float32(0.5) is exact; 1e-7: its ulp
    assert metrics["logprob_diff/outside_clip"] == pytest.approx(0.02, abs=1e-7)


def peaked_bf16_xomni(seed: int, hidden_size: int = 256):
    """A bf16 tiny X-Omni whose image-head rows have a trained head's norm (logits up to about 15, not 0.1)."""
    policy = tiny_xomni_policy(grid=(4, 4), image_vocab_size=64, hidden_size=hidden_size, seed=seed, dtype="bfloat16")
    head = policy.model.mm_head.weight  # [mm_vocab, H]
    with torch.no_grad():
        head.mul_(PEAKED / head[:64].float().norm(dim=1).mean())
    return policy


@torch.no_grad()
def code_hidden_states(policy, codes: torch.Tensor) -> torch.Tensor:
    """The teacher-forced final hidden states before every code, conditional and unconditional rows: [2N, L, H]."""
    ids, mask = left_pad(policy_rows(policy, PROMPTS, True), policy.pad_token_id, policy.device)
    steps = policy.codes_to_ids(codes[:, :-1]).repeat(2, 1)  # [2N, L-1]
    positions = torch.cat([policy.prefix_positions(mask), policy.code_positions(mask, 0, codes.shape[1] - 1)], -1)
    full = torch.cat([mask, torch.ones_like(steps)], 1)  # [2N, P+L-1]
    hidden, _ = policy.forward_hidden(torch.cat([ids, steps], 1), full, positions)  # [2N, P+L-1, H]
    return hidden[:, ids.shape[1] - 1 :]


def one_rounding_apart(hidden: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """The hidden states another kernel could have produced: a seeded `share` of the bf16 elements one rounding step
    up or down (the smallest difference two bf16 computations of the same value can show)."""
    generator = torch.Generator().manual_seed(seed)
    moved = torch.rand(hidden.shape, generator=generator) < share
    up = torch.rand(hidden.shape, generator=generator) < 0.5
    neighbour = torch.nextafter(hidden, torch.where(up, math.inf, -math.inf).to(hidden.dtype))
    return torch.where(moved, neighbour, hidden)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fp32_head_leaves_a_smaller_mismatch_than_a_bf16_head(seed):
    """The same two sets of hidden states (the trainer's, and one 1% of whose elements sit one bf16 rounding away, as
    another kernel's may), through the policy's fp32 head and through the head as it was (a bf16 product rounded to
    bf16), then CFG 5 and the log-softmax.

    Derivation. With the fp32 head a logit moves by exactly W . dh (up to fp32 rounding): |dz| <= |W| . |dh|, a bound
    computed here for every logit. A bf16 head rounds each of the two results to the bf16 grid: when they straddle a
    grid point, which happens with probability |dz| / ulp(z), the difference becomes a whole ulp (0.03 to 0.125 at
    logits of 8 to 32), above the bound. The rounding noise that adds has variance about ulp |dz|, so where |dz| is
    below one ulp (checked: 90% of the logits or more) the mean square of the difference at least doubles and the rms
    grows by at least sqrt(2) (1.41); asserted with 10% off for the spread of a few thousand log-probs. Measured: 2.0
    to 2.3 over the three seeds.
    """
    policy = peaked_bf16_xomni(seed)
    settings = SamplingSettings(cfg_scale=5.0, min_p=0.03)
    codes, _ = sample_codes(policy, PROMPTS, torch.arange(4) + 10 * seed, settings)  # [N, L]
    trainer = code_hidden_states(policy, codes)  # [2N, L, H] bf16
    other = one_rounding_apart(trainer, share=0.01, seed=seed)
    rows = policy.model.mm_head.weight[:64]  # [V, H] bf16

    def bf16_head(hidden):  # the head before this change: bf16 in, bf16 out
        return F.linear(hidden, rows)

    with torch.no_grad():
        z, z_other = policy.image_logits(trainer), policy.image_logits(other)  # [2N, L, V] fp32
        bound = (other.double() - trainer.double()).abs() @ rows.double().abs().T  # [2N, L, V] |W| . |dh|
        ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(z.abs().clamp(min=1e-30)))  # [2N, L, V]
        # both fp32 sums' own roundings, at worst (Higham's gamma_n) n u |W| . |h| each, n = H = 256 terms
        fp32_slack = 2 * trainer.shape[-1] * 2.0**-24 * (trainer.float().abs() @ rows.float().abs().T)
        assert z.abs().max() > 8  # a peaked head: logits where one bf16 step is 0.03 nats or more
        assert ((z_other - z).abs() <= bound + fp32_slack).all()  # fp32: nothing but the hidden states' difference
        assert ((z_other - z).abs() < ulp).float().mean() > 0.9  # the derivation's regime, for 94% of logits here
        rounded = (bf16_head(other).float() - bf16_head(trainer).float()).abs()
        assert (rounded > bound + fp32_slack).float().mean() > 0.05  # bf16: whole steps beyond dh's (11-12% measured)
        fp32_gap = code_logprobs(z_other, settings, True) - code_logprobs(z, settings, True)  # [N, L, V]
        bf16_gap = code_logprobs(bf16_head(other), settings, True) - code_logprobs(bf16_head(trainer), settings, True)
    rms = lambda gap: gap.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(bf16_gap) > 0.9 * math.sqrt(2) * rms(fp32_gap), (rms(bf16_gap), rms(fp32_gap))


def xomni_trainer(tmp_path, *overrides: str):
    """The demo recipe at test size on a bf16 tiny X-Omni (LoRA over a frozen bf16 base), guidance 5 and min-p 0.03."""
    policy = ("policy={_component_: grpo_image.policies.xomni.tiny_xomni_policy, grid: [2, 2], image_vocab_size: 16, "
              "hidden_size: 64, seed: 1, dtype: bfloat16}")  # fmt: skip
    cfg = load_recipe(RECIPE, [*SMALL, policy, "train.mode=lora", "sampling.cfg_scale=5.0", "sampling.min_p=0.03",
                               f"output_dir={tmp_path}", *overrides])  # fmt: skip
    trainer = build_trainer(cfg)
    head = trainer.policy.model.get_base_model().mm_head.weight
    with torch.no_grad():
        head.mul_(PEAKED / head[:16].float().norm(dim=1).mean())  # peaked, as above
    return trainer


def test_a_bf16_xomni_step_logs_the_mismatch_and_the_filtered_mass(tmp_path):
    trainer = xomni_trainer(tmp_path)
    metrics, _ = grpo_step(trainer, 1)
    quantiles = [metrics[f"train/logprob_diff/{q}"] for q in ("p50", "p90", "p99", "max")]
    assert all(math.isfinite(q) and q >= 0 for q in quantiles) and quantiles == sorted(quantiles)
    assert 0 <= metrics["train/logprob_diff/outside_clip"] <= 1
    # consistency with the loss's own ratio on the same minibatch: |mean(exp(d)) - 1| <= exp(max |d|) - 1
    assert abs(metrics["train/ratio_mean_first"] - 1) <= math.expm1(quantiles[-1]) + 1e-6  # + float32 rounding of 1
    mass, most = metrics["sampling/filtered_mass/mean"], metrics["sampling/filtered_mass/max"]
    assert 0 < mass <= most < 1  # min-p 0.03 on a peaked head removes some of the mass, never all of it
    assert "train/tis/weight_mean" not in metrics and "time/old_logprobs" not in metrics  # train.tis_cap 0: off


CAP = 1.2  # below exp(0.3) = 1.35, above exp(-0.3) = 0.74


def injected_step(trainer, step: int, shift: torch.Tensor):
    """Step `step` with the rollout's behaviour log-probs moved by -shift [N, L]: as if the sampler had computed them
    on another path. Its codes, and so the trainer's own log-probs, are unchanged."""
    rollout = sample_rollout(trainer, step)
    rollout.old_logprobs = rollout.old_logprobs - shift
    trainer.prefetched = (step, rollout, _submit(trainer, step, rollout))
    return grpo_step(trainer, step)[0]


def test_truncated_importance_sampling_weighs_each_code_by_its_capped_ratio(tmp_path):
    """A seeded sign pattern of +-0.3 nats between behaviour and trainer: the weights are min(exp(+-0.3), 1.2), the
    ratio is taken against the trainer's own log-probs (1 on the first minibatch), and the metrics say so."""
    trainer = build_trainer(load_recipe(RECIPE, [*SMALL, f"output_dir={tmp_path}", f"train.tis_cap={CAP}"]))
    n, length = 8, 4  # SMALL: 2 prompts x 4 rollouts of 2 x 2 codes
    signs = torch.where(torch.rand(n, length, generator=torch.Generator().manual_seed(0)) < 0.5, 1.0, -1.0)
    shift = 0.3 * signs  # [N, L]: trainer_old - behaviour, up to the two paths' own rounding
    metrics = injected_step(trainer, 1, shift)
    # the paths' own difference is fp32 rounding (`logprob_tolerance`: below 1e-5 on this 1-layer model's logits
    # under 1); exp moves it by at most a factor 1.35, and the mean of weights by as much
    expected = torch.minimum(shift.exp(), torch.tensor(CAP)).mean().item()
    assert metrics["train/tis/weight_mean"] == pytest.approx(expected, abs=2e-5)
    assert metrics["train/tis/capped_frac"] == (signs > 0).float().mean().item()  # 0.3 > log 1.2 = 0.18
    assert metrics["train/ratio_mean_first"] == pytest.approx(1.0, abs=2e-5)  # against the trainer's own log-probs
    # the mismatch metrics still compare with the sampler's: every |d| is 0.3, every ratio outside [0.8, 1.2]
    for q in ("p50", "p90", "p99", "max"):
        assert metrics[f"train/logprob_diff/{q}"] == pytest.approx(0.3, abs=1e-5)
    assert metrics["train/logprob_diff/outside_clip"] == 1.0
    assert metrics["time/old_logprobs"] >= 0


def test_truncated_importance_sampling_without_a_mismatch_is_the_plain_update(tmp_path):
    """No injected difference: every weight is 1 up to rounding and the ratio's denominator is the behaviour log-prob
    up to rounding, so one step with train.tis_cap 2 moves the weights as one with it off (0)."""
    moved = []
    for cap in (0.0, 2.0):
        trainer = build_trainer(load_recipe(RECIPE, [*SMALL, f"output_dir={tmp_path / str(cap)}", "train.mode=full",
                                                     f"train.tis_cap={cap}"]))  # fmt: skip
        grpo_step(trainer, 1)
        moved.append({name: p.detach().clone() for name, p in trainer.policy.model.named_parameters()})
    # AdamW's first step moves each weight by lr * g / (|g| + eps): a 1e-6 relative change of g (the weights' and
    # ratios' rounding) changes it by at most lr * 1e-6 = 1e-9 (the recipe's lr 1e-3), far inside 1e-7
    for name, value in moved[0].items():
        torch.testing.assert_close(moved[1][name], value, atol=1e-7, rtol=0, msg=name)


def test_validate_checks_the_cap_and_leaves_null_sampling_keys_to_the_policy(tmp_path):
    from grpo_image.base.config import RecipeError
    from grpo_image.training.preflight import preflight

    def recipe(*overrides: str):
        return load_recipe(RECIPE, [*SMALL, f"output_dir={tmp_path}", *overrides])

    with pytest.raises(RecipeError, match=r"'train.tis_cap' must be 0 \(off\) or >= 1 .*, got 0.5"):
        preflight(recipe("train.tis_cap=0.5"))
    assert preflight(recipe("train.tis_cap=2", "sampling.top_k=null", "sampling.temperature=null")) > 0
    with pytest.raises(ValueError, match="sampling.top_k is null .* reads no sampling settings from its checkpoint"):
        build_trainer(recipe("sampling.top_k=null"))  # the tiny policy has none: refused when it is built
