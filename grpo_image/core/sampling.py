"""Batched KV-cache sampling of fixed-length image-code grids, and the log-probs that training shares with it.

Choices that make the rollouts cheap, bounded and their log-probs exact:
- only the image head is applied at each step ([R, H] x [H, V]), never the text vocabulary;
- classifier-free guidance puts the conditional and unconditional rows in one batch ([2n, ...]), one forward a step;
- each sample draws from its own seeded stream of uniforms (inverse-CDF sampling), so its codes depend on its seed
  and prompt alone, not on which other samples share the batch, and any rollout can be reproduced from its seed;
- rows are sampled `sampling.batch_size` at a time (CFG rows counted), each call with a static KV cache allocated
  once for its prompt + L tokens: memory is bounded by the recipe, never by the number of rollouts;
- each forward attends only over what the cache holds (`Policy.new_cache`): the prefill over the prompt, an eager
  decode step over exactly the tokens written so far, a compiled one over a view rounded up to a multiple of
  COMPILED_VIEW_BUCKET positions, so that its shapes take a few fixed values per call (one compiled graph, and one
  CUDA graph on a GPU, each); a mask is passed only where some row is padded (the causal rule alone hides the
  positions of a view not written yet).

Two distributions are involved (docs/algorithm.md, "Which distribution the log-probs are of"): codes are drawn from
the *sampling* distribution (guidance, temperature, then top-k / top-p / min-p), while the behaviour log-probs
returned, like the training and reference log-probs of `grpo_image.core.logprobs`, are those of the *tempered,
unfiltered* distribution (guided when `cfg_logprobs` is mixture, the conditional policy's when it is conditional).
A softmax over finite logits gives every code a finite log-prob, so no sampled code can score -inf in the ratio or
the KL, however far the policy moves. The price is measured, not assumed: beside each behaviour log-prob the sampler
returns the probability mass its filters removed before that draw (`sample_codes_with_mass`). Everything from the
image head on (its logits, the guidance mixture, the filters, the log-softmax) is fp32 whatever the policy's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_image.core.types import Policy


CHECKPOINT_KEYS = ("temperature", "top_k", "top_p", "min_p")  # null in a recipe: the checkpoint's own value
# positions per KV-cache view of a compiled decode step: L = 4,096 codes take 17 graphs, each attending over at most
# 255 positions not written yet (eager steps attend over exactly the written ones: bucket 1)
COMPILED_VIEW_BUCKET = 256


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    cfg_scale: float = 1.0
    cfg_logprobs: str = "mixture"  # or "conditional"
    batch_size: int = 0  # rows per sampler call, CFG rows counted (0: every row at once)
    compile: bool = False  # torch.compile the one-token decode step

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1:
            raise ValueError("sampling: need top_k >= 0, 0 < top_p <= 1 and 0 <= min_p < 1")
        if self.cfg_logprobs not in ("mixture", "conditional"):
            raise ValueError(f"sampling.cfg_logprobs must be mixture or conditional, got {self.cfg_logprobs!r}")
        if self.batch_size < 0 or 0 < self.batch_size < self.rows_per_prompt:
            raise ValueError(
                f"sampling.batch_size must be 0 (all rows at once) or at least {self.rows_per_prompt} (the rows of "
                f"one prompt{', with CFG' if self.uses_cfg else ''}), got {self.batch_size}"
            )

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def rows_per_prompt(self) -> int:
        """Rows the policy runs per sample: 2 under classifier-free guidance (conditional and unconditional)."""
        return 2 if self.uses_cfg else 1

    @property
    def filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    def samples_per_call(self, n: int) -> int:
        """Samples drawn per sampler call, so that a call runs at most `batch_size` rows."""
        return n if self.batch_size == 0 else max(1, min(n, self.batch_size // self.rows_per_prompt))

    @classmethod
    def from_config(cls, node, unresolved: str = "refuse") -> "SamplingSettings":
        """The recipe's `sampling` node. A null CHECKPOINT_KEYS value is refused unless it was resolved from the policy
        first (`resolve_checkpoint_sampling`); `unresolved="defaults"` puts the defaults in its place, so that a check
        before any model is loaded can validate the other keys."""
        values = {key: node[key] for key in cls.__dataclass_fields__}
        nulls = [key for key in CHECKPOINT_KEYS if values[key] is None]
        if nulls and unresolved != "defaults":
            raise ValueError(f"sampling.{nulls[0]} is null (the checkpoint's own) and was not resolved from a policy")
        return cls(**{**values, **{key: cls.__dataclass_fields__[key].default for key in nulls}})


def resolve_checkpoint_sampling(node, policy) -> dict[str, float]:
    """Fill each null temperature, top_k, top_p, min_p of the recipe's `sampling` node in place with the value the
    policy's checkpoint samples with (`policy.checkpoint_sampling()`), so that config.yaml records what ran; return
    what was filled. A value the recipe sets always wins; a null on a policy that reads no such settings is refused.
    """
    nulls = [key for key in CHECKPOINT_KEYS if node[key] is None]
    if not nulls:
        return {}
    read = getattr(policy, "checkpoint_sampling", None)
    if read is None:
        raise ValueError(
            f"sampling.{nulls[0]} is null (the checkpoint's own value), but a {type(policy).__name__} reads no "
            "sampling settings from its checkpoint: set it in the recipe"
        )
    values = read()
    for key in nulls:
        node[key] = values[key]
    return {key: values[key] for key in nulls}


def removed_codes(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor | None:
    """Where top-k, then top-p, then min-p remove a code: bool [n, V], or None when no filter is on.

    top-p keeps the smallest set of most likely codes whose probability reaches top_p; min-p keeps codes whose
    probability is at least min_p times the most likely one's. Each filter sees the distribution the previous one
    left (renormalised), and the most likely code always survives. A filter that follows none reads the logits
    themselves (masking nothing would be a full copy of the same values).
    """
    removed = None  # [n, V] bool once a filter has run
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [n, 1]
        removed = logits < kth
    if top_p < 1.0:
        masked = logits if removed is None else logits.masked_fill(removed, float("-inf"))
        sorted_logits, order = torch.sort(masked, dim=-1, descending=True)  # [n, V]
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # [n, V] probability of the more likely codes
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)  # [n, V]
        removed = drop if removed is None else removed | drop
    if min_p > 0.0:
        probs = (logits if removed is None else logits.masked_fill(removed, float("-inf"))).softmax(-1)  # [n, V]
        drop = probs < min_p * probs.amax(-1, keepdim=True)  # [n, V]
        removed = drop if removed is None else removed | drop
    return removed


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Set the logits of the codes that top-k, then top-p, then min-p remove to -inf ([n, V] -> [n, V];
    `removed_codes` says which)."""
    removed = removed_codes(logits, top_k, top_p, min_p)
    return logits if removed is None else logits.masked_fill(removed, float("-inf"))  # no filter: no copy


