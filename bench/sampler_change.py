"""What the sampler's two changes cost: a static KV cache, and log-probs of the unfiltered distribution.

    python bench/sampler_change.py                      # qwen13m, G=16 rows, L=256 codes, min-p 0.03, 3 rounds
    python bench/sampler_change.py --model tiny --repeats 5

Sampling, four variants on the same model, prompt and seeds (X-Omni's min-p 0.03, temperature 1, no CFG):
  before     the sampler as it was: a DynamicCache grown by concatenation and a mask grown every step; behaviour
             log-probs of the filtered distribution (the one drawn from: no second normalisation);
  unfiltered the same growing cache, log-probs of the unfiltered distribution (the log-prob change alone);
  now        grpo_image's `sample_codes`: a static cache allocated once for P + L tokens, unfiltered log-probs (both
             changes; since BENCHMARKS.md section 7 its forwards attend over the view of what the cache holds,
             where section 6 measured them over the whole cache with a fixed-width mask);
  floor      the bare forwards: prefill, then L - 1 single-token forwards with a growing cache and the image head,
             fed pre-drawn codes (no filter, no draw).
The training side, one step's policy pass on N rows: teacher-forced log-probs with grad, the GRPO loss, backward
and an AdamW step, with the filters applied to the current logits (before) or not (now).

Ratios are medians of per-round ratios over interleaved rounds, [min-max] over the rounds; > 1 means the first
variant takes longer.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from _common import (
    add_round_arguments, build_policy, grid_side, interleaved, load_prompts, med, parameter_count, print_header,
    ratios, save_json, set_threads, spread, table,
)


def growing_cache_sampler(policy, prompts, seeds, settings, filtered_logprobs: bool):
    """The sampler before the static cache, optionally with its filtered behaviour log-probs: codes, log-probs."""
    from grpo_image.core.sampling import draw_codes, filter_logits, guided_logits, left_pad, policy_rows, sample_uniforms
    from grpo_image.core.sampling import inverse_cdf_sample, tempered

    ids, mask = left_pad(policy_rows(policy, prompts, settings.uses_cfg), policy.pad_token_id, policy.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    uniforms = sample_uniforms(seeds, policy.num_positions)
    hidden, cache = policy.forward_hidden(ids, mask, positions, use_cache=True)
    codes, logprobs = [], []
    for t in range(policy.num_positions):
        logits = policy.image_logits(hidden[:, -1]).float()  # [R, V]
        if filtered_logprobs:
            mixed = tempered(guided_logits(logits, settings.cfg_scale) if settings.uses_cfg else logits,
                             settings.temperature)
            sampling = filter_logits(mixed, settings.top_k, settings.top_p, settings.min_p).log_softmax(-1)
            code = inverse_cdf_sample(sampling, uniforms[:, t])
            logprob = sampling.gather(-1, code[:, None]).squeeze(-1)
        else:
            code, logprob = draw_codes(logits, uniforms[:, t], settings)
        codes.append(code)
        logprobs.append(logprob)
        if t + 1 == policy.num_positions:
            break
        step = policy.codes_to_ids(code[:, None]).repeat(settings.rows_per_prompt, 1)  # [R, 1]
        mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        positions = positions[:, -1:] + 1
        hidden, cache = policy.forward_hidden(step, mask, positions, cache, use_cache=True)
    return torch.stack(codes, 1), torch.stack(logprobs, 1)


def sampling_variants(policy, prompts, seeds, settings):
    from grpo_image.core.sampling import left_pad, sample_codes

    floor_codes = torch.randint(0, policy.num_codes, (len(prompts), policy.num_positions),
                                generator=torch.Generator().manual_seed(0))  # [N, L]

    @torch.no_grad()
    def floor():
        ids, mask = left_pad(policy.encode(prompts), policy.pad_token_id, policy.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden, cache = policy.forward_hidden(ids, mask, positions, use_cache=True)
        for t in range(policy.num_positions):
            policy.image_logits(hidden[:, -1])
            if t + 1 == policy.num_positions:
                break
            step = policy.codes_to_ids(floor_codes[:, t : t + 1])
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            positions = positions[:, -1:] + 1
            hidden, cache = policy.forward_hidden(step, mask, positions, cache, use_cache=True)

    return {
        "before": torch.no_grad()(lambda: growing_cache_sampler(policy, prompts, seeds, settings, True)),
        "unfiltered": torch.no_grad()(lambda: growing_cache_sampler(policy, prompts, seeds, settings, False)),
        "now": torch.no_grad()(lambda: sample_codes(policy, prompts, seeds, settings)),
        "floor": floor,
    }


@contextlib.contextmanager
def filtered_training_logprobs():
    """The training log-probs as they were: the filters re-applied to the current logits (-inf outside them).

    Patched for a whole step, backward included: the image head's chunks are recomputed in the backward pass."""
    import grpo_image.core.logprobs as logprobs_module
    from grpo_image.core.sampling import code_logprobs, filter_logits

    def filtered(raw, s, mix):
        logits = code_logprobs(raw, s, mix)  # normalised, so filtering it equals filtering the logits
        flat = filter_logits(logits.reshape(-1, logits.shape[-1]), s.top_k, s.top_p, s.min_p)
        return flat.log_softmax(-1).view_as(logits)

    logprobs_module.code_logprobs = filtered
    try:
        yield
    finally:
        logprobs_module.code_logprobs = code_logprobs


