"""Teacher-forced log-probs of given image codes under the policy, the training side of the sampler.

The distribution is the one the sampler's behaviour log-probs are of (`grpo_image.core.sampling.code_logprobs`): the same
guidance mixture (or the conditional policy alone when the recipe says so) and temperature, and no filter, so that
on-policy ratios start at 1 and every code has a finite log-prob after any update. Positions come from the policy
(1-D, or 3-axis RoPE), exactly as the sampler feeds them. Memory does not grow with the text vocabulary: only the
image head is applied, over chunks of positions, and under autograd each chunk is recomputed in the backward pass
instead of keeping its [N, chunk, V] logits alive.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from grpo_image.core.types import Policy
from grpo_image.core.sampling import SamplingSettings, code_logprobs, left_pad, policy_rows


def teacher_forced_logprobs(
    policy: Policy,
    prompts: list[str],
    codes: torch.Tensor,  # [N, L]
    settings: SamplingSettings,
    chunk: int = 1024,
) -> torch.Tensor:
    """Log-probs [N, L] of `codes` given `prompts`; differentiable when grad is enabled."""
    n, length = codes.shape
    if len(prompts) != n or length != policy.num_positions:
        raise ValueError(
            f"codes {tuple(codes.shape)} do not match {len(prompts)} prompts of {policy.num_positions} positions"
        )
    mix = settings.uses_cfg and settings.cfg_logprobs == "mixture"
    device = policy.device
    prefix_ids, prefix_mask = left_pad(policy_rows(policy, prompts, mix), policy.pad_token_id, device)  # [R, P]
    code_ids = policy.codes_to_ids(codes[:, :-1].to(device))  # [N, L-1]
    code_ids = code_ids.repeat(2, 1) if mix else code_ids  # [R, L-1]
    ids = torch.cat([prefix_ids, code_ids], dim=1)  # [R, P+L-1]
    mask = torch.cat([prefix_mask, torch.ones_like(code_ids)], dim=1)  # [R, P+L-1]
    positions = torch.cat(
        [policy.prefix_positions(prefix_mask), policy.code_positions(prefix_mask, 0, length - 1)], dim=-1
    )  # [R, P+L-1] ([3, R, P+L-1] for 3-axis RoPE)
    hidden, _ = policy.forward_hidden(ids, mask, positions)  # [R, P+L-1, H]
    hidden = hidden[:, prefix_ids.shape[1] - 1 :]  # [R, L, H]: position P-1+t predicts code t
    targets = codes.to(device)

    def chunk_logprobs(chunk_hidden: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        step_logprobs = code_logprobs(policy.image_logits(chunk_hidden), settings, mix)  # [N, c, V]
        return step_logprobs.gather(-1, chunk_targets.unsqueeze(-1)).squeeze(-1)  # [N, c]

    pieces = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        args = (hidden[:, start:stop], targets[:, start:stop])
        if torch.is_grad_enabled():
            pieces.append(checkpoint(chunk_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(chunk_logprobs(*args))
    return torch.cat(pieces, dim=1)  # [N, L]


@torch.no_grad()
def no_grad_logprobs(
    policy: Policy, prompts: list[str], codes: torch.Tensor, settings: SamplingSettings, rows: int, chunk: int
) -> torch.Tensor:
    """`teacher_forced_logprobs` without grad, `rows` rollouts at a time to bound memory: [N, L]."""
    pieces = [
        teacher_forced_logprobs(policy, prompts[start : start + rows], codes[start : start + rows], settings, chunk)
        for start in range(0, len(prompts), rows)
    ]
    return torch.cat(pieces)  # [N, L]


def logprob_mismatch(diff: torch.Tensor, clip_eps_low: float, clip_eps_high: float) -> dict[str, float]:
    """How far the trainer's log-probs of sampled codes lie from the sampler's before any update, from their
    differences logp_train - logp_behaviour [T]: quantiles of |diff| (logprob_diff/p50, p90, p99, max) and the share
    of codes whose ratio exp(diff), which should be 1, already lies outside the clip band (logprob_diff/outside_clip).
    """
    gap = diff.detach().abs().float()  # [T]
    p50, p90, p99 = torch.quantile(gap, torch.tensor([0.5, 0.9, 0.99], device=gap.device)).tolist()
    ratio = diff.detach().float().exp()  # [T]
    outside = (ratio < 1 - clip_eps_low) | (ratio > 1 + clip_eps_high)
    return {
        "logprob_diff/p50": p50, "logprob_diff/p90": p90, "logprob_diff/p99": p99,
        "logprob_diff/max": float(gap.max()), "logprob_diff/outside_clip": float(outside.float().mean()),
    }  # fmt: skip
