"""What the sampler's distribution looks like at every code position, and how far two computations of the same
log-probs may lie apart, for the tests that compare them."""

import math

import torch

from grpo_image.core.sampling import (
    SamplingSettings, draw_codes, guided_logits, left_pad, policy_rows, sample_uniforms, tempered,
)


@torch.no_grad()
def position_logits(policy, prompts: list[str], codes: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """The guided, tempered (unfiltered) logits before every code of `codes` [N, L]: [N, L, V]."""
    ids, mask = left_pad(policy_rows(policy, prompts, settings.uses_cfg), policy.pad_token_id, policy.device)
    steps = policy.codes_to_ids(codes[:, :-1]).repeat(settings.rows_per_prompt, 1)  # [R, L-1]
    positions = torch.cat([policy.prefix_positions(mask), policy.code_positions(mask, 0, codes.shape[1] - 1)], -1)
    full = torch.cat([mask, torch.ones_like(steps)], dim=1)  # [R, P+L-1]
    hidden, _ = policy.forward_hidden(torch.cat([ids, steps], 1), full, positions)  # [R, P+L-1, H]
    logits = policy.image_logits(hidden[:, ids.shape[1] - 1 :]).float()  # [R, L, V]
    return tempered(guided_logits(logits, settings.cfg_scale) if settings.uses_cfg else logits, settings.temperature)


@torch.no_grad()
def growing_cache_sampler(policy, prompts: list[str], seeds: torch.Tensor, settings: SamplingSettings):
    """The sampler with a growing cache, every row at once: the prefill, then one-token steps against the DynamicCache
    each family's model grows by concatenation, with a mask grown by one column a step. Each forward attends over
    exactly what the cache holds, the reference the static cache's views are held to: codes [N, L], log-probs [N, L].
    """
    ids, mask = left_pad(policy_rows(policy, prompts, settings.uses_cfg), policy.pad_token_id, policy.device)
    uniforms = sample_uniforms(seeds, policy.num_positions)  # [N, L]
    hidden, cache = policy.forward_hidden(ids, mask, policy.prefix_positions(mask), use_cache=True)  # [R, P, H]
    grown, codes, logprobs = mask, [], []
    for t in range(policy.num_positions):
        code, logprob, _ = draw_codes(policy.image_logits(hidden[:, -1]), uniforms[:, t], settings)  # [N] each
        codes.append(code)
        logprobs.append(logprob)
        if t + 1 == policy.num_positions:
            break
        step = policy.codes_to_ids(code[:, None]).repeat(settings.rows_per_prompt, 1)  # [R, 1]
        grown = torch.cat([grown, torch.ones_like(step)], dim=1)  # [R, P + t + 1]
        positions = policy.code_positions(mask, t, t + 1)  # [R, 1] or [3, R, 1]
        hidden, cache = policy.forward_hidden(step, grown, positions, cache, use_cache=True)  # [R, 1, H]
    return torch.stack(codes, 1), torch.stack(logprobs, 1)


def roundings_to_a_logit(*, layers: int, hidden: int, intermediate: int, head_dim: int, tokens: int) -> int:
    """The roundings in sequence from the embeddings to a code's logit in a Qwen2 / LLaMA / GLM-4 decoder: per layer
    its input norm (H terms), q / k / v (H), the attention scores (head dim), their weighted sum over the keys (at
    most `tokens`), o_proj (H), the MLP's norm (H), gate and up (H) and down (I); then the final norm and the head."""
    return layers * (5 * hidden + head_dim + tokens + intermediate) + 2 * hidden


def logprob_tolerance(roundings: int, max_logit: float, *, cfg_scale: float = 1.0, temperature: float = 1.0,
                      dtype: torch.dtype = torch.float32) -> float:
    """The largest |difference| expected between two computations of the same log-probs that sum in other orders
    (a one-token step against a KV cache and a whole sequence, another batch, another kernel).

    Each rounding changes a value by at most u |value| (u: the dtype's unit roundoff, 2^-24 in fp32). Two orders of
    the same computation differ by such errors of either sign, and n of them in sequence add up like a random walk,
    to about sqrt(n) u |z| on a logit z (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section
    2.8, the statistical rule of thumb). Guidance's u + s (c - u) mixes two rows' independent errors into
    sqrt(s^2 + (s - 1)^2) of one; temperature divides the logits; a log-prob, z_code - logsumexp(z), carries two logit
    errors; and the largest of a few thousand such (about Gaussian) errors lies within 4 of their standard
    deviations. Logits below 1 still carry the log-softmax's own roundings, of order u: |z| counts as at least 1.
    """
    u = torch.finfo(dtype).eps / 2
    amplification = math.hypot(cfg_scale, cfg_scale - 1) / temperature
    return 4 * 2 * math.sqrt(roundings) * u * max(1.0, amplification * max_logit)


def assert_on_policy_ratio_within_the_logged_mismatch(row: dict) -> None:
    """A step's metrics from one process. The first minibatch is on-policy: each of its ratios is exp(d), d its
    training minus behaviour log-prob, and |d| <= train/logprob_diff/max (logged from the same minibatch), so their
    mean lies within exp(-max) .. exp(max), up to the float32 rounding of a mean of a few hundred ratios near 1 (1e-6
    leaves a margin of ten)."""
    bound = row["train/logprob_diff/max"]
    assert math.isfinite(bound) and 0 <= bound < 1, row  # under a nat: more is no rounding but another computation
    assert math.expm1(-bound) - 1e-6 <= row["train/ratio_mean_first"] - 1 <= math.expm1(bound) + 1e-6, row
