"""The GPU check: what the first real run depends on, measured on one GPU in a few minutes, in one JSON.

    python bench/gpu_check.py                 # one H100 / H200, bf16: X-Omni at real width, 1024 px, G = 16
    python bench/gpu_check.py --smoke         # the same code paths at toy size on the CPU (gloo), in seconds

Checks (each passes or fails; the script exits 1 if any fails):
- collectives: a process group of one (NCCL on a GPU, gloo in the smoke run) and every collective helper of
  grpo_image.training.distributed called through it with tensors on the world's device;
- training: X-Omni's native model at its real width (hidden 3,584, 28 / 4 heads, MLP 18,944, text vocabulary
  152,064, 16,384 codes) with `--layers` layers, through `build_trainer` and `grpo_step` with the X-Omni recipes'
  settings (bf16, min-p 0.03, temperature 1, clip 0.2 / 0.28, KL 0.01, 8 minibatches, G = 16, 1024 px): LoRA, and
  full fine-tuning with FSDP over the group of one (fp32 master shards, bf16 compute). Every update applied, every
  KL finite, each step's first minibatch at a ratio of 1 (within `--ratio-tolerance`), peak memory against
  `grpo-image plan`'s prediction for the same recipe (within 25%); each step's mismatch between behaviour and
  training log-probs, filtered mass and update ratio recorded. Full fine-tuning also measures what FSDP holds: the
  start-up's peak, the memory allocated after the rollout, the reference pass and the update against the plan's
  resident terms (nothing left gathered), and a sharded checkpoint's write and read (seconds, GB/s, host memory growth
  on resume against the plan's resume rows, the weights read back equal);
- sampler: ms per decode step and GPU-seconds per image at G = 16, eager and compiled (CUDA graphs), against the
  memory-bandwidth floor (every weight a step reads and the KV cache written so far, once, at the GPU's HBM
  bandwidth); the same per KV-cache view bucket (each compiled step attends over a view of 256 positions more at a
  time, one CUDA graph each; an eager step over exactly what the cache holds), every step timed alone; the mismatch
  between the sampler's log-probs (one-token steps, eager and compiled) and the teacher-forced pass at real width,
  with the image head in fp32 as shipped and, for comparison, in bf16;
- update: model FLOPs of the teacher-forced pass with backward over its time: MFU against the GPU's dense bf16 peak;
- decoder: one denoising step of X-Omni's FLUX-based transformer at real width (hidden 3,072, 24 heads) with
  `--flux-blocks` double and single blocks, true CFG (two rows an image), per image; scaled to the full 19 + 38
  blocks and 28 steps as an estimate of the decode time per image;
- placement: the GPUs `grpo-image launch` shares out are the ones CUDA sees.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import REPO, print_header, table

# (name substring, peak HBM bytes/s, peak dense bf16 FLOP/s), most specific first
GPU_SPECS = [("H200", 4.8e12, 989.4e12), ("H100 NVL", 3.9e12, 835e12), ("H100 PCIe", 2.0e12, 756e12),
             ("H100", 3.35e12, 989.4e12), ("A100", 2.039e12, 312e12)]
REAL = dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064, codes=16384, side=64, group=16,
            patch=1)
SMOKE = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=300, codes=64, side=4, group=8, patch=8)
FLUX_REAL = dict(heads=24, head_dim=128, joint=4096, pooled=768, in_channels=64, siglip=1536, text_tokens=512,
                 rope=(16, 56, 56))
FLUX_SMOKE = dict(heads=2, head_dim=16, joint=32, pooled=32, in_channels=16, siglip=64, text_tokens=8, rope=(4, 6, 6))
FLUX_FULL_BLOCKS, FLUX_STEPS = 19 + 38, 28  # FLUX.1-dev's double + single blocks; X-Omni's denoising steps


def xomni_at_width(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, codes: int,
                   side: int, dtype: str = "bfloat16", seed: int = 0):
    """A random-weight native X-Omni with real (or toy) widths: one adapter and one head layer, the rest LM."""
    from grpo_image.policies.xomni import XOmniPolicy, build_tiny_xomni_tokenizer
    from grpo_image.policies.xomni_model import XOmniConfig, XOmniForCausalLM

    tokenizer = build_tiny_xomni_tokenizer(vocab, codes, codes + 64)
    config = XOmniConfig(
        vocab_size=vocab, mm_vocab_size=codes + 64, image_vocab_size=codes, num_mm_adap_layers=1,
        num_mm_head_layers=1, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            model = XOmniForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    return XOmniPolicy(model.eval(), tokenizer, (side, side))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def allocated(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def host_peak_growth(work) -> tuple[object, float]:
    """(what `work()` returns, how far this process's peak resident host memory rose above its resident memory at
    the start): Linux's VmHWM, reset to the current VmRSS through /proc/self/clear_refs."""
    def status(key: str) -> float:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))
        return 1024.0 * int(line.split()[1])

    Path("/proc/self/clear_refs").write_text("5")
    start = status("VmRSS")
    result = work()
    return result, status("VmHWM") - start


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def join_group_of_one(device: torch.device):
    """A process group of one rank (NCCL on a GPU), and the World the library's collectives run through."""
    import torch.distributed as dist

    from grpo_image.training.distributed import World

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    return World(0, 1, device, process_group=True)


