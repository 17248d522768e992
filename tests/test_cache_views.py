"""The sampler's KV cache attends only over what it holds, and samples what a growing cache samples, in every family."""

import math
from dataclasses import replace

import pytest
import torch

from grpo_image.core.sampling import SamplingSettings, sample_codes
from grpo_image.policies.glm_image import tiny_glm_image_policy
from grpo_image.policies.janus import tiny_janus_policy
from grpo_image.policies.kv_cache import CacheViews, ViewedLayer
from grpo_image.policies.tiny import tiny_policy
from grpo_image.policies.xomni import tiny_xomni_policy
from tests.helpers_sampling import growing_cache_sampler, logprob_tolerance, position_logits, roundings_to_a_logit

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: see conftest.py

PROMPTS = ["a red square", "x", "paint it all blue, from edge to edge"]  # unequal lengths: left padding
SEEDS = torch.tensor([3, 1, 4])
BUCKET = 5  # views of 5, 10, ... positions: every family's prompt + L crosses several boundaries, none aligned
FAMILIES = {  # initializer 0.3 (0.02 for the 64-wide causal LM) spreads the logits enough for the filters to act
    "causal_lm": lambda: tiny_policy(num_codes=16, grid=(3, 4), hidden_size=32, num_layers=2, seed=3),
    "xomni": lambda: tiny_xomni_policy(grid=(3, 4), initializer_range=0.3, seed=1),
    "glm_image": lambda: tiny_glm_image_policy(64, 96, initializer_range=0.3, seed=1),  # L = 13 x 19 + 2 x 3
    "janus": lambda: tiny_janus_policy(initializer_range=0.3, seed=1),
}
SETTINGS = {1.0: SamplingSettings(min_p=0.05), 3.0: SamplingSettings(cfg_scale=3.0, top_p=0.9)}


def sampler_tolerance(policy, codes: torch.Tensor, settings: SamplingSettings) -> float:
    """`logprob_tolerance` of the policy's decoder, attending over at most its longest prompt and L codes, plus one
    Linear of width H: Janus's image head is two (proj_out, then vision_head), counted for every family (one more
    term of the same size). A view wider than a growing cache's reorders the attention's sum of exact zeros and the
    same weighted values; the keys' count is in the roundings' `tokens` term."""
    config = policy.model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tokens = max(len(row) for row in policy.encode(PROMPTS)) + policy.num_positions
    roundings = roundings_to_a_logit(layers=config.num_hidden_layers, hidden=config.hidden_size,
                                     intermediate=config.intermediate_size, head_dim=head_dim, tokens=tokens)
    max_logit = position_logits(policy, PROMPTS, codes, SamplingSettings()).abs().max().item()
    return logprob_tolerance(roundings + config.hidden_size, max_logit, cfg_scale=settings.cfg_scale,
                             temperature=settings.temperature)  # fmt: skip


@pytest.fixture(scope="module")
def grown():
    """family, cfg_scale -> (policy, settings, growing-cache codes and log-probs, tolerance), built once each."""
    policies, references = {}, {}

    def reference(family: str, cfg_scale: float):
        if (family, cfg_scale) not in references:
            policy = policies.setdefault(family, FAMILIES[family]())
            settings = SETTINGS[cfg_scale]
            codes, logprobs = growing_cache_sampler(policy, PROMPTS, SEEDS, settings)
            tolerance = sampler_tolerance(policy, codes, settings)
            references[family, cfg_scale] = policy, settings, codes, logprobs, tolerance
        return references[family, cfg_scale]

    return reference


@pytest.mark.parametrize("cfg_scale, batch_size",
                         [(1.0, 1), (1.0, 2), (1.0, 3), (1.0, 6), (3.0, 2), (3.0, 3), (3.0, 6)])  # CFG: 2 rows a sample
@pytest.mark.parametrize("family", FAMILIES)
def test_bucketed_views_sample_what_a_growing_cache_samples(grown, family, cfg_scale, batch_size):
    """Compiled-style views (BUCKET positions, wider than what the cache holds) at `sampling.batch_size` rows per call
    (CFG rows counted; a call of one prompt has no padding, and then no mask): the growing cache's codes, and its
    log-probs within the attention's rounding."""
    policy, settings, codes, logprobs, tol = grown(family, cfg_scale)
    ours, ours_lp = sample_codes(policy, PROMPTS, SEEDS, replace(settings, batch_size=batch_size), bucket=BUCKET)
    assert torch.equal(ours, codes)
    torch.testing.assert_close(ours_lp, logprobs, atol=tol, rtol=0)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_eager_views_sample_what_a_growing_cache_samples(grown, family, cfg_scale):
    """The default eager sampler (exact views): the same keys, values and mask widths as the growing cache."""
    policy, settings, codes, logprobs, tol = grown(family, cfg_scale)
    ours, ours_lp = sample_codes(policy, PROMPTS, SEEDS, settings)
    assert torch.equal(ours, codes)
    torch.testing.assert_close(ours_lp, logprobs, atol=tol, rtol=0)  # same sums, in other memory: within rounding


@pytest.mark.parametrize("bucket", [1, BUCKET])
def test_the_prefill_attends_over_the_prompt_and_each_step_over_its_view(monkeypatch, bucket):
    """The keys every layer hands its attention: P of them in the prefill, then for the step that writes code t at
    position P + t, the P + t + 1 held (bucket 1) or that rounded up to a multiple of the bucket, at most P + L - 1."""
    policy = FAMILIES["causal_lm"]()
    widths = []
    update = ViewedLayer.update

    def recording(self, key_states, value_states, *args, **kwargs):
        keys, values = update(self, key_states, value_states, *args, **kwargs)
        widths.append((keys.shape[2], values.shape[2]))
        return keys, values

    monkeypatch.setattr(ViewedLayer, "update", recording)
    sample_codes(policy, PROMPTS, SEEDS, SamplingSettings(), bucket=bucket)
    prefix, length = max(len(row) for row in policy.encode(PROMPTS)), policy.num_positions  # 41 and 12 here
    steps = [min(prefix + length - 1, math.ceil((prefix + t + 1) / bucket) * bucket) for t in range(length - 1)]
    layers = policy.model.config.num_hidden_layers
    assert widths == [(w, w) for w in [prefix] + steps for _ in range(layers)]


def test_views_round_up_to_the_bucket_within_the_allocation():
    config = FAMILIES["causal_lm"]().model.config
    cache = CacheViews(config, max_cache_len=10, bucket=4)
    assert [cache.attend_over(held) for held in (1, 4, 5, 9, 10)] == [4, 4, 8, 10, 10]  # 12 is past the allocation
    assert cache.attend_over(3, exact=True) == 3 and all(layer.width == 3 for layer in cache.layers)
    assert cache.is_compileable and not CacheViews(config, max_cache_len=10).is_compileable  # bucket 1: no fixed shapes
    with pytest.raises(ValueError, match="cannot hold 11"):
        cache.attend_over(11)
    with pytest.raises(ValueError, match="bucket must be >= 1"):
        CacheViews(config, max_cache_len=10, bucket=0)
