"""Batched KV-cache sampling of fixed-length image-code grids, and the logits processing shared with training.

Three choices make the rollouts cheap and their log-probs exact:
- only the image head is applied at each step ([R, H] x [H, V]), never the text vocabulary;
- classifier-free guidance puts the conditional and unconditional rows in one batch ([2N, ...]), one forward a step;
- each sample draws from its own seeded stream of uniforms (inverse-CDF sampling), so its codes depend on its seed
  and prompt alone, not on which other samples share the batch, and any rollout can be reproduced from its seed.
The behaviour log-probs returned are those of the distribution actually sampled from (guidance, temperature and
filters applied); `grpo_image.logprobs` recomputes the same distribution with gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_image.policies.causal_lm import CausalLMPolicy


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    cfg_scale: float = 1.0
    cfg_logprobs: str = "mixture"  # or "conditional"

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1:
            raise ValueError("sampling: need top_k >= 0, 0 < top_p <= 1 and 0 <= min_p < 1")
        if self.cfg_logprobs not in ("mixture", "conditional"):
            raise ValueError(f"sampling.cfg_logprobs must be mixture or conditional, got {self.cfg_logprobs!r}")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @classmethod
    def from_config(cls, node) -> "SamplingSettings":
        return cls(**{key: node[key] for key in cls.__dataclass_fields__})


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Set the logits of the codes that top-k, then top-p, then min-p remove to -inf ([n, V] -> [n, V]).

    top-p keeps the smallest set of most likely codes whose probability reaches top_p; min-p keeps codes whose
    probability is at least min_p times the most likely one's. Each filter sees the distribution the previous one
    left (renormalised), and the most likely code always survives.
    """
    if top_k <= 0 and top_p >= 1.0 and min_p <= 0.0:  # no filter: skip the mask and the copy it would cost
        return logits
    removed = torch.zeros_like(logits, dtype=torch.bool)  # [n, V]
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [n, 1]
        removed |= logits < kth
    if top_p < 1.0:
        masked = logits.masked_fill(removed, float("-inf"))
        sorted_logits, order = torch.sort(masked, dim=-1, descending=True)  # [n, V]
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # [n, V] probability of the more likely codes
        drop_sorted = mass_before >= top_p
        removed |= torch.zeros_like(removed).scatter(-1, order, drop_sorted)
    if min_p > 0.0:
        probs = logits.masked_fill(removed, float("-inf")).softmax(-1)  # [n, V]
        removed |= probs < min_p * probs.max(-1, keepdim=True).values
    return logits.masked_fill(removed, float("-inf"))


def guided_logits(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Mix conditional rows (first half) and unconditional rows (second half): [2n, V] -> [n, V]."""
    cond, uncond = logits.chunk(2, dim=0)  # [n, V] each
    return uncond + cfg_scale * (cond - uncond)


def code_logprobs(raw_logits: torch.Tensor, settings: SamplingSettings, mix_cfg: bool) -> torch.Tensor:
    """Log-probs of the sampling distribution: guidance, temperature, filters ([R, ..., V] -> [N, ..., V])."""
    logits = raw_logits.float()  # mix, scale and normalise in fp32 whatever the policy's dtype
    logits = guided_logits(logits, settings.cfg_scale) if mix_cfg else logits
    logits = logits / settings.temperature if settings.temperature != 1.0 else logits  # 1.0: no [N, ..., V] copy
    logits = filter_logits(logits, settings.top_k, settings.top_p, settings.min_p)
    return logits.log_softmax(-1)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists so that every row's next token lands in the same column: ids, mask [R, P]."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [R, P]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [R, P]
    for index, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt row {index} encodes to no tokens")
        ids[index, width - len(row) :] = torch.tensor(row)
        mask[index, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def policy_rows(policy: CausalLMPolicy, prompts: list[str], with_uncond: bool) -> list[list[int]]:
    """The prefix of every row the policy runs: N conditional rows, then N unconditional ones under CFG."""
    rows = policy.encode(prompts)
    return rows + policy.encode(prompts, unconditional=True) if with_uncond else rows


def sample_uniforms(seeds: torch.Tensor, length: int) -> torch.Tensor:
    """One seeded stream of uniforms per sample: [N] seeds -> [N, L] in [0, 1)."""
    streams = [torch.rand(length, generator=torch.Generator().manual_seed(int(s))) for s in seeds.tolist()]
    return torch.stack(streams)  # [N, L]


def inverse_cdf_sample(logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one code per row by inverting the CDF at a given uniform: [n, V], [n] -> [n]."""
    cdf = logprobs.exp().cumsum(-1)  # [n, V]
    total = cdf[:, -1:]  # [n, 1], 1 up to rounding
    targets = torch.minimum(uniforms.unsqueeze(-1) * total, total * (1 - 1e-6))  # [n, 1]
    codes = torch.searchsorted(cdf, targets, right=True).squeeze(-1)  # [n]
    return codes.clamp_(max=logprobs.shape[-1] - 1)


@torch.no_grad()
def sample_codes(
    policy: CausalLMPolicy, prompts: list[str], seeds: torch.Tensor, settings: SamplingSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample N code grids with a KV cache: returns codes int64 [N, L] and behaviour log-probs float32 [N, L]."""
    n, length = len(prompts), policy.num_positions
    if seeds.shape != (n,):
        raise ValueError(f"need one seed per prompt: {n} prompts, seeds of shape {tuple(seeds.shape)}")
    device = policy.device
    ids, mask = left_pad(policy_rows(policy, prompts, settings.uses_cfg), policy.pad_token_id, device)  # [R, P]
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)  # [R, P]
    uniforms = sample_uniforms(seeds, length).to(device)  # [N, L]
    codes = torch.empty((n, length), dtype=torch.long, device=device)  # [N, L]
    logprobs = torch.empty((n, length), dtype=torch.float32, device=device)  # [N, L]
    hidden, cache = policy.forward_hidden(ids, mask, positions, use_cache=True)  # [R, P, H]
    next_position = positions[:, -1:] + 1  # [R, 1]
    for t in range(length):
        step_logprobs = code_logprobs(policy.image_logits(hidden[:, -1]), settings, settings.uses_cfg)  # [N, V]
        codes[:, t] = inverse_cdf_sample(step_logprobs, uniforms[:, t])
        logprobs[:, t] = step_logprobs.gather(-1, codes[:, t : t + 1]).squeeze(-1)
        if t + 1 == length:
            break
        step_ids = policy.codes_to_ids(codes[:, t : t + 1])  # [N, 1]
        step_ids = step_ids.repeat(2, 1) if settings.uses_cfg else step_ids  # [R, 1]
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)  # [R, P + t + 1]
        hidden, cache = policy.forward_hidden(step_ids, mask, next_position, cache, use_cache=True)  # [R, 1, H]
        next_position = next_position + 1
    return codes, logprobs

