"""One GRPO step: grpo_image's `grpo_step` vs TRL's GRPOTrainer on the identical model and work, phase by phase.

    python bench/grpo_step.py                     # qwen13m, B=1 prompt x G=16, L=256, 3 interleaved rounds
    python bench/grpo_step.py --model tiny --batch 2 --repeats 5

The same saved Qwen2ForCausalLM folder is loaded by both sides in float32 (TRL: `model=<folder>`, its reference
model loaded from the same folder; ours: `tiny_policy(path=<folder>)`, reference = a frozen copy), with:

- the same prompts (prompts/tiny_colors.jsonl, formatted with the policy's template `{prompt}<SOM>h w<IMAGE>`),
  B prompts x G rollouts a step, L image codes each;
- generation restricted to the image codes. TRL generates text: its model's `generate` is wrapped to receive
  `logits_processor=[ImageCodeRange]` (bench/sampling.py's processor: every logit outside the code id range set to
  -inf, the cheapest restriction transformers offers; `--trl-suppress-tokens` uses TRL's own route instead,
  `generation_kwargs={"suppress_tokens": [...]}`, which costs an isin over the vocabulary every step). It then
  samples image codes only and never EOS, so every completion is exactly L tokens (`max_completion_length=L`).
  No other filter on either side (temperature 1, top-k/top-p/min-p off), no CFG (TRL has none);
- the same loss: PPO clip eps 0.2 both sides, k3 KL with beta 0.01 to a frozen reference, token mean
  (TRL `loss_type="dapo"`: sum over tokens / number of tokens in the batch, which equals our token mean since
  every completion has L tokens), group-normalised advantages (`scale_rewards="group"`), one inner epoch, one
  optimizer step a step (TRL: per_device_train_batch_size = N, no gradient accumulation);
- the same optimizer: torch AdamW, same lr, betas (0.9, 0.999), weight decay 0, grad-norm clip 1.0, constant lr;
- the same reward, in the trainer's process: codes -> PaletteDecoder (one colour per code, 1 px per code) ->
  ColorAdherence against the prompt's colour (cheap, so that the policy work dominates);
- float32 on both sides, no gradient checkpointing (TRL's defaults are bf16 and gradient checkpointing on:
  both are switched off here so that the two do the same arithmetic).

What still differs (TRL cannot be told otherwise): TRL's training and reference log-probs are normalised over the
full vocabulary (16,645 ids by default: the codes plus 261 text/special ids that were masked when sampling;
`--text-vocab 152064` gives the model Qwen2.5's text vocabulary), ours over the 16,384 codes actually sampled
from; TRL also computes the entropy in its policy pass, tokenizes the prompts and decodes the completions to text
every step. Ours keeps the sampler's behaviour log-probs; TRL uses the detached
policy log-probs as the old ones (no extra pass on either side).

Rounds are interleaved: TRL runs `max_steps = warmup + repeats` steps, and a TrainerCallback runs one step of
ours right after each TRL step ends (TRL step i, our step i, TRL step i+1, ...). Phases are timed by wrapping
the functions each side calls (wall and CPU seconds of this process):
  generation   ours: sample_rollout (sample_codes);  TRL: _generate (tokenize, generate, decode)
  ref logprobs ours: _reference_logprobs;             TRL: _get_per_token_logps_and_entropies without grad
  reward       ours: pool.gather (decode + score);    TRL: _calculate_rewards
  update       ours: _update (policy log-probs with grad, loss, backward, clip, AdamW);
               TRL: the step minus _generate_and_score_completions (the same, via Trainer.training_step)
  other        the step minus the phases above (advantages, padding, metrics)
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from _common import (
    PROMPTS_FILE, add_round_arguments, build_policy, code_colors, grid_side, load_prompts, med, parameter_count,
    print_header, ratios, save_json, set_threads, spread, table,
)

PHASES = ["generation", "ref logprobs", "reward", "update", "other", "total"]


class PhaseClock:
    """Accumulates wall and CPU seconds per named phase over one step, through wrapped functions."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()

    def wrap(self, name, fn):
        """`name` is a phase name or a function of no argument that returns one (None: not timed)."""

        def wrapper(*args, **kwargs):
            phase = name() if callable(name) else name
            if phase is None:
                return fn(*args, **kwargs)
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[phase] += time.perf_counter() - w0
                self.cpu[phase] += time.process_time() - c0

        return wrapper


def grad_phase(with_grad: str, without_grad: str):
    return lambda: with_grad if torch.is_grad_enabled() else without_grad


