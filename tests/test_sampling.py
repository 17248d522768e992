"""The sampler: filters keep exactly the right codes, sampled log-probs equal teacher-forced ones, seeds reproduce."""

import math
from dataclasses import replace

import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from grpo_image.core.logprobs import teacher_forced_logprobs
from grpo_image.policies.tiny import tiny_policy
from grpo_image.core.sampling import (
    SamplingSettings, draw_codes, exp_where_kept, filter_logits, inverse_cdf_sample, kept_codes, logsumexp_where_kept,
    minus_inf_where_removed, removed_codes, resolve_checkpoint_sampling, sample_codes, sample_codes_with_mass,
)
from tests.helpers_sampling import growing_cache_sampler, logprob_tolerance, position_logits, roundings_to_a_logit

# probabilities 0.5, 0.25, 0.15, 0.1 (already sorted, so kept sets read left to right)
HAND = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


@pytest.mark.parametrize(
    "top_k, top_p, min_p, expected",
    [
        (0, 1.0, 0.0, [0, 1, 2, 3]),  # no filter
        (2, 1.0, 0.0, [0, 1]),  # the two most likely
        (0, 0.7, 0.0, [0, 1]),  # mass before each code: 0, .5, .75, .9 -> keep while < .7
        (0, 0.76, 0.0, [0, 1, 2]),  # .75 < .76 keeps code 2 as well
        (0, 0.5, 0.0, [0]),  # code 0 alone reaches .5
        (0, 1.0, 0.4, [0, 1]),  # threshold .4 * .5 = .2: .25 stays, .15 goes
        (0, 1.0, 0.25, [0, 1, 2]),  # threshold .125: .15 stays, .1 goes
        (3, 0.8, 0.0, [0, 1]),  # after top-3 renormalised: .556, .278, .167; mass before: 0, .556, .833
        (0, 0.76, 0.6, [0]),  # top-p leaves .5/.9, .25/.9, .15/.9; min-p threshold .6 * .556 = .333
    ],
)
def test_filters_keep_exactly_the_expected_codes(top_k, top_p, min_p, expected):
    assert kept(filter_logits(HAND.clone(), top_k, top_p, min_p)) == expected


@pytest.mark.parametrize("warper, kwargs", [
    (TopKLogitsWarper, {"top_k": 7}),
    (TopPLogitsWarper, {"top_p": 0.8}),
    (MinPLogitsWarper, {"min_p": 0.1}),
])
def test_filters_agree_with_transformers_warpers(warper, kwargs):
    logits = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 2  # [n, V]
    ours = filter_logits(logits.clone(), kwargs.get("top_k", 0), kwargs.get("top_p", 1.0), kwargs.get("min_p", 0.0))
    theirs = warper(**kwargs)(None, logits.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))


@pytest.mark.parametrize("top_k, top_p, min_p, removed", [
    (0, 1.0, 0.0, 0.0),  # no filter
    (0, 1.0, 0.1, 0.0),  # a filter that removes nothing: threshold .05 keeps all four
    (2, 1.0, 0.0, 0.25),  # keeps .5 and .25
    (0, 0.76, 0.0, 0.1),  # keeps .5, .25, .15
    (0, 1.0, 0.4, 0.25),  # threshold .2 keeps .5 and .25
    (3, 0.8, 0.0, 0.25),  # top-3, then top-p keeps .5 and .25 (see above)
])
def test_draw_reports_the_probability_mass_the_filters_removed(top_k, top_p, min_p, removed):
    settings = SamplingSettings(top_k=top_k, top_p=top_p, min_p=min_p)
    codes, logprobs, mass = draw_codes(HAND, torch.tensor([0.3]), settings)
    # float32 logits of probabilities that sum to 1: the kept mass is exact to a few float32 ulps
    # fp32 sums of 4 probabilities that add up to 1: exact to a few fp32 ulps (2^-24 each), far inside 1e-6
    torch.testing.assert_close(mass, torch.tensor([removed]), atol=1e-6, rtol=0)
    torch.testing.assert_close(logprobs, HAND[0, codes], atol=1e-6, rtol=0)  # the unfiltered log-prob, whatever kept