def step_variants(policy, prompts, codes, old, settings, lr: float):
    from grpo_image.core.logprobs import teacher_forced_logprobs
    from grpo_image.core.loss import grpo_loss

    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=lr)
    advantages = torch.randn(len(prompts), generator=torch.Generator().manual_seed(1))

    def step(context):
        def run():
            with context():
                optimizer.zero_grad(set_to_none=True)
                logp = teacher_forced_logprobs(policy, prompts, codes, settings)
                loss, _ = grpo_loss(logp, old, old.detach(), advantages, clip_eps_low=0.2, clip_eps_high=0.28, beta=0.01)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
                optimizer.step()
        return run

    return {"before": step(filtered_training_logprobs), "now": step(contextlib.nullcontext)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen13m", choices=["tiny", "qwen13m"])
    parser.add_argument("--group", type=int, default=16, help="G: rows sampled (one prompt, G seeds)")
    parser.add_argument("--length", type=int, default=256, help="L: image codes per row (a square grid)")
    parser.add_argument("--min-p", type=float, default=0.03)
    parser.add_argument("--lr", type=float, default=1e-6)
    add_round_arguments(parser, repeats=3)
    args = parser.parse_args(argv)

    from grpo_image.core.sampling import SamplingSettings

    set_threads(args.threads)
    side = grid_side(parser, args.length)
    print_header("sampler change: static KV cache and unfiltered log-probs", vars(args))
    policy = build_policy(args.model, (side, side))
    policy.model.eval()
    print(f"model {args.model}: {parameter_count(policy.model) / 1e6:.2f} M parameters, {policy.num_codes} codes")
    prompts = [load_prompts()[0]["prompt"]] * args.group
    seeds = torch.arange(args.group) + 1000
    settings = SamplingSettings(min_p=args.min_p)
    sampled = interleaved(sampling_variants(policy, prompts, seeds, settings), args.repeats, args.warmup)
    codes, old = sampling_variants(policy, prompts, seeds, settings)["now"]()
    policy.model.train()
    stepped = interleaved(step_variants(policy, prompts, codes, old, settings, args.lr), args.repeats, args.warmup)

    def wall(results, name):
        return [s.wall for s in results[name]]

    rows = [[name, spread(wall(sampled, name)), spread([s.cpu for s in sampled[name]])] for name in sampled]
    rows += [[f"step {name}", spread(wall(stepped, name)), spread([s.cpu for s in stepped[name]])] for name in stepped]
    print()
    print(f"G = {args.group} rows, L = {args.length} codes, min-p {args.min_p}, {args.repeats} interleaved rounds")
    print(table(["variant", "wall s", "cpu s"], rows))
    print()
    pairs = [
        ("sampling: before / now", sampled, "before", "now"),
        ("sampling: unfiltered log-probs / before (the log-prob change)", sampled, "unfiltered", "before"),
        ("sampling: now / unfiltered (the static cache)", sampled, "now", "unfiltered"),
        ("sampling: now / floor", sampled, "now", "floor"),
        ("step: before / now", stepped, "before", "now"),
    ]
    print(table(["ratio (wall)", "median [min-max]"],
                [[label, spread(ratios(wall(r, a), wall(r, b)), 2)] for label, r, a, b in pairs]))
    save_json(args.json, {"settings": vars(args), "sampling": {k: [s.__dict__ for s in v] for k, v in sampled.items()},
                          "step": {k: [s.__dict__ for s in v] for k, v in stepped.items()},
                          "medians": {label: med(ratios(wall(r, a), wall(r, b))) for label, r, a, b in pairs}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