def check_collectives(world) -> dict:
    """Every collective helper through the process group, on the world's device; values a group of one keeps."""
    import numpy as np

    from grpo_image.training import distributed as d
    from grpo_image.core.types import ScoredBatch

    params = [torch.nn.Parameter(torch.ones(5, device=world.device)) for _ in range(2)]
    for param in params:
        param.grad = torch.full_like(param, 3.0)
    d.average_replicated_gradients(world, params)
    norm = float(d.clip_gradients(world, params, 1e9))
    module = torch.nn.Linear(3, 3, device=world.device)
    before = module.weight.detach().clone()
    d.broadcast_from_rank0(world, module)
    scored = ScoredBatch(np.ones((2, 1), np.float32), ["r"], np.zeros((0, 1, 1, 3), np.uint8), [])
    gathered = d.gather_scored(world, scored)
    ok = (d.all_ranks_agree(world, True) and not d.all_ranks_agree(world, False)
          and torch.equal(params[0].grad, torch.full_like(params[0], 3.0)) and math.isclose(norm, math.sqrt(90), rel_tol=1e-6)
          and torch.equal(module.weight, before) and gathered.scores.shape == (2, 1)
          and d.mean_over_ranks(world, {"x": 2.0}) == {"x": 2.0} and d.gather_objects(world, "a") == ["a"])
    return {"backend": torch.distributed.get_backend(), "device": str(world.device), "passed": bool(ok)}


def recipe_overrides(args, shape: dict, mode: str, run_dir: Path) -> list[str]:
    """The X-Omni recipe's own settings at the check's size, the policy built here, a cheap decoder and reward."""
    policy = ("policy={_component_: gpu_check.xomni_at_width, layers: %d, hidden: %d, intermediate: %d, heads: %d, "
              "kv_heads: %d, vocab: %d, codes: %d, side: %d}" % (
                  args.layers, shape["hidden"], shape["intermediate"], shape["heads"], shape["kv_heads"],
                  shape["vocab"], shape["codes"], shape["side"]))
    full = ["train.mode=full", "train.fsdp=true", "train.lr=1e-5"] if mode == "full" else ["train.lr=1e-3"]
    return [
        policy, f"decoder={{_component_: grpo_image.decoders.palette.PaletteDecoder, patch_size: {shape['patch']}, colors: "
        + json.dumps([f"#{(c * 2654435761) % 2**24:06X}" for c in range(shape["codes"])]) + "}",
        "rewards=[{name: jpeg, scorer: {_component_: rewards.jpeg.JPEGCompressibility, quality: 75, scale: fraction}}]",
        f"data.prompts={REPO / 'prompts' / 'text_en.jsonl'}", "data.batch_size=1", f"data.group_size={shape['group']}",
        "workers.backend=inprocess", "workers.prefetch=false", "steps=2", "sample_every=0", "save_every=100",
        "logging.tensorboard=false", f"output_dir={run_dir}", "train.micro_batch_size=1",
        "train.gradient_checkpointing=true", "sampling.batch_size=0", *full,
    ]


