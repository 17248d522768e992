"""Pipeline: step time with the Ray reward pool's overlap (and with workers.prefetch) vs the in-process pool.

    python bench/pipeline.py                          # reward time = the measured rollout time, 5 rounds
    python bench/pipeline.py --reward-seconds 2.0 --busy --repeats 8

The demo recipe (recipes/tiny_cpu.yaml: tiny Qwen2 policy, palette decoder), with a 16 x 16 grid (L = 256) and
B x G = 2 x 8 rollouts a step (`--model qwen13m`: the 13.2 M parameter Qwen2 of the other benchmarks instead),
and one reward: bench_rewards.FixedTimeReward, which takes a fixed time per call (`--reward-seconds`; by default
the median rollout time measured first, so the reward is as slow as the rollout).
It sleeps by default (a reward computed elsewhere: a GPU model, a judge server); `--busy` makes it spin on the CPU
instead (a reward competing with the trainer for the same cores).

Three trainers are built from the same recipe and stepped in turn, round by round (A B C, A B C, ...):
  inprocess     workers.backend=inprocess: decode and score inside the trainer's process, nothing overlaps
  ray           workers.backend=ray (1 actor): the rewards run while the trainer computes the reference log-probs
  ray+prefetch  the same, and the next step's rollouts are sampled while this step's rewards run

In each round a variant runs two consecutive steps and only the second is timed: with prefetch, the rewards a
step waits for were submitted during the step before it, so the timed step sees the overlap of a steady run
(its rewards had the previous step of the same trainer to run in, never another variant's step). After the
timed step the variant's outstanding rewards are waited for, untimed, so that no work of one variant runs (or
uses the CPU) while another is timed.

The fraction of reward time saved per step is (step_inprocess - step_variant) / reward_seconds, per round;
1.0 means the reward's time is hidden entirely, 0 that the step waits for all of it (target >= 0.40). It carries
the noise of the whole step; the fraction hidden, (wait_inprocess - wait_variant) / reward_seconds from the
trainer's own `time/reward_wait`, isolates the wait and is steadier.
Wall seconds are what the overlap saves; CPU seconds are reported for the trainer's process and, for the Ray
variants, for the trainer plus every Ray process (psutil over its descendants), which shows the pool's own cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _common import (
    PROMPTS_FILE, REPO, add_round_arguments, code_colors, cpu_seconds_with_children, grid_side, med, print_header,
    save_json, set_threads, spread, table,
)

VARIANTS = ("inprocess", "ray", "ray+prefetch")


def build(variant: str, args, reward_seconds: float):
    from omegaconf import OmegaConf, open_dict

    from grpo_image.base.config import load_recipe
    from grpo_image.training.train import build_trainer

    overrides = [
        f"data.prompts={PROMPTS_FILE}", f"data.batch_size={args.batch}", f"data.group_size={args.group}",
        f"policy.grid=[{args.side},{args.side}]", f"steps={2 * (args.warmup + args.repeats) + 2}", "sample_every=0",
        "logging.tensorboard=false", f"workers.backend={'inprocess' if variant == 'inprocess' else 'ray'}",
        f"workers.prefetch={'true' if variant == 'ray+prefetch' else 'false'}", f"workers.num_workers={args.workers}",
        "workers.num_cpus=0",
    ]
    if args.model == "qwen13m":  # bench/_common.py's 13.2 M parameter Qwen2 with 16,384 codes
        overrides += ["policy.num_codes=16384", "policy.hidden_size=256", "policy.num_layers=8",
                      "policy.num_heads=4", "policy.num_kv_heads=2"]
    cfg = load_recipe(REPO / "recipes" / "tiny_cpu.yaml", overrides)
    with open_dict(cfg):
        if args.model == "qwen13m":
            cfg.decoder.colors = code_colors(16384)
            cfg.decoder.patch_size = 1
        cfg.rewards = OmegaConf.create([{
            "name": "fixed_time", "weight": 1.0, "required": True,
            "scorer": {"_component_": "bench_rewards.FixedTimeReward", "seconds": reward_seconds, "busy": args.busy},
        }])
        cfg.workers.py_modules = [str(Path(__file__).resolve().parent / "bench_rewards")]
    return build_trainer(cfg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward-seconds", type=float, default=None, help="default: the measured rollout time")
    parser.add_argument("--busy", action="store_true", help="the reward spins on the CPU instead of sleeping")
    parser.add_argument("--model", default="tiny", choices=["tiny", "qwen13m"],
                        help="tiny: the demo recipe's policy; qwen13m: 13.2 M parameters, 16,384 codes")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="Ray reward actors")
    add_round_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    args.side = grid_side(parser, args.length)
    set_threads(args.threads)
    print_header("pipeline: Ray reward overlap vs in-process", vars(args))

    from grpo_image.training.train import grpo_step, sample_rollout

    reward_seconds = args.reward_seconds
    if reward_seconds is None:  # as slow as the rollout: time the rollout alone first
        probe = build("inprocess", args, 0.0)
        times = []
        for step in range(1, 4):
            start = time.perf_counter()
            sample_rollout(probe, step)
            times.append(time.perf_counter() - start)
        reward_seconds = round(statistics.median(times[1:]), 3)
        probe.pool.close()
        del probe
        print(f"rollout alone: {times[1:]} s -> reward time {reward_seconds} s per step", flush=True)

    trainers = {name: build(name, args, reward_seconds) for name in VARIANTS}
    samples: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    try:
        for round_index in range(args.warmup + args.repeats):
            step = 2 * round_index + 1
            for name, trainer in trainers.items():
                grpo_step(trainer, step)  # lead-in, untimed: submits the timed step's rewards under prefetch
                c0, call0, w0 = time.process_time(), cpu_seconds_with_children(), time.perf_counter()
                metrics, _ = grpo_step(trainer, step + 1)
                wall = time.perf_counter() - w0
                record = {"wall": wall, "cpu": time.process_time() - c0, "cpu_all": cpu_seconds_with_children() - call0,
                          **{k: v for k, v in metrics.items() if k.startswith("time/")}}
                tag = "warm-up" if round_index < args.warmup else f"round {round_index - args.warmup + 1}/{args.repeats}"
                print(f"  [{tag}] {name}: wall {wall:.3f} s, cpu {record['cpu']:.3f} s, "
                      f"waited {metrics['time/reward_wait']:.3f} s", flush=True)
                if round_index >= args.warmup:
                    samples[name].append(record)
                if trainer.prefetched is not None:  # drain, untimed: the next step's rewards finish now
                    trainer.pool.gather(trainer.prefetched[2])
    finally:
        for name in reversed(VARIANTS):  # the pool that started Ray (the first Ray one) shuts it down last
            trainers[name].pool.close()

    base = [r["wall"] for r in samples["inprocess"]]
    base_wait = [r["time/reward_wait"] for r in samples["inprocess"]]
    rows, saved_summary = [], {}
    for name in VARIANTS:
        rec = samples[name]
        wall = [r["wall"] for r in rec]
        saved = [(b - w) / reward_seconds for b, w in zip(base, wall)]
        saved_summary[name] = med(saved)
        rows.append([
            name, spread(wall), spread([r["cpu"] for r in rec]), spread([r["cpu_all"] for r in rec]),
            spread([r.get("time/rollout", 0.0) for r in rec]), spread([r["time/reward_wait"] for r in rec]),
            spread([w / b for w, b in zip(wall, base)], 2), "-" if name == "inprocess" else spread(saved, 2),
            "-" if name == "inprocess" else spread(
                [(b - r["time/reward_wait"]) / reward_seconds for b, r in zip(base_wait, rec)], 2),
        ])
    print()
    print(f"reward {reward_seconds} s per step ({'busy CPU' if args.busy else 'sleeping'}), N = "
          f"{args.batch * args.group}, L = {args.length}, {args.repeats} interleaved rounds; median [min-max]")
    print(table(["variant", "step wall s", "trainer cpu s", "cpu s incl. Ray procs", "rollout s (in step)",
                 "waited for rewards s", "step / inprocess", "reward time saved (step)",
                 "reward time hidden (wait)"], rows))
    for name in VARIANTS[1:]:
        print(f"{name}: saves {100 * saved_summary[name]:.0f}% of the reward time per step (target >= 40%)")
    save_json(args.json, {"settings": vars(args), "reward_seconds": reward_seconds, "samples": samples})
    return 0


if __name__ == "__main__":
    sys.exit(main())