# ------------------------------------------------------------------------------------------------------- ours


def build_ours(model_dir: Path, args, clock: PhaseClock):
    from omegaconf import OmegaConf, open_dict

    import grpo_image.training.train as train_mod
    from grpo_image.base.config import load_recipe

    cfg = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "tiny_cpu.yaml", [
        f"data.prompts={PROMPTS_FILE}", f"data.batch_size={args.batch}", f"data.group_size={args.group}",
        "train.mode=full", f"train.lr={args.lr}", f"train.beta={args.beta}", "train.minibatches=1",
        "train.inner_epochs=1", "train.clip_eps_low=0.2", "train.clip_eps_high=0.2", "train.max_grad_norm=1.0",
        "train.weight_decay=0.0", "train.scheduler=constant", "workers.backend=inprocess", "workers.prefetch=false",
        "sample_every=0", "logging.tensorboard=false",
    ])
    with open_dict(cfg):
        cfg.policy = OmegaConf.create({"_component_": "grpo_image.policies.tiny.tiny_policy", "path": str(model_dir),
                                       "grid": [args.side, args.side]})
        cfg.decoder = OmegaConf.create({"_component_": "grpo_image.decoders.palette.PaletteDecoder", "patch_size": 1,
                                        "colors": code_colors(args.num_codes)})
        cfg.rewards = OmegaConf.create([{"name": "color", "weight": 1.0, "required": True,
                                         "scorer": {"_component_": "rewards.color.ColorAdherence", "tolerance": 60.0}}])
    trainer = train_mod.build_trainer(cfg)
    # time the phases by wrapping the functions grpo_step calls (module globals and the pool's method)
    train_mod.sample_rollout = clock.wrap("generation", train_mod.sample_rollout)
    train_mod._reference_logprobs = clock.wrap("ref logprobs", train_mod._reference_logprobs)
    train_mod._update = clock.wrap("update", train_mod._update)
    train_mod.teacher_forced_logprobs = clock.wrap(grad_phase("update: policy fwd", None),
                                                   train_mod.teacher_forced_logprobs)
    trainer.pool.gather = clock.wrap("reward", trainer.pool.gather)
    return trainer


# -------------------------------------------------------------------------------------------------------- TRL