STEP_METRICS = ("train/skipped_updates", "train/kl", "train/ratio_mean_first", "train/grad_norm", "time/rollout",
                "time/update", "train/logprob_diff/p50", "train/logprob_diff/p99", "train/logprob_diff/max",
                "train/logprob_diff/outside_clip", "sampling/filtered_mass/mean", "train/update_ratio")


def within(measured: float | None, planned: float, share: float) -> bool:
    """A measured figure within `share` of the plan's (nothing measured on the CPU: nothing to compare)."""
    return measured is None or abs(measured - planned) <= share * max(measured, planned)


def check_training(args, shape: dict, world, mode: str) -> dict:
    from grpo_image.base.config import load_recipe
    from grpo_image.planning.memory_plan import plan_recipe
    from grpo_image.planning.resident_memory import held_terms, startup_bytes
    from grpo_image.training.train import build_trainer, grpo_step

    recipe = REPO / "recipes" / ("xomni_en_full.yaml" if mode == "full" else "xomni_en_lora.yaml")
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_recipe(recipe, recipe_overrides(args, shape, mode, Path(run_dir)))
        plan = plan_recipe(cfg, str(recipe), gpus=1)
        setup = dataclasses.replace(plan.setup, fsdp=bool(cfg.train.fsdp))  # a group of one shards too
        held = held_terms(plan.policy, setup)
        reset_peak(world.device)
        trainer = build_trainer(cfg, world)
        startup = {"measured": peak_memory(world.device), "planned": startup_bytes(plan.policy, setup, held)}
        phases = PhaseMemory(trainer)
        steps = []
        for step in (1, 2):
            started = time.perf_counter()
            metrics, _ = grpo_step(trainer, step)
            steps.append({"seconds": time.perf_counter() - started, **{k: metrics.get(k) for k in STEP_METRICS}})
        phases.after["update"] = allocated(world.device)
        peak = peak_memory(world.device)
        checkpoint = check_checkpoint(trainer, Path(run_dir), plan) if mode == "full" else None
    finite = all(math.isfinite(s["train/kl"]) and s["train/skipped_updates"] == 0 for s in steps)
    ratio_ok = all(abs(s["train/ratio_mean_first"] - 1) <= args.ratio_tolerance for s in steps)
    result = {"mode": mode, "steps": steps, "finite": finite, "ratio_ok": ratio_ok, "peak_bytes": peak,
              "planned_bytes": plan.peak, "startup": startup, "after_phase": phases.after,
              "planned_held": sum(held.values()), "checkpoint": checkpoint}
    result["plan_ok"] = within(peak, plan.peak, 0.25) and within(startup["measured"], startup["planned"], 0.25)
    # between phases nothing but the resident terms stays allocated (FSDP holds no layer gathered); 10% leaves room
    # for the allocator's own blocks and the few small tensors a step keeps (scheduler, RNG, the last metrics)
    result["phases_ok"] = all(within(value, result["planned_held"], 0.1) for value in phases.after.values())
    result["passed"] = bool(finite and ratio_ok and result["plan_ok"] and result["phases_ok"]
                            and (checkpoint is None or checkpoint["passed"]))
    return result


class PhaseMemory:
    """The memory allocated when the trainer leaves its rollout and reference contexts (the update's is read after
    the step): what a phase leaves behind, which under FSDP must be the resident terms alone."""

    def __init__(self, trainer) -> None:
        self.after: dict[str, float | None] = {}
        weights, device = trainer.weights, trainer.world.device
        for phase, name in (("rollout", "rollout_weights"), ("reference", "reference")):
            setattr(weights, name, self._measured(getattr(weights, name), phase, device))

    def _measured(self, context, phase: str, device: torch.device):
        @contextlib.contextmanager
        def wrapped(*args, **kwargs):
            with context(*args, **kwargs) as value:
                yield value
            self.after[phase] = allocated(device)
        return wrapped