@pytest.mark.parametrize("top_k, top_p, min_p", [(0, 1.0, 0.03), (5, 1.0, 0.0), (0, 0.6, 0.0), (3, 0.9, 0.5)])
def test_the_fast_exp_and_logsumexp_of_filtered_logits_are_torchs_own(top_k, top_p, min_p):
    """The draw's masking, exp and log-sum-exp skip torch's slow paths (branches per element, -inf entries): the same
    elementwise exp of the same values, products and differences with exactly 0, 1 or inf, the same steps of
    logsumexp, so equal bit for bit, not within a tolerance; and nothing is removed without a filter."""
    logits = torch.randn(8, 512, generator=torch.Generator().manual_seed(2)) * 3  # [n, V]
    removed = removed_codes(logits, top_k, top_p, min_p)  # [n, V]
    kept = kept_codes(removed)  # [n, V] 1.0 / 0.0
    filtered = logits.masked_fill(removed, float("-inf"))
    assert 0 < removed.float().mean() < 1 and torch.equal(filtered, filter_logits(logits, top_k, top_p, min_p))
    assert torch.equal(minus_inf_where_removed(logits, kept), filtered)
    assert torch.equal(exp_where_kept(filtered, kept), filtered.exp())
    assert torch.equal(logsumexp_where_kept(filtered, kept), filtered.logsumexp(-1))
    assert removed_codes(logits, 0, 1.0, 0.0) is None and filter_logits(logits, 0, 1.0, 0.0) is logits


def test_inverse_cdf_picks_the_code_whose_interval_holds_the_uniform():
    logprobs = torch.tensor([[0.5, 0.25, 0.25]]).log().repeat(4, 1)  # CDF 0.5, 0.75, 1.0
    codes = inverse_cdf_sample(logprobs, torch.tensor([0.1, 0.6, 0.8, 0.5]))
    assert codes.tolist() == [0, 1, 2, 1]  # 0.5 sits on the boundary and belongs to the next interval


def test_inverse_cdf_never_picks_a_removed_code():
    logprobs = filter_logits(torch.tensor([[0.1, 0.6, 0.3]]).log(), 0, 1.0, 0.4).log_softmax(-1)  # code 0 removed
    codes = inverse_cdf_sample(logprobs.repeat(3, 1), torch.tensor([0.0, 0.999999, 0.5]))
    assert 0 not in codes.tolist()


def test_inverse_cdf_frequencies_match_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    uniforms = torch.rand(40_000, generator=torch.Generator().manual_seed(1))
    codes = inverse_cdf_sample(probs.log().expand(40_000, 4), uniforms)
    freq = torch.bincount(codes, minlength=4).float() / 40_000
    # binomial std for p=.4 and n=40k is 0.0024: 0.01 is four sigma
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)


@pytest.fixture(scope="module")
def policy():
    built = tiny_policy(num_codes=16, grid=(3, 4), hidden_size=32, num_layers=2, seed=3)
    built.model.eval()
    return built


PROMPTS = ["a red square", "a red square", "paint it all blue, from edge to edge", "x"]
# the module's policy: 2 layers of hidden 32, MLP 64, heads of 8, attending over at most 36 + 5 prompt tokens and 11
# codes (the longest prompt is 36 bytes, then <SOM>3 4<IMAGE>)
SAMPLER_ROUNDINGS = roundings_to_a_logit(layers=2, hidden=32, intermediate=64, head_dim=8, tokens=36 + 5 + 11)


def tolerance(policy, codes: torch.Tensor, settings: SamplingSettings) -> float:
    """How far two computations of these codes' log-probs may lie apart (`logprob_tolerance`), from the largest raw
    logit the policy gives them and the recipe's guidance and temperature."""
    max_logit = position_logits(policy, PROMPTS[: len(codes)], codes, SamplingSettings()).abs().max().item()
    return logprob_tolerance(SAMPLER_ROUNDINGS, max_logit, cfg_scale=settings.cfg_scale,
                             temperature=settings.temperature)  # fmt: skip