def build_trl(model_dir: Path, args, clock: PhaseClock, callback):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from grpo_image.decoders.palette import PaletteDecoder
    from rewards.color import ColorAdherence

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = build_policy_meta(tokenizer, args)
    lo, hi, vocab = policy
    decoder = PaletteDecoder(patch_size=1, colors=code_colors(args.num_codes))
    scorer = ColorAdherence(tolerance=60.0)
    grid = (args.side, args.side)

    def color_reward(prompts, completions, completion_ids, color, **kwargs):
        codes = np.asarray(completion_ids, dtype=np.int64) - lo  # [N, L]
        if codes.ndim != 2 or codes.shape[1] != grid[0] * grid[1] or codes.min() < 0 or codes.max() >= args.num_codes:
            raise RuntimeError("TRL generated something other than L image codes: the restriction is not applied")
        images = decoder(codes, grid, np.zeros(len(codes), dtype=np.int64))
        return scorer(images, list(prompts), [{"color": c} for c in color]).scores.tolist()

    template = "{prompt}<SOM>{h} {w}<IMAGE>"
    records = load_prompts()
    dataset = Dataset.from_list([
        {"prompt": template.format(prompt=r["prompt"], h=args.side, w=args.side), "color": r["metadata"]["color"]}
        for r in records
    ])
    n = args.batch * args.group
    config = GRPOConfig(
        output_dir=str(Path(args.workdir) / "trl_out"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=args.trl_gradient_checkpointing,
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_generations=args.group,
        max_completion_length=args.side * args.side,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        generation_kwargs=(
            {"suppress_tokens": list(range(0, lo)) + list(range(hi, vocab))} if args.trl_suppress_tokens else None
        ),
        beta=args.beta,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        learning_rate=args.lr,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        max_steps=args.warmup + args.repeats + (1 if args.profile else 0),
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
    )
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[color_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[callback])
    if not args.trl_suppress_tokens:  # restrict TRL's generate to the codes with the same processor as sampling.py
        from transformers import LogitsProcessorList

        from sampling import ImageCodeRange

        trainer.model.generate = functools.partial(
            trainer.model.generate, logits_processor=LogitsProcessorList([ImageCodeRange(lo, hi)]))
    trainer._generate = clock.wrap("generation", trainer._generate)
    trainer._get_per_token_logps_and_entropies = clock.wrap(
        grad_phase("update: policy fwd", "ref logprobs"), trainer._get_per_token_logps_and_entropies)
    trainer._calculate_rewards = clock.wrap("reward", trainer._calculate_rewards)
    trainer._generate_and_score_completions = clock.wrap("gen+score", trainer._generate_and_score_completions)
    return trainer


def build_policy_meta(tokenizer, args) -> tuple[int, int, int]:
    """(first code id, one past the last, vocabulary size) from the saved tokenizer."""
    lo = tokenizer.get_vocab()["<img_0>"]
    return lo, lo + args.num_codes, args.vocab_size


# ---------------------------------------------------------------------------------------------------- the run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen13m", choices=["tiny", "qwen13m"])
    parser.add_argument("--batch", type=int, default=1, help="B: prompts a step")
    parser.add_argument("--group", type=int, default=16, help="G: rollouts per prompt")
    parser.add_argument("--length", type=int, default=256, help="L: image codes per rollout (a square)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="leave TRL's default gradient checkpointing on (not identical work: ours does not)")
    parser.add_argument("--trl-suppress-tokens", action="store_true",
                        help="restrict TRL's generation with generation_kwargs suppress_tokens instead")
    parser.add_argument("--profile", action="store_true",
                        help="one more round, not timed: each side's step under torch.profiler, top operators printed")
    add_round_arguments(parser, repeats=3, text_vocab=True)
    args = parser.parse_args(argv)
    args.side = grid_side(parser, args.length)
    set_threads(args.threads)
    print_header("GRPO step: grpo_image vs TRL GRPOTrainer", vars(args))

    from transformers import TrainerCallback

    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        model_dir = Path(workdir) / "policy"
        policy = build_policy(args.model, (args.side, args.side), text_vocab=args.text_vocab)
        args.num_codes = policy.num_codes
        args.vocab_size = policy.model.get_output_embeddings().weight.shape[0]
        policy.save_pretrained(model_dir)
        print(f"model {args.model}: {parameter_count(policy.model) / 1e6:.2f} M parameters, vocabulary "
              f"{args.vocab_size} ({args.num_codes} image codes), saved to {model_dir}")
        del policy

        clock = PhaseClock()
        ours_clock = PhaseClock()
        records: dict[str, list[dict]] = {"ours": [], "trl": []}
        ours = build_ours(model_dir, args, ours_clock)

        profiles: dict[str, str] = {}

        class Interleave(TrainerCallback):
            """TRL step i is timed from on_step_begin to on_step_end; then our step i runs."""

            def on_step_begin(self, a, state, control, **kw):
                clock.reset()
                self.profiler = None
                if state.global_step + 1 > args.warmup + args.repeats:  # the extra --profile round
                    self.profiler = operator_profiler()
                    self.profiler.__enter__()
                self.c0, self.w0 = time.process_time(), time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                wall, cpu = time.perf_counter() - self.w0, time.process_time() - self.c0
                step = state.global_step
                if self.profiler is not None:
                    self.profiler.__exit__(None, None, None)
                    profiles["TRL"] = top_operators(self.profiler)
                    from grpo_image.training.train import grpo_step

                    with operator_profiler() as prof:
                        grpo_step(ours, step)
                    profiles["ours"] = top_operators(prof)
                    print(f"  [profiled round] TRL: wall {wall:.2f} s, cpu {cpu:.2f} s", flush=True)
                    return
                records["trl"].append(finish_trl(clock, wall, cpu))
                ours_clock.reset()
                c0, w0 = time.process_time(), time.perf_counter()
                from grpo_image.training.train import grpo_step

                metrics, _ = grpo_step(ours, step)
                wall_o, cpu_o = time.perf_counter() - w0, time.process_time() - c0
                records["ours"].append(finish_ours(ours_clock, wall_o, cpu_o))
                tag = "warm-up" if step <= args.warmup else f"round {step - args.warmup}/{args.repeats}"
                print(f"  [{tag}] TRL: wall {wall:.2f} s, cpu {cpu:.2f} s | ours: wall {wall_o:.2f} s, "
                      f"cpu {cpu_o:.2f} s (reward {metrics['reward/total/mean']:.3f})", flush=True)

        trl_trainer = build_trl(model_dir, args, clock, Interleave())
        trl_trainer.train()

    kept = {side: rows[args.warmup:] for side, rows in records.items()}
    for side, text in profiles.items():
        print(f"\n{side}: one step under torch.profiler, operators by self CPU time (profiler overhead included)")
        print(text)
    print()
    print(f"B = {args.batch}, G = {args.group}, N = {args.batch * args.group}, L = {args.length}; "
          f"{args.repeats} interleaved rounds; seconds as median [min-max]")
    rows = []
    for phase in PHASES:
        row = [phase]
        for kind in ("wall", "cpu"):
            o = [r[kind].get(phase, 0.0) for r in kept["ours"]]
            t = [r[kind].get(phase, 0.0) for r in kept["trl"]]
            ratio = spread(ratios(o, t), 2) if min(t) > 0 else "-"
            row += [spread(o), spread(t), ratio]
        rows.append(row)
    print(table(["phase", "ours wall s", "TRL wall s", "ours/TRL wall", "ours cpu s", "TRL cpu s", "ours/TRL cpu"],
                rows))
    sub = [["update: policy fwd (part of update)",
            spread([r["wall"].get("update: policy fwd", 0.0) for r in kept["ours"]]),
            spread([r["wall"].get("update: policy fwd", 0.0) for r in kept["trl"]])]]
    print()
    print(table(["sub-phase", "ours wall s", "TRL wall s"], sub))
    cpu_ratio = ratios([r["cpu"]["total"] for r in kept["ours"]], [r["cpu"]["total"] for r in kept["trl"]])
    print(f"\nstep CPU time ours/TRL: median {med(cpu_ratio):.2f} (target <= 0.50)")
    save_json(args.json, {"settings": {k: v for k, v in vars(args).items() if k != "workdir"}, "records": records,
                          "profiles": profiles})
    return 0


def operator_profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU])