def check_checkpoint(trainer, run_dir: Path, plan) -> dict:
    """A sharded checkpoint of the trained state, written and read back: time, size, host memory on resume."""
    from grpo_image.planning.resume_plan import resume_rows
    from grpo_image.training.checkpoint import find_checkpoint, load_checkpoint
    from grpo_image.training.stops import StepStart, save_step

    world, model = trainer.world, trainer.policy.model
    sums = {name: float(p.detach().double().sum()) for name, p in model.named_parameters()}
    sync(world.device)
    started = time.perf_counter()
    folder = save_step(trainer, run_dir, 2, StepStart(torch.get_rng_state(), None))
    written = time.perf_counter() - started
    size = sum(entry["bytes"] for entry in json.loads((folder / "manifest.json").read_text())["files"].values())
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()  # what is read back must come from the files
    started = time.perf_counter()
    found = find_checkpoint(run_dir, world=world)
    verified = time.perf_counter() - started
    _, host_growth = host_peak_growth(lambda: load_checkpoint(found, trainer.weights, trainer.optimizer,
                                                              trainer.scheduler, world=world))
    read = time.perf_counter() - started - verified
    rows = {name: value for name, value, _ in resume_rows(plan.policy, plan.setup)}
    planned_disk = next(v for k, v in rows.items() if k.startswith("checkpoint on disk"))
    planned_host = next(v for k, v in rows.items() if k.startswith("host memory per process"))
    equal = all(float(p.detach().double().sum()) == sums[name] for name, p in model.named_parameters())
    # the files hold what the plan counts, up to DCP's per-tensor headers (2%) and the small files (scheduler, RNG,
    # config, metadata: under 1 MiB); on resume the host holds one saved tensor at a time (the plan's figure) plus
    # what DCP and the file cache keep in passing: 25% and 256 MiB of room
    size_ok = abs(size - planned_disk) <= 0.02 * planned_disk + 2**20
    return {"bytes": size, "planned_bytes": planned_disk, "write_s": written, "write_gb_s": size / written / 1e9,
            "verify_s": verified, "read_s": read, "read_gb_s": size / read / 1e9, "host_growth": host_growth,
            "planned_host": planned_host, "weights_equal": equal,
            "passed": bool(equal and size_ok and host_growth <= 1.25 * planned_host + 2**28)}


def step_floor(policy, rows: int, held: int, bandwidth: float) -> float:
    """Seconds a decode step cannot beat: it reads the layers, final norms, the image head's rows (never the text
    head) and the `held` tokens of the KV cache, once."""
    model = policy.model
    decoder = model.get_decoder()
    weights = sum(p.numel() * p.element_size() for p in [*decoder.layers.parameters(), decoder.mm_norm.weight])
    weights += policy.num_codes * model.config.hidden_size * model.mm_head.weight.element_size()
    cfg = model.config
    kv_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    return (weights + kv_token * rows * held) / bandwidth


def bandwidth_floor(policy, rows: int, prompt_tokens: int, bandwidth: float) -> float:
    """Seconds a sampler call cannot beat: the prefill, then every step's floor (`step_floor`)."""
    return sum(step_floor(policy, rows, prompt_tokens + t, bandwidth) for t in range(policy.num_positions))


@contextlib.contextmanager
def per_step_times(device: torch.device):
    """Within: every decode step of the sampler timed alone (synchronised before and after), as (held, seconds) in
    the list yielded; `held` is the tokens the cache holds once the step's own is written."""
    import grpo_image.core.sampling as sampling
    from grpo_image.policies.kv_cache import ViewedLayer

    times, decode_step = [], sampling._decode_step

    def timing(policy, compile_step, views):
        step = decode_step(policy, compile_step, views)

        def timed_step(step_ids, mask, positions, cache):
            held = int(next(layer for layer in cache.layers if isinstance(layer, ViewedLayer)).cumulative_length) + 1
            sync(device)
            start = time.perf_counter()
            logits = step(step_ids, mask, positions, cache)
            sync(device)
            times.append((held, time.perf_counter() - start))
            return logits

        return timed_step

    sampling._decode_step = timing
    try:
        yield times
    finally:
        sampling._decode_step = decode_step