def kept_codes(removed: torch.Tensor) -> torch.Tensor:
    """The filters' kept set as fp32 1.0 (kept) and 0.0 (removed): bool [n, V] -> [n, V], for the arithmetic below.

    Why arithmetic: torch's CPU masked_fill and where branch on every element (about 1 ms over [16, 16,384] logits
    when min-p's mask has no long runs, 4x their cost on a regular mask), while a product or a difference with 0, 1
    or inf is vectorised and gives the same values."""
    return removed.logical_not().to(torch.float32)


def minus_inf_where_removed(logits: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`logits.masked_fill(removed, -inf)` of finite logits, arithmetically (`kept_codes`): [n, V] -> [n, V]."""
    shift = kept.sub(1.0).mul_(float("-inf")).nan_to_num_(nan=0.0, posinf=float("inf"))  # inf removed, 0 kept
    return logits - shift  # a kept logit minus exactly 0 is itself


def exp_where_kept(logits: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """exp of logits that are -inf exactly where `kept` (`kept_codes`) is 0: the same values as `logits.exp()`.

    Why: torch's CPU exp leaves its vectorised path for a vector holding -inf (about 18x slower over [16, 16,384]
    filtered logits, most of them removed by min-p), so the removed entries are computed from 0 and multiplied by 0.
    """
    finite = logits.nan_to_num(nan=float("nan"), posinf=float("inf"), neginf=0.0)  # only -inf changed, to 0
    return finite.exp_().mul_(kept)


def logsumexp_where_kept(logits: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`logits.logsumexp(-1)` of [n, V] logits that are -inf exactly where `kept` is 0, through `exp_where_kept`: the
    steps of torch's own logsumexp (max, shift, exp, sum, log, add back), so the same values: [n]."""
    maxes = logits.amax(-1, keepdim=True)  # [n, 1]
    maxes = maxes.masked_fill(maxes.abs() == float("inf"), 0.0)
    return exp_where_kept(logits - maxes, kept).sum(-1).log_().add_(maxes.squeeze(-1))  # [n]