@pytest.mark.parametrize("settings", [
    SamplingSettings(),
    SamplingSettings(temperature=0.7),
    SamplingSettings(top_k=5),
    SamplingSettings(top_p=0.6),
    SamplingSettings(min_p=0.2),
    SamplingSettings(cfg_scale=3.0),
    SamplingSettings(cfg_scale=2.0, temperature=0.8, top_p=0.9, min_p=0.05),
], ids=["plain", "temperature", "top_k", "top_p", "min_p", "cfg", "cfg_all_filters"])
def test_sampled_logprobs_equal_teacher_forced(policy, settings):
    seeds = torch.tensor([11, 12, 13, 14])
    codes, sampled = sample_codes(policy, PROMPTS, seeds, settings)  # [N, L]
    assert codes.shape == (4, 12) and codes.min() >= 0 and codes.max() < 16
    with torch.no_grad():
        forced = teacher_forced_logprobs(policy, PROMPTS, codes, settings, chunk=5)  # chunks of 5, 5, 2
    torch.testing.assert_close(forced, sampled, atol=tolerance(policy, codes, settings), rtol=0)
    assert torch.isfinite(sampled).all() and (sampled <= 0).all()


def test_teacher_forced_gradients_match_with_and_without_chunking(policy):
    settings = SamplingSettings(cfg_scale=2.0)
    codes, _ = sample_codes(policy, PROMPTS, torch.arange(4), settings)
    grads = []
    for chunk in (12, 5):
        policy.model.zero_grad()
        teacher_forced_logprobs(policy, PROMPTS, codes, settings, chunk=chunk).sum().backward()
        grads.append(policy.model.get_output_embeddings().weight.grad.clone())
    policy.model.zero_grad(set_to_none=True)
    assert grads[0].abs().sum() > 0
    # the same gradient summed over chunks of 12 or of 5 + 5 + 2 positions: fp32 sums in another order, 2^-24 per
    # rounding over a few dozen terms, far inside 1e-6 absolute on gradients of order 1e-2 and 1e-5 relative
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_conditional_logprobs_option_uses_the_conditional_policy_alone(policy):
    guided = SamplingSettings(cfg_scale=3.0, cfg_logprobs="conditional")
    codes, sampled = sample_codes(policy, PROMPTS, torch.arange(4), guided)
    with torch.no_grad():
        conditional = teacher_forced_logprobs(policy, PROMPTS, codes, guided)
        plain = teacher_forced_logprobs(policy, PROMPTS, codes, SamplingSettings())
        mixture = teacher_forced_logprobs(policy, PROMPTS, codes, SamplingSettings(cfg_scale=3.0))
    torch.testing.assert_close(conditional, plain)  # the approximation: no unconditional pass
    tol = tolerance(policy, codes, SamplingSettings())  # conditional rows alone: no guidance amplifies their errors
    torch.testing.assert_close(sampled, conditional, atol=tol, rtol=0)  # behaviour = conditional: ratio starts at 1
    assert (mixture - sampled).abs().max() > 100 * tol  # which is not the guided mixture's log-prob
    drawn_with_guidance, _ = sample_codes(policy, PROMPTS, torch.arange(4), SamplingSettings(cfg_scale=3.0))
    assert torch.equal(codes, drawn_with_guidance)  # the option changes the log-probs, never the draw