def bucket_times(policy, prompts, seeds, device: torch.device, bandwidth: float | None) -> list[dict]:
    """Median ms per decode step in each compiled view bucket (steps whose cache holds up to 256, 512, ... tokens),
    eager and compiled, each step timed alone after a run that compiles every bucket; and each bucket's floor."""
    from grpo_image.core.sampling import COMPILED_VIEW_BUCKET, SamplingSettings, sample_codes

    per_mode = {}
    for name, settings in (("eager", SamplingSettings(min_p=0.03)), ("compiled", SamplingSettings(min_p=0.03,
                                                                                                   compile=True))):
        sample_codes(policy, prompts, seeds, settings)  # warm: every bucket's graph compiled and captured
        with per_step_times(device) as times:
            sample_codes(policy, prompts, seeds, settings)
        per_mode[name] = times
    buckets = {}
    for name, times in per_mode.items():
        for held, seconds in times:
            buckets.setdefault(math.ceil(held / COMPILED_VIEW_BUCKET) * COMPILED_VIEW_BUCKET, {}).setdefault(
                name, []).append((held, seconds))  # fmt: skip
    rows = []
    for view, by_mode in sorted(buckets.items()):
        row = {"view": view, "steps": len(by_mode["compiled"])}
        for name, steps in by_mode.items():
            row[f"{name}_ms"] = 1000 * statistics.median(seconds for _, seconds in steps)
        if bandwidth:
            row["floor_ms"] = 1000 * statistics.mean(step_floor(policy, len(prompts), held, bandwidth)
                                                     for held, _ in by_mode["compiled"])  # fmt: skip
            row["compiled_over_floor"] = row["compiled_ms"] / row["floor_ms"]
        rows.append(row)
    return rows


def sampler_mismatch(policy, prompts, codes, behaviour, settings) -> dict:
    """The teacher-forced pass's log-probs of sampled codes against the sampler's: quantiles of the difference and the
    share outside the X-Omni recipes' clip band (0.2 / 0.28), as train/logprob_diff logs them."""
    from grpo_image.core.logprobs import logprob_mismatch, teacher_forced_logprobs

    trained = teacher_forced_logprobs(policy, prompts, codes, settings)  # [G, L]
    return logprob_mismatch((trained - behaviour).reshape(-1), 0.2, 0.28)


def bf16_head(policy):
    """The policy with its image head in bf16, as before the fp32 head: to show what the fp32 head removes."""
    import copy

    import torch.nn.functional as F

    rounded = copy.copy(policy)
    rows = policy.model.mm_head.weight[: policy.num_codes]  # [V, H] bf16
    rounded.image_logits = lambda hidden: F.linear(hidden, rows).float()  # [..., V]
    return rounded