def guided_logits(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Mix conditional rows (first half) and unconditional rows (second half): [2n, V] -> [n, V]."""
    cond, uncond = logits.chunk(2, dim=0)  # [n, V] each
    return uncond + cfg_scale * (cond - uncond)


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature if temperature != 1.0 else logits  # 1.0: no [n, ..., V] copy


def code_logprobs(raw_logits: torch.Tensor, settings: SamplingSettings, mix_cfg: bool) -> torch.Tensor:
    """Log-probs of the distribution ratios and the KL are computed on: guidance when mixed, temperature, no filter.

    raw_logits: [R, ..., V] (R = 2N when `mix_cfg`, else N); returns [N, ..., V] in fp32 whatever the policy's dtype.
    """
    logits = raw_logits.float()
    logits = guided_logits(logits, settings.cfg_scale) if mix_cfg else logits
    return tempered(logits, settings.temperature).log_softmax(-1)


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


def policy_rows(policy: Policy, prompts: list[str], with_uncond: bool) -> list[list[int]]:
    """The prefix of every row the policy runs: N conditional rows, then N unconditional ones under CFG."""
    rows = policy.encode(prompts)
    return rows + policy.encode(prompts, unconditional=True) if with_uncond else rows


def sample_uniforms(seeds: torch.Tensor, length: int) -> torch.Tensor:
    """One seeded stream of uniforms per sample: [N] seeds -> [N, L] in [0, 1)."""
    streams = [torch.rand(length, generator=torch.Generator().manual_seed(int(s))) for s in seeds.tolist()]
    return torch.stack(streams)  # [N, L]


def inverse_cdf_sample(
    logprobs: torch.Tensor, uniforms: torch.Tensor, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """Draw one code per row by inverting the CDF at a given uniform: [n, V], [n] -> [n]. `kept` [n, V]: 0 where the
    log-probs are -inf (the filters' removed codes, `kept_codes`), if known: the exp is then the fast one."""
    probs = logprobs.exp() if kept is None else exp_where_kept(logprobs, kept)  # [n, V]
    cdf = probs.cumsum(-1)  # [n, V]
    total = cdf[:, -1:]  # [n, 1], 1 up to rounding
    targets = torch.minimum(uniforms.unsqueeze(-1) * total, total * (1 - 1e-6))  # [n, 1]
    codes = torch.searchsorted(cdf, targets, right=True).squeeze(-1)  # [n]
    return codes.clamp_(max=logprobs.shape[-1] - 1)


def draw_codes(
    raw_logits: torch.Tensor, uniforms: torch.Tensor, settings: SamplingSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sampling step from the image logits of every row: codes [n], their behaviour log-probs [n] and the
    probability mass the filters removed [n].

    raw_logits: [R, V] (R = 2n under CFG); uniforms: [n]. The draw uses the filtered sampling distribution; the
    log-prob is of the tempered unfiltered one (guided, or conditional when `cfg_logprobs` says so). The removed mass
    is that of the tempered guided distribution outside the filters' kept set: the sampling distribution is that one
    renormalised over what is kept, so each sampled code's log-prob there is its behaviour log-prob (mixture) minus
    log(1 - removed), the bias the unfiltered log-probs accept (docs/algorithm.md).
    """
    logits = raw_logits.float()  # [R, V]
    mixed = tempered(guided_logits(logits, settings.cfg_scale) if settings.uses_cfg else logits, settings.temperature)
    if not settings.filters:  # the sampling distribution is the behaviour one (unless conditional), nothing removed
        sampling = mixed.log_softmax(-1)  # [n, V]
        codes = inverse_cdf_sample(sampling, uniforms)  # [n]
        removed, mixed_lse = torch.zeros_like(uniforms, dtype=torch.float32), None
    else:
        dropped = removed_codes(mixed, settings.top_k, settings.top_p, settings.min_p)  # [n, V] bool (None: top_k >= V)
        if dropped is not None and dropped.device.type == "cpu" and not bool(dropped.any()):
            dropped = None  # nothing removed: no masking to do (a CPU reads the flag for free, a GPU would wait for it)
        kept_set = None if dropped is None else kept_codes(dropped)  # [n, V] 1.0 / 0.0
        filtered = mixed if kept_set is None else minus_inf_where_removed(mixed, kept_set)  # [n, V]
        sampling = filtered.log_softmax(-1)  # [n, V], -inf where removed
        codes = inverse_cdf_sample(sampling, uniforms, kept_set)  # [n]
        mixed_lse = mixed.logsumexp(-1)  # [n]
        filtered_lse = mixed_lse if kept_set is None else logsumexp_where_kept(filtered, kept_set)  # [n]
        kept = filtered_lse - mixed_lse  # [n], log of the kept mass: <= 0 up to rounding
        removed = (-torch.expm1(kept)).clamp_(min=0.0)  # [n], 1 - kept mass without cancellation
    conditional = settings.uses_cfg and settings.cfg_logprobs == "conditional"
    if conditional:
        behaviour = tempered(logits[: len(codes)], settings.temperature)  # [n, V]
        return codes, behaviour.gather(-1, codes[:, None]).squeeze(-1) - behaviour.logsumexp(-1), removed
    if mixed_lse is None:  # the sampling distribution itself: no second normalisation
        return codes, sampling.gather(-1, codes[:, None]).squeeze(-1), removed
    return codes, mixed.gather(-1, codes[:, None]).squeeze(-1) - mixed_lse, removed


def view_bucket(settings: SamplingSettings) -> int:
    """Positions per KV-cache view step: COMPILED_VIEW_BUCKET for a compiled decode step (fixed shapes), else 1."""
    return COMPILED_VIEW_BUCKET if settings.compile else 1


@torch.no_grad()
def sample_codes(
    policy: Policy, prompts: list[str], seeds: torch.Tensor, settings: SamplingSettings, bucket: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample N code grids, `settings.batch_size` rows per call: codes int64 [N, L], behaviour log-probs fp32 [N, L].

    Each sample's codes depend only on its prompt and seed, so the result is the same for any batch size.
    `bucket`: positions per KV-cache view step (default `view_bucket(settings)`; other values for tests and benchmarks).
    """
    codes, logprobs, _ = sample_codes_with_mass(policy, prompts, seeds, settings, bucket)
    return codes, logprobs


@torch.no_grad()
def sample_codes_with_mass(
    policy: Policy, prompts: list[str], seeds: torch.Tensor, settings: SamplingSettings, bucket: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sample_codes`, plus the probability mass the filters removed before each draw: fp32 [N, L] (0 without one)."""
    n = len(prompts)
    if seeds.shape != (n,):
        raise ValueError(f"need one seed per prompt: {n} prompts, seeds of shape {tuple(seeds.shape)}")
    per_call = settings.samples_per_call(n)
    bucket = view_bucket(settings) if bucket is None else bucket
    pieces = [
        _sample_call(policy, prompts[start : start + per_call], seeds[start : start + per_call], settings, bucket)
        for start in range(0, n, per_call)
    ]
    return tuple(torch.cat([p[i] for p in pieces]) for i in range(3))  # [N, L] each


def _sample_call(
    policy: Policy, prompts: list[str], seeds: torch.Tensor, settings: SamplingSettings, bucket: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sampler call over n samples (R rows): the prefix in one forward, then L - 1 one-token steps, each attending
    over the cache's view of what it holds."""
    n, length, device = len(prompts), policy.num_positions, policy.device
    ids, mask = left_pad(policy_rows(policy, prompts, settings.uses_cfg), policy.pad_token_id, device)  # [R, P]
    rows, prefix = ids.shape
    uniforms = sample_uniforms(seeds, length).to(device)  # [n, L]
    codes = torch.empty((n, length), dtype=torch.long, device=device)  # [n, L]
    logprobs = torch.empty((n, length), dtype=torch.float32, device=device)  # [n, L]
    removed = torch.empty((n, length), dtype=torch.float32, device=device)  # [n, L]
    cache = policy.new_cache(rows, prefix + length - 1, bucket)  # every token but the last code is fed back
    padded = not bool(mask.all())  # without padding, the causal rule is the whole mask
    full_mask = torch.cat([mask, mask.new_ones(rows, length - 1)], dim=1) if padded else None  # [R, P + L - 1]
    code_positions = policy.code_positions(mask, 0, length - 1)  # [R, L - 1] ([3, R, L - 1] for 3-axis RoPE)
    cache.attend_over(prefix, exact=True)  # the prefill attends over the prompt alone
    hidden, _ = policy.forward_hidden(ids, mask, policy.prefix_positions(mask), cache, use_cache=True)  # [R, P, H]
    step_logits = policy.image_logits(hidden[:, -1])  # [R, V]
    decode_step = _decode_step(policy, settings.compile, -(-(prefix + length - 1) // bucket))
    for t in range(length):
        codes[:, t], logprobs[:, t], removed[:, t] = draw_codes(step_logits, uniforms[:, t], settings)
        if t + 1 == length:
            break
        step_ids = policy.codes_to_ids(codes[:, t : t + 1])  # [n, 1]
        step_ids = step_ids.repeat(settings.rows_per_prompt, 1)  # [R, 1]
        width = cache.attend_over(prefix + t + 1)  # code t is written at position P + t
        step_mask = full_mask[:, :width] if padded else None  # [R, width]
        step_logits = decode_step(step_ids, step_mask, code_positions[..., t : t + 1], cache)  # [R, V]
    return codes, logprobs, removed


def _decode_step(policy: Policy, compile_step: bool, views: int):
    """The one-token forward and image head: (ids [R, 1], mask [R, width] or None, positions, cache) -> logits [R, V].

    Compiled once per policy when asked ("reduce-overhead" captures CUDA graphs on a GPU): each of a call's `views`
    cache widths is its own graph, so dynamo may recompile that many times (on top of its default allowance, which
    covers other batch shapes) without falling back to eager.
    """

    def step(step_ids, mask, positions, cache):
        hidden, _ = policy.forward_hidden(step_ids, mask, positions, cache, use_cache=True)  # [R, 1, H]
        return policy.image_logits(hidden[:, -1])  # [R, V]

    if not compile_step:
        return step
    compiled = getattr(policy, "_compiled_decode_step", None)
    if compiled is None:
        mode = "reduce-overhead" if policy.device.type == "cuda" else None
        compiled = torch.compile(step, mode=mode, dynamic=False)
        policy._compiled_decode_step = compiled
    limit = torch._dynamo.config.recompile_limit + views

    def within_limit(*args):
        with torch._dynamo.config.patch(recompile_limit=limit):
            return compiled(*args)

    return within_limit