def test_logprobs_are_of_the_unfiltered_tempered_distribution(policy):
    """top-k 1 draws the most likely code; its log-prob is log_softmax(logits / T) there, not 0 (the filtered one)."""
    greedy = SamplingSettings(top_k=1, temperature=0.5)
    codes, sampled = sample_codes(policy, PROMPTS[:1], torch.tensor([0]), greedy)
    ids = torch.tensor(policy.encode(PROMPTS[:1]))  # [1, P]
    with torch.no_grad():
        hidden, _ = policy.forward_hidden(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
        first = policy.image_logits(hidden[:, -1]).float()  # [1, V]: the logits of code 0
    assert codes[0, 0] == first.argmax()
    expected = (first / 0.5).log_softmax(-1)[0, codes[0, 0]]  # hand: the tempered, unfiltered log-prob
    tol = logprob_tolerance(SAMPLER_ROUNDINGS, first.abs().max().item(), temperature=0.5)
    torch.testing.assert_close(sampled[0, 0], expected, atol=tol, rtol=0)
    assert sampled[0, 0] < -100 * tol


@pytest.mark.parametrize("settings", [
    SamplingSettings(min_p=0.03), SamplingSettings(top_k=2), SamplingSettings(top_p=0.5),
    SamplingSettings(cfg_scale=3.0, min_p=0.1), SamplingSettings(cfg_scale=3.0, min_p=0.1, cfg_logprobs="conditional"),
], ids=["min_p", "top_k", "top_p", "cfg_mixture", "cfg_conditional"])
def test_every_sampled_code_keeps_a_finite_logprob_after_the_policy_moves(settings):
    """A peaked head (a trained model's shape) and three large GRPO updates push sampled codes out of the filters'
    kept sets: the training and reference log-probs of every sampled code stay finite all the same."""
    from grpo_image.core.loss import grpo_loss
    from grpo_image.training.weights import FullWeights

    moved = tiny_policy(num_codes=16, grid=(3, 4), hidden_size=32, num_layers=2, seed=5)
    head = moved.model.get_output_embeddings().weight
    with torch.no_grad():
        head.mul_(40.0)  # peaked: min-p 0.03 keeps only a few codes per position
    weights = FullWeights(moved, keep_reference=True)
    codes, sampled = sample_codes(moved, PROMPTS, torch.arange(4), settings)
    with torch.no_grad():
        before = teacher_forced_logprobs(moved, PROMPTS, codes, settings)
    tol = logprob_tolerance(SAMPLER_ROUNDINGS, position_logits(moved, PROMPTS, codes, SamplingSettings()).abs().max()
                            .item(), cfg_scale=settings.cfg_scale)  # fmt: skip
    torch.testing.assert_close(before, sampled, atol=tol, rtol=0)  # ratio 1 before any update
    optimizer = torch.optim.AdamW(weights.trainable_parameters(), lr=0.05)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for _ in range(3):
        optimizer.zero_grad()
        logp = teacher_forced_logprobs(moved, PROMPTS, codes, settings)
        with weights.reference() as reference, torch.no_grad():
            ref = teacher_forced_logprobs(reference, PROMPTS, codes, settings)
        loss, _ = grpo_loss(logp, sampled, ref, advantages, clip_eps_low=0.2, clip_eps_high=0.28, beta=0.01)
        assert torch.isfinite(loss) and torch.isfinite(logp).all() and torch.isfinite(ref).all()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = teacher_forced_logprobs(moved, PROMPTS, codes, settings)
        filtered = torch.stack([filter_logits(row, settings.top_k, settings.top_p, settings.min_p)
                                for row in position_logits(moved, PROMPTS, codes, settings)])  # the old, filtered choice
    assert torch.isfinite(after).all()
    assert (after - before).abs().max() > 0.1  # the policy really moved
    assert not torch.isfinite(filtered.gather(-1, codes[..., None])).all()  # where a filtered log-prob breaks


@pytest.mark.parametrize("settings", [SamplingSettings(min_p=0.9), SamplingSettings(cfg_scale=3.0, top_p=0.6)],
                         ids=["min_p", "cfg_top_p"])
def test_the_removed_mass_is_what_the_filters_take_from_the_distribution_the_codes_were_drawn_from(policy, settings):
    """Recomputed from teacher-forced logits: 1 - the kept mass of the tempered guided distribution at every position,
    and each sampled code's log-prob under the filtered distribution is its behaviour log-prob - log(1 - removed)."""
    codes, behaviour, removed = sample_codes_with_mass(policy, PROMPTS, torch.arange(4), settings)  # [N, L] each
    logits = position_logits(policy, PROMPTS, codes, settings)  # [N, L, V]
    filtered = filter_logits(logits, settings.top_k, settings.top_p, settings.min_p)
    kept = (filtered.logsumexp(-1) - logits.logsumexp(-1)).exp()  # [N, L]
    tol = tolerance(policy, codes, settings)  # two orders of the same sums
    torch.testing.assert_close(removed, 1 - kept, atol=tol, rtol=0)
    assert (removed > 0.01).float().mean() > 0.5  # the filters really removed something at most positions
    drawn = filtered.log_softmax(-1).gather(-1, codes[..., None]).squeeze(-1)  # [N, L]
    torch.testing.assert_close(drawn, behaviour - torch.log1p(-removed), atol=2 * tol, rtol=0)
    assert torch.equal(sample_codes_with_mass(policy, PROMPTS, torch.arange(4), SamplingSettings())[2],
                       torch.zeros_like(removed))  # fmt: skip


def test_a_null_sampling_key_needs_a_policy_that_reads_its_checkpoints(policy):
    from omegaconf import OmegaConf

    node = OmegaConf.create({"temperature": None, "top_k": 0, "top_p": 1.0, "min_p": 0.0})
    with pytest.raises(ValueError, match="sampling.temperature is null .* reads no sampling settings"):
        resolve_checkpoint_sampling(node, policy)
    node.temperature = 0.7  # a value the recipe sets wins: nothing to resolve
    assert resolve_checkpoint_sampling(node, policy) == {} and node.temperature == 0.7


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 6])
def test_batched_sampling_equals_one_call(policy, cfg_scale, batch_size):
    """sampling.batch_size rows per call (CFG rows counted): the same codes and log-probs as every row at once."""
    settings = SamplingSettings(cfg_scale=cfg_scale, min_p=0.05)
    if batch_size < settings.rows_per_prompt:
        with pytest.raises(ValueError, match="batch_size"):
            SamplingSettings(cfg_scale=cfg_scale, batch_size=batch_size)
        return
    seeds = torch.tensor([7, 8, 9, 10])
    whole, whole_lp = sample_codes(policy, PROMPTS, seeds, settings)
    batched, batched_lp = sample_codes(policy, PROMPTS, seeds, replace(settings, batch_size=batch_size))
    assert torch.equal(whole, batched)
    torch.testing.assert_close(batched_lp, whole_lp, atol=tolerance(policy, whole, settings), rtol=0)  # other batches