def check_sampler(args, shape: dict, device: torch.device, bandwidth: float | None) -> dict:
    from grpo_image.core.sampling import SamplingSettings, sample_codes, sample_codes_with_mass

    policy = xomni_at_width(args.layers, shape["hidden"], shape["intermediate"], shape["heads"], shape["kv_heads"],
                            shape["vocab"], shape["codes"], shape["side"], "bfloat16")
    policy.model.to(device)
    prompts = ["a shop sign that says OPEN"] * shape["group"]
    seeds = torch.arange(shape["group"])
    result = {}
    with torch.no_grad():
        eager = SamplingSettings(min_p=0.03)
        compiled = SamplingSettings(min_p=0.03, compile=True)
        reference, behaviour, removed = sample_codes_with_mass(policy, prompts, seeds, eager)
        codes, compiled_behaviour = sample_codes(policy, prompts, seeds, compiled)  # compiles (captures the graph)
        result["filtered_mass"] = {"mean": float(removed.mean()), "max": float(removed.max())}
        result["mismatch"] = {
            "eager": sampler_mismatch(policy, prompts, reference, behaviour, eager),
            "compiled": sampler_mismatch(policy, prompts, codes, compiled_behaviour, eager),
            "eager, bf16 head": sampler_mismatch(bf16_head(policy), prompts, *sample_codes(
                bf16_head(policy), prompts, seeds, eager), eager),
        }
        for name, settings in (("eager", eager), ("compiled", compiled)):
            seconds = statistics.median(timed(lambda: sample_codes(policy, prompts, seeds, settings), device)
                                        for _ in range(args.repeats))
            result[name] = {"ms_per_step": 1000 * seconds / policy.num_positions,
                            "gpu_s_per_image": seconds / shape["group"]}
        result["buckets"] = bucket_times(policy, prompts, seeds, device, bandwidth)
    result["compiled_codes_equal"] = bool(torch.equal(codes, reference))
    if bandwidth:
        floor = bandwidth_floor(policy, shape["group"], len(policy.encode(prompts[:1])[0]), bandwidth)
        result["floor_ms_per_step"] = 1000 * floor / policy.num_positions
        result["compiled_over_floor"] = result["compiled"]["ms_per_step"] / result["floor_ms_per_step"]
    result["passed"] = result["compiled_codes_equal"]
    return result


def check_update_mfu(args, shape: dict, device: torch.device, peak_flops: float | None) -> dict:
    """Model FLOPs of the teacher-forced pass with backward (x3 of the forward) over its time."""
    from grpo_image.core.logprobs import teacher_forced_logprobs
    from grpo_image.core.sampling import SamplingSettings

    policy = xomni_at_width(args.layers, shape["hidden"], shape["intermediate"], shape["heads"], shape["kv_heads"],
                            shape["vocab"], shape["codes"], shape["side"], "bfloat16")
    policy.model.to(device).train()
    rows, length = 1, policy.num_positions
    codes = torch.randint(0, policy.num_codes, (rows, length), device=device)
    prompts = ["a shop sign that says OPEN"] * rows

    def update():
        teacher_forced_logprobs(policy, prompts, codes, SamplingSettings()).sum().backward()
        policy.model.zero_grad(set_to_none=True)

    update()
    seconds = statistics.median(timed(update, device) for _ in range(args.repeats))
    cfg = policy.model.config
    tokens = len(policy.encode(prompts)[0]) + length - 1
    matmul = sum(p.numel() for layer in policy.model.get_decoder().layers for p in layer.parameters() if p.ndim == 2)
    forward = (2 * matmul * rows * tokens + 2 * policy.num_codes * cfg.hidden_size * rows * length
               + 2 * cfg.num_hidden_layers * rows * tokens * tokens * cfg.hidden_size)  # causal QK^T + PV
    result = {"seconds": seconds, "tflops_per_s": 3 * forward / seconds / 1e12}
    if peak_flops:
        result["mfu"] = 3 * forward / seconds / peak_flops
    result["passed"] = True
    return result