# operator families of the step, by the aten name's leading words (first match wins)
FAMILIES = [
    ("matmul (mm, addmm, bmm, linear)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")),
    ("attention (SDPA, fwd + bwd)", ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    ("softmax / log_softmax / logsumexp (fwd + bwd)", ("aten::_softmax", "aten::_log_softmax", "aten::softmax",
                                                        "aten::log_softmax", "aten::logsumexp")),
    ("copies, cat, layout (copy_, cat, to, t, transpose, ...)", (
        "aten::copy_", "aten::cat", "aten::_to_copy", "aten::to", "aten::t", "aten::transpose", "aten::contiguous",
        "aten::clone", "aten::empty", "aten::as_strided", "aten::view", "aten::slice", "aten::select",
        "aten::expand", "aten::reshape", "aten::_unsafe_view", "aten::unsqueeze", "aten::squeeze", "aten::index",
        "aten::gather", "aten::scatter", "aten::embedding", "aten::fill_", "aten::zero", "aten::resize")),
    ("optimizer (AdamW, grad clip)", ("Optimizer", "aten::_foreach", "aten::norm", "aten::linalg_vector_norm")),
]


def top_operators(prof, rows: int = 15) -> str:
    """Self CPU time by operator family, then the top operators."""
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    family_time = {name: 0.0 for name, _ in FAMILIES}
    family_time["other (elementwise: mul, add, pow, rsqrt, silu, ...; Python)"] = 0.0
    for event in averages:
        for name, prefixes in FAMILIES:
            if event.key.startswith(prefixes):
                family_time[name] += event.self_cpu_time_total
                break
        else:
            family_time["other (elementwise: mul, add, pow, rsqrt, silu, ...; Python)"] += event.self_cpu_time_total
    summary = table(["operator family", "self CPU s", "share"],
                    [[name, f"{t / 1e6:.3f}", f"{100 * t / total:.0f}%"] for name, t in family_time.items()])
    top = averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50)
    return summary + "\n" + top


def finish_ours(clock: PhaseClock, wall: float, cpu: float) -> dict:
    out = {"wall": dict(clock.wall), "cpu": dict(clock.cpu)}
    for kind, total in (("wall", wall), ("cpu", cpu)):
        d = out[kind]
        d["total"] = total
        d["other"] = total - sum(d.get(p, 0.0) for p in ("generation", "ref logprobs", "reward", "update"))
    return out


def finish_trl(clock: PhaseClock, wall: float, cpu: float) -> dict:
    out = {"wall": dict(clock.wall), "cpu": dict(clock.cpu)}
    for kind, total in (("wall", wall), ("cpu", cpu)):
        d = out[kind]
        d["total"] = total
        gen_score = d.pop("gen+score", 0.0)
        d["update"] = total - gen_score
        d["other"] = gen_score - sum(d.get(p, 0.0) for p in ("generation", "ref logprobs", "reward"))
    return out


if __name__ == "__main__":
    sys.exit(main())
