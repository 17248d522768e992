"""Shared pieces of the benchmarks: interleaved timing, medians and spreads, tables, and the models measured.

Every benchmark here compares variants measured in the same process, interleaved (A B C, A B C, ...), so that a
change in the machine's load (the benchmarks were written on 2 shared cores) hits every variant alike. Each
measurement records wall seconds (`time.perf_counter`) and CPU seconds of this process, all its threads included
(`time.process_time`); `cpu_seconds_with_children` adds the CPU time of live child processes (Ray's workers)
through psutil. Ratios are computed per repeat (A_i / B_i of the same round) and summarised by their median and
their range over the repeats.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# On a CPU shared with other jobs, OpenMP's spinning barriers make multi-threaded torch ops collapse (a
# [16, 256] x [256, 1024] matmul measured 32 ms with 2 threads against 0.4 ms with 1 here). Passive waiting avoids
# it; it must be set before torch loads OpenMP. `--threads` (default 1) sets torch's intra-op threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import grpo_image  # noqa: E402,F401  (before transformers: lets a CUDA-built torchvision import next to CPU torch)

REPO = Path(__file__).resolve().parent.parent
PROMPTS_FILE = REPO / "prompts" / "tiny_colors.jsonl"


# ---------------------------------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, threads, load and library versions."""
    import transformers

    info = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def add_round_arguments(parser, repeats: int = 3, text_vocab: bool = False) -> None:
    """The options every CPU benchmark shares: threads, measured and warm-up rounds, JSON output (and the text
    vocabulary for those that build the policy)."""
    if text_vocab:
        parser.add_argument("--text-vocab", type=int, default=0, help="grow the text vocabulary to this many ids "
                            "(e.g. 152064, Qwen2.5's); 0: the tiny layout's 261")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved rounds that are measured")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and discarded")
    parser.add_argument("--json", default=None, help="write the raw measurements here")


def grid_side(parser, length: int) -> int:
    """The side of the square code grid of `length` codes; a parser error otherwise."""
    side = int(round(length ** 0.5))
    if side * side != length:
        parser.error("--length must be a square (the policy's grid is side x side)")
    return side


def set_threads(threads: int) -> None:
    """Intra-op threads of this process (1 by default in every benchmark: see the note at the top)."""
    torch.set_num_threads(threads)


def print_header(title: str, settings: dict) -> None:
    print(f"# {title}")
    print("machine: " + json.dumps(machine_info()))
    print("settings: " + json.dumps(settings))
    print()


# ---------------------------------------------------------------------------------------------------- timing


def cpu_seconds_with_children() -> float:
    """CPU seconds of this process and of every live descendant (Ray's raylet and workers included)."""
    total = time.process_time()
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                times = child.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    except ImportError:
        pass
    return total


@dataclass
class Sample:
    wall: float
    cpu: float
    extra: dict = field(default_factory=dict)


def timed(fn: Callable[[], object], children: bool = False) -> Sample:
    """Run fn once; wall and CPU seconds, and fn's result if it is a dict of extra figures."""
    clock = cpu_seconds_with_children if children else time.process_time
    cpu0, wall0 = clock(), time.perf_counter()
    result = fn()
    wall, cpu = time.perf_counter() - wall0, clock() - cpu0
    return Sample(wall, cpu, result if isinstance(result, dict) else {})


def interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, children: bool = False, log=print
) -> dict[str, list[Sample]]:
    """Run the variants in turn, A B C A B C ..., `warmup` rounds discarded, then `repeats` rounds kept."""
    results: dict[str, list[Sample]] = {name: [] for name in variants}
    for round_index in range(warmup + repeats):
        kept = round_index >= warmup
        for name, fn in variants.items():
            sample = timed(fn, children)
            if kept:
                results[name].append(sample)
            if log:
                tag = f"round {round_index - warmup + 1}/{repeats}" if kept else "warm-up"
                log(f"  [{tag}] {name}: wall {sample.wall:.3f} s, cpu {sample.cpu:.3f} s", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------- statistics


def med(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float], digits: int = 3) -> str:
    """'median [min-max]' of a list of numbers."""
    return f"{med(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Per-round ratios of two interleaved series."""
    return [a / b for a, b in zip(numerator, denominator)]


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda items: "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def save_json(path: str | None, payload: dict) -> None:
    """Write the raw measurements, with the machine they were taken on (load average at the end of the run)."""
    if path:
        payload = {"machine": machine_info(), **payload}
        Path(path).write_text(json.dumps(payload, indent=1, default=str))
        print(f"raw results written to {path}")


# ---------------------------------------------------------------------------------------------------- models


def load_prompts() -> list[dict]:
    return [json.loads(line) for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]


def build_policy(name: str, grid: tuple[int, int], seed: int = 0, text_vocab: int = 0):
    """The two policies every CPU benchmark uses, both `tiny_policy` (a real Qwen2ForCausalLM) built from a config.

    tiny:    the demo recipe's model (hidden 64, 2 layers, 16 image codes), about 0.1 M parameters;
    qwen13m: hidden 256, 8 layers, 4 query / 2 KV heads, 16,384 image codes (vocabulary 16,645: 256 byte tokens,
             pad, eos, the codes, <SOM> <EOM> <IMAGE>), untied head: 13.2 M parameters.
    `text_vocab` > 261 grows the vocabulary to text_vocab + V ids (e.g. 152,064: Qwen2.5's text vocabulary, as in
    X-Omni): rows appended to the input embedding and the head after the tiny layout's ids. The tokenizer never
    produces them, so prompts and codes are unchanged; what grows is every computation over the full vocabulary.
    """
    from grpo_image.policies.tiny import tiny_policy

    if name == "tiny":
        policy = tiny_policy(num_codes=16, grid=grid, hidden_size=64, num_layers=2, seed=seed)
    elif name == "qwen13m":
        policy = tiny_policy(
            num_codes=16384, grid=grid, hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2, seed=seed
        )
    else:
        raise ValueError(f"unknown model {name!r}: tiny or qwen13m")
    # the positions a prompt and L codes take, stated (default RoPE never reads it; generate warns past it)
    policy.model.config.max_position_embeddings = max(512, grid[0] * grid[1] + 256)
    if text_vocab:
        current = policy.model.get_output_embeddings().weight.shape[0]
        wanted = text_vocab + policy.num_codes
        if wanted < current:
            raise ValueError(f"--text-vocab {text_vocab} is below the tiny layout's {current - policy.num_codes}")
        if wanted > current:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                policy.model.resize_token_embeddings(wanted, mean_resizing=False)
    return policy


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def code_colors(num_codes: int) -> list[str]:
    """One distinct '#RRGGBB' per code, so that the palette decoder can draw any of `num_codes` codes."""
    if num_codes <= 16:
        from grpo_image.decoders.palette import WEB_COLORS

        return list(WEB_COLORS[:num_codes])
    colors = []
    for code in range(num_codes):
        r, g, b = (code * 2654435761) % 256, (code * 40503) % 256, (code * 97) % 256  # spread over the RGB cube
        colors.append(f"#{r:02X}{g:02X}{b:02X}")
    return colors