def check_flux_step(args, flux: dict, side: int, device: torch.device) -> dict:
    """One X-Omni FLUX transformer call for one image with true CFG (2 rows), at real width, a few blocks."""
    from grpo_image.decoders.xomni_transformer import XOmniFluxTransformer2DModel

    blocks = args.flux_blocks
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 (casting a built model warns about fp32 modules)
    try:
        model = XOmniFluxTransformer2DModel(
            num_layers=blocks, num_single_layers=blocks, attention_head_dim=flux["head_dim"],
            num_attention_heads=flux["heads"], joint_attention_dim=flux["joint"], pooled_projection_dim=flux["pooled"],
            in_channels=flux["in_channels"], guidance_embeds=True, siglip_channels=flux["siglip"],
            axes_dims_rope=flux["rope"],
        ).to(device).eval()
    finally:
        torch.set_default_dtype(previous)
    tokens = side * side
    kwargs = dict(
        hidden_states=torch.randn(2, tokens, flux["in_channels"], device=device, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(2, flux["text_tokens"], flux["joint"], device=device, dtype=torch.bfloat16),
        pooled_projections=torch.randn(2, flux["pooled"], device=device, dtype=torch.bfloat16),
        timestep=torch.full((2,), 0.5, device=device, dtype=torch.bfloat16),
        img_ids=torch.zeros(tokens, 3, device=device), txt_ids=torch.zeros(flux["text_tokens"], 3, device=device),
        guidance=torch.ones(2, device=device), return_dict=False,
        siglip_tensor=torch.randn(2, tokens, flux["siglip"], device=device, dtype=torch.bfloat16),
    )
    with torch.no_grad():
        model(**kwargs)
        seconds = statistics.median(timed(lambda: model(**kwargs), device) for _ in range(args.repeats))
    estimate = seconds * FLUX_FULL_BLOCKS / (2 * blocks) * FLUX_STEPS
    return {"blocks": 2 * blocks, "seconds_per_image_step": seconds, "estimated_decode_s_per_image": estimate,
            "passed": True}


def check_placement(device: torch.device) -> dict:
    """`grpo-image launch` shares out the GPUs it reads: with no CUDA_VISIBLE_DEVICES, every device CUDA counts."""
    from grpo_image.training.launch import visible_gpus

    seen = visible_gpus({})
    expected = [str(i) for i in range(torch.cuda.device_count())] if device.type == "cuda" else []
    return {"visible": seen, "passed": seen == expected}


def timed_check(check, *args) -> dict:
    started = time.perf_counter()
    result = check(*args)
    result["check_seconds"] = time.perf_counter() - started
    print(f"{check.__name__}: {'passed' if result['passed'] else 'FAILED'} in {result['check_seconds']:.1f} s",
          flush=True)
    return result


def gpu_spec(device: torch.device) -> tuple[str, float | None, float | None]:
    if device.type != "cuda":
        return "cpu", None, None
    name = torch.cuda.get_device_name(device)
    for key, bandwidth, flops in GPU_SPECS:
        if key in name:
            return name, bandwidth, flops
    return name, None, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: the code paths, no figures")
    parser.add_argument("--layers", type=int, default=None, help="X-Omni layers (default 4; 3 with --smoke)")
    parser.add_argument("--flux-blocks", type=int, default=2, help="double and single FLUX blocks each")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each measurement (3; 1 with --smoke)")
    parser.add_argument("--ratio-tolerance", type=float, default=1e-3, help="first-minibatch ratio's distance to 1")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "gpu_check.json"))
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke to check the code paths on the CPU")
        return 2
    args.layers = args.layers or (3 if args.smoke else 4)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    shape, flux = (SMOKE, FLUX_SMOKE) if args.smoke else (REAL, FLUX_REAL)
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sys.modules.setdefault("gpu_check", sys.modules[__name__])  # recipes name xomni_at_width as gpu_check.*
    print_header("GPU check" + (" (smoke: toy sizes on the CPU)" if args.smoke else ""), vars(args))
    name, bandwidth, peak_flops = gpu_spec(device)
    started = time.perf_counter()
    world = join_group_of_one(device)
    results = {"device": name, "settings": vars(args), "collectives": check_collectives(world)}
    for mode in ("lora", "full"):
        results[f"train_{mode}"] = timed_check(check_training, args, shape, world, mode)
    results["sampler"] = timed_check(check_sampler, args, shape, device, bandwidth)
    results["update"] = timed_check(check_update_mfu, args, shape, device, peak_flops)
    results["decoder"] = timed_check(check_flux_step, args, flux, shape["side"], device)
    results["placement"] = check_placement(device)
    results["seconds"] = time.perf_counter() - started
    checks = ["collectives", "train_lora", "train_full", "sampler", "update", "decoder", "placement"]
    results["passed"] = all(results[c]["passed"] for c in checks)
    torch.distributed.destroy_process_group()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(summary_table(results))
    print(f"\n{'all checks passed' if results['passed'] else 'SOME CHECKS FAILED'} in {results['seconds']:.0f} s; "
          f"details in {args.json}")
    return 0 if results["passed"] else 1