@pytest.mark.parametrize("settings", [SamplingSettings(min_p=0.05), SamplingSettings(cfg_scale=3.0, top_p=0.9)],
                         ids=["plain", "cfg"])
def test_static_cache_sampler_equals_a_growing_cache(policy, settings):
    seeds = torch.tensor([3, 1, 4, 1])
    with torch.no_grad():
        grown, grown_lp = growing_cache_sampler(policy, PROMPTS, seeds, settings)
    codes, logprobs = sample_codes(policy, PROMPTS, seeds, settings)
    assert torch.equal(codes, grown)
    torch.testing.assert_close(logprobs, grown_lp, atol=tolerance(policy, codes, settings), rtol=0)  # other caches


def test_fixed_seeds_reproduce_codes_and_other_seeds_differ(policy):
    settings = SamplingSettings(top_p=0.95)
    first, _ = sample_codes(policy, PROMPTS, torch.tensor([1, 2, 3, 4]), settings)
    again, _ = sample_codes(policy, PROMPTS, torch.tensor([1, 2, 3, 4]), settings)
    other, _ = sample_codes(policy, PROMPTS, torch.tensor([5, 6, 7, 8]), settings)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # same prompt, different seeds


def test_a_sample_does_not_depend_on_its_batch(policy):
    settings = SamplingSettings()
    batch, _ = sample_codes(policy, PROMPTS, torch.tensor([1, 2, 3, 4]), settings)
    alone, _ = sample_codes(policy, PROMPTS[2:3], torch.tensor([3]), settings)
    assert torch.equal(batch[2:3], alone)


def test_image_head_logits_equal_the_code_slice_of_a_full_forward(policy):
    ids = torch.tensor([policy.encode(["a red square"])[0]])  # [1, P]
    with torch.no_grad():
        full = policy.model(input_ids=ids).logits  # [1, P, vocab]
        hidden, _ = policy.forward_hidden(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
        image = policy.image_logits(hidden)  # [1, P, V]
    lo = policy.image_token_offset
    # the same 32-term products in another shape: `logprob_tolerance` of the head's 32 roundings alone
    tol = logprob_tolerance(32, full.abs().max().item())
    torch.testing.assert_close(image, full[..., lo : lo + policy.num_codes], atol=tol, rtol=0)


def test_teacher_forced_rejects_mismatched_codes(policy):
    with pytest.raises(ValueError, match="do not match"):
        teacher_forced_logprobs(policy, PROMPTS, torch.zeros(4, 7, dtype=torch.long), SamplingSettings())


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(temperature=0.0)
    with pytest.raises(ValueError, match="cfg_logprobs"):
        SamplingSettings(cfg_logprobs="both")
    assert math.isclose(SamplingSettings(cfg_scale=5.0).cfg_scale, 5.0)  # a float stored and read back: exact
