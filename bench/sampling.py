"""Rollout sampling: grpo_image's `sample_codes` vs transformers' `generate` vs the bare forwards, same model.

    python bench/sampling.py                      # both models, with and without CFG, 3 interleaved rounds after 1 warm-up
    python bench/sampling.py --models qwen13m --repeats 3 --length 256 --group 16 --cfg-scale 3.0

Same work on every side: the same Qwen2ForCausalLM (the tiny demo model and a 13.2 M parameter Qwen2 with 16,384
image codes, both built from a config), G rows of one prompt, L image codes each, temperature and the same filters
(default: X-Omni's min-p 0.03, top-k and top-p off; `--min-p 0` for none). `generate` is restricted to the image
codes by a LogitsProcessor passed as `logits_processor=` that sets every logit outside the code id range to -inf
before its own warpers run (the cheapest restriction transformers offers: bad_words_ids and
prefix_allowed_tokens_fn do the same in Python per row and are slower); EOS is then never sampled, so it always
runs L steps. With CFG, `generate` gets `guidance_scale` and the unconditional prefix as `negative_prompt_ids`
(transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor: a second forward per step for the unconditional
rows, as X-Omni's generate.py does); ours puts the conditional and unconditional rows in one batch.
`generate` returns codes only; ours also returns the behaviour log-probs the trainer needs (extra work for us).
Ours is the sampler as shipped: a static KV cache allocated once per call, each forward attending over the view of
what it holds (eager: exactly the tokens written). `--bucket B` adds a fourth variant, ours with the views a compiled
decode step takes (the tokens held rounded up to a multiple of B, 256 as shipped), run eagerly: what the fixed shapes
cost in attention on this machine.

The floor: the forwards the sampler cannot avoid, batched as ours are — the prefill, then L-1 single-token
forwards of the decoder with a KV cache over R rows (R = 2G under CFG), and the image head ([R, H] x [H, V]) at
every step, fed pre-drawn codes, with no guidance mixing, filtering or sampling.

Ratios (medians of per-round ratios, [min-max] over rounds): generate/ours > 1 means ours is faster;
ours/floor is the overhead of guidance + filters + sampling on top of the forwards (target <= 1.10);
generate/floor is the most any sampler built on these forwards could gain over `generate` on this machine.
"""

from __future__ import annotations

import argparse
import sys

import torch

from _common import (
    add_round_arguments, build_policy, grid_side, interleaved, load_prompts, med, parameter_count, print_header, ratios,
    save_json, set_threads, spread, table,
)