def summary_table(r: dict) -> str:
    def gib(value):
        return "-" if value is None else f"{value / 2**30:.1f} GiB"

    rows = [["collectives", r["collectives"]["backend"], "passed" if r["collectives"]["passed"] else "FAILED"]]
    for mode in ("lora", "full"):
        t = r[f"train_{mode}"]
        ratios = ", ".join(f"{s['train/ratio_mean_first']:.5f}" for s in t["steps"])
        diff = ", ".join(f"{s['train/logprob_diff/p99']:.3g}" for s in t["steps"])
        after = ", ".join(f"{name} {gib(value)}" for name, value in t["after_phase"].items())
        rows.append([f"train {mode}", f"ratio {ratios}; logprob diff p99 {diff}; peak {gib(t['peak_bytes'])} vs plan "
                     f"{gib(t['planned_bytes'])}; start-up {gib(t['startup']['measured'])} vs "
                     f"{gib(t['startup']['planned'])}; after {after} vs held {gib(t['planned_held'])}",
                     "passed" if t["passed"] else "FAILED"])
        c = t["checkpoint"]
        if c:
            rows.append(["checkpoint", f"{gib(c['bytes'])} (plan {gib(c['planned_bytes'])}): write {c['write_gb_s']:.2f}"
                         f" GB/s, verify {c['verify_s']:.1f} s, read {c['read_gb_s']:.2f} GB/s; host growth "
                         f"{gib(c['host_growth'])} (plan {gib(c['planned_host'])})", "passed" if c["passed"] else "FAILED"])
    s = r["sampler"]
    floor = f", floor {s['floor_ms_per_step']:.2f} ms ({s['compiled_over_floor']:.2f}x)" if "floor_ms_per_step" in s else ""
    rows.append(["sampler", f"eager {s['eager']['ms_per_step']:.2f} ms/step, compiled {s['compiled']['ms_per_step']:.2f}"
                 f" ms/step, {s['compiled']['gpu_s_per_image']:.3f} GPU-s/image{floor}",
                 "passed" if s["passed"] else "FAILED"])
    rows.append(["view buckets", "; ".join(
        f"<= {b['view']}: eager {b['eager_ms']:.2f}, compiled {b['compiled_ms']:.2f}"
        + (f", floor {b['floor_ms']:.2f} ms ({b['compiled_over_floor']:.2f}x)" if "floor_ms" in b else " ms")
        for b in s["buckets"]), "measured"])  # fmt: skip
    mismatch = "; ".join(f"{name} p99 {m['logprob_diff/p99']:.3g} max {m['logprob_diff/max']:.3g} outside "
                         f"{m['logprob_diff/outside_clip']:.2%}" for name, m in s["mismatch"].items())
    rows.append(["log-probs", f"sampler vs teacher-forced: {mismatch}; filtered mass "
                 f"{s['filtered_mass']['mean']:.3f}", "measured"])
    u = r["update"]
    rows.append(["update", f"{u['tflops_per_s']:.1f} TFLOP/s" + (f", MFU {100 * u['mfu']:.1f}%" if "mfu" in u else ""),
                 "passed"])
    d = r["decoder"]
    rows.append(["decoder", f"{d['seconds_per_image_step']:.4f} s per image-step ({d['blocks']} blocks); full decode "
                 f"about {d['estimated_decode_s_per_image']:.1f} s per image", "passed"])
    rows.append(["placement", ", ".join(r["placement"]["visible"]) or "no GPU",
                 "passed" if r["placement"]["passed"] else "FAILED"])
    return table(["check", "figures", "result"], rows)


if __name__ == "__main__":
    sys.exit(main())