class ImageCodeRange:
    """LogitsProcessor: only ids lo..hi-1 (the image codes) may be sampled; in place on the float32 scores."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, : self.lo] = float("-inf")
        scores[:, self.hi :] = float("-inf")
        return scores


def make_variants(policy, prompts, settings, seeds, bucket: int = 0):
    """The callables measured for one (model, CFG) setting: ours, generate, the floor (and ours with bucketed views)."""
    from transformers import LogitsProcessorList

    from grpo_image.core.sampling import left_pad, sample_codes

    n, length = len(prompts), policy.num_positions
    model = policy.model
    lo, hi = policy.image_token_offset, policy.image_token_offset + policy.num_codes
    ids, mask = left_pad(policy.encode(prompts), policy.pad_token_id, policy.device)  # [N, P]
    gen_kwargs = dict(
        do_sample=True,
        max_new_tokens=length,
        min_new_tokens=length,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        min_p=settings.min_p if settings.min_p > 0 else None,
        pad_token_id=policy.pad_token_id,
        eos_token_id=policy.tokenizer.eos_token_id,
        use_cache=True,
    )
    if settings.uses_cfg:
        neg_ids, neg_mask = left_pad(policy.encode(prompts, unconditional=True), policy.pad_token_id, policy.device)
        gen_kwargs.update(guidance_scale=settings.cfg_scale, negative_prompt_ids=neg_ids,
                          negative_prompt_attention_mask=neg_mask)
    rows = 2 * n if settings.uses_cfg else n
    floor_codes = torch.randint(0, policy.num_codes, (n, length), generator=torch.Generator().manual_seed(0))
    floor_codes = floor_codes.to(policy.device)  # [N, L]
    floor_prefix = None
    if settings.uses_cfg:
        from grpo_image.core.sampling import policy_rows

        floor_prefix = left_pad(policy_rows(policy, prompts, True), policy.pad_token_id, policy.device)
    else:
        floor_prefix = (ids, mask)

    @torch.no_grad()
    def ours():
        codes, _ = sample_codes(policy, prompts, seeds, settings)
        assert codes.shape == (n, length)

    @torch.no_grad()
    def hf_generate():
        out = model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList(
            [ImageCodeRange(lo, hi)]), **gen_kwargs)
        new = out[:, ids.shape[1]:]
        assert new.shape == (n, length) and bool(((new >= lo) & (new < hi)).all()), "generate left the code range"

    @torch.no_grad()
    def floor():
        f_ids, f_mask = floor_prefix  # [R, P]
        positions = (f_mask.cumsum(-1) - 1).clamp_(min=0)
        hidden, cache = policy.forward_hidden(f_ids, f_mask, positions, use_cache=True)
        next_position = positions[:, -1:] + 1
        step_mask = f_mask
        for t in range(length):
            policy.image_logits(hidden[:, -1])  # [R, V]
            if t + 1 == length:
                break
            step_ids = policy.codes_to_ids(floor_codes[:, t : t + 1])
            step_ids = step_ids.repeat(2, 1) if rows != n else step_ids  # [R, 1]
            step_mask = torch.cat([step_mask, torch.ones_like(step_ids)], dim=1)
            hidden, cache = policy.forward_hidden(step_ids, step_mask, next_position, cache, use_cache=True)
            next_position = next_position + 1

    variants = {"ours": ours, "generate": hf_generate, "floor": floor}
    if bucket:
        variants[f"ours, views of {bucket}"] = torch.no_grad()(
            lambda: sample_codes(policy, prompts, seeds, settings, bucket=bucket))
    return variants


# functions whose cumulative time explains a sampler's step (name as cProfile reports it: file:function)
PROFILED = [
    ("forward_hidden", "causal_lm.py", "forward_hidden"),
    ("image_logits", "causal_lm.py", "image_logits"),
    ("draw_codes (guidance, filters, draw, log-probs)", "sampling.py", "draw_codes"),
    ("  removed_codes (the filters)", "sampling.py", "removed_codes"),
    ("  inverse_cdf_sample", "sampling.py", "inverse_cdf_sample"),
    ("Qwen2 forward, outermost", "modeling_qwen2.py", "forward"),
    ("generate's _sample loop", "utils.py", "_sample"),
    ("logits processors (generate)", "logits_process.py", "__call__"),
    ("  CFG processor: uncond forward", "logits_process.py", "get_unconditional_logits"),
    ("prepare_inputs_for_generation", "utils.py", "prepare_inputs_for_generation"),
    ("cache update in transformers (growing: torch.cat)", "cache_utils.py", "update"),
    ("cache views (ours: write, then slice)", "kv_cache.py", "update"),
]


def profile_once(fn) -> dict:
    """Cumulative CPU seconds of the PROFILED functions in one run of fn (cProfile, process_time clock)."""
    import cProfile
    import pstats
    import time

    profiler = cProfile.Profile(time.process_time)
    profiler.runcall(fn)
    stats = pstats.Stats(profiler).stats
    total = max(v[3] for v in stats.values())
    out = {"total": total}
    for label, filename, function in PROFILED:
        hits = [v for (f, _, name), v in stats.items() if f.endswith(filename) and name == function]
        if hits:  # a function called from itself counts once: the outermost calls' cumulative time
            out[label] = max(h[3] for h in hits) if len(hits) > 1 else hits[0][3]
    return out


def print_profiles(profiles: dict) -> None:
    print("\nwhere the CPU time goes (cProfile, one run each, cumulative seconds; nested rows are included above):")
    for label, per_variant in profiles.items():
        names = list(per_variant)
        rows = []
        for key in ["total"] + [p[0] for p in PROFILED]:
            if any(key in per_variant[n] for n in names):
                rows.append([key] + [f"{per_variant[n][key]:.3f}" if key in per_variant[n] else "-" for n in names])
        print(f"\n{label}")
        print(table(["function"] + names, rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "qwen13m"], choices=["tiny", "qwen13m"])
    parser.add_argument("--group", type=int, default=16, help="G: rows sampled (one prompt, G seeds)")
    parser.add_argument("--length", type=int, default=256, help="L: image codes per row (a square grid)")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="guidance scale of the CFG runs")
    parser.add_argument("--no-cfg-only", action="store_true", help="skip the CFG runs")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.03)
    parser.add_argument("--bucket", type=int, default=0,
                        help="also measure ours with a compiled step's KV-cache views of this many positions, eagerly")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, run each variant once under cProfile and print where its time goes")
    add_round_arguments(parser, repeats=3, text_vocab=True)
    args = parser.parse_args(argv)

    from grpo_image.core.sampling import SamplingSettings

    set_threads(args.threads)
    side = grid_side(parser, args.length)
    cfg_scales = [1.0] if args.no_cfg_only else [1.0, args.cfg_scale]
    print_header("sampling: sample_codes vs generate vs bare forwards", vars(args))
    prompt = load_prompts()[0]["prompt"]
    prompts = [prompt] * args.group
    seeds = torch.arange(args.group) + 1000
    raw, rows, profiles = {}, [], {}
    for model_name in args.models:
        policy = build_policy(model_name, (side, side), text_vocab=args.text_vocab)
        policy.model.eval()
        print(f"model {model_name}: {parameter_count(policy.model) / 1e6:.2f} M parameters, vocabulary "
              f"{policy.model.get_output_embeddings().weight.shape[0]}, {policy.num_codes} image codes", flush=True)
        for scale in cfg_scales:
            settings = SamplingSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                        min_p=args.min_p, cfg_scale=scale)
            label = f"{model_name}, {'CFG ' + format(scale, 'g') if scale != 1.0 else 'no CFG'}"
            print(f"{label}:", flush=True)
            variants = make_variants(policy, prompts, settings, seeds, args.bucket)
            results = interleaved(variants, args.repeats, args.warmup)
            if args.profile:
                profiles[label] = {name: profile_once(fn) for name, fn in variants.items()}
            raw[label] = {k: [s.__dict__ for s in v] for k, v in results.items()}
            wall = {k: [s.wall for s in v] for k, v in results.items()}
            cpu = {k: [s.cpu for s in v] for k, v in results.items()}
            tokens = args.group * args.length
            rows.append([
                label,
                spread(wall["ours"]), spread(wall["generate"]), spread(wall["floor"]),
                spread(cpu["ours"]), spread(cpu["generate"]), spread(cpu["floor"]),
                f"{tokens / med(wall['ours']):.0f}",
                f"{1000 * med(wall['ours']) / args.length:.2f}",
                spread(ratios(wall["generate"], wall["ours"]), 2),
                spread(ratios(cpu["generate"], cpu["ours"]), 2),
                spread(ratios(wall["ours"], wall["floor"]), 2),
                spread(ratios(cpu["ours"], cpu["floor"]), 2),
                spread(ratios(cpu["generate"], cpu["floor"]), 2),
            ] + ([spread(ratios(cpu[f"ours, views of {args.bucket}"], cpu["floor"]), 2)] if args.bucket else []))
    print()
    print(f"G = {args.group} rows, L = {args.length} codes, {args.repeats} interleaved rounds; "
          "seconds as median [min-max]")
    print(table(
        ["setting", "ours wall s", "generate wall s", "floor wall s", "ours cpu s", "generate cpu s", "floor cpu s",
         "ours codes/s", "ours ms/step", "generate/ours wall", "generate/ours cpu", "ours/floor wall",
         "ours/floor cpu", "generate/floor cpu"]
        + ([f"ours (views of {args.bucket})/floor cpu"] if args.bucket else []),
        rows,
    ))
    if profiles:
        print_profiles(profiles)
    save_json(args.json, {"settings": vars(args), "results": raw, "profiles": profiles})
    return 0


if __name__ == "__main__":
    sys.exit(main())
