"""Peak memory of the teacher-forced log-prob pass: image head only and chunked vs a full-vocabulary forward.

    python bench/logprob_memory.py                                    # L in 256 1024 4096, text vocab 261 and 152k
    python bench/logprob_memory.py --lengths 1024 --text-vocabs 261 152064 --rows 4 --modes grad

The model is a Qwen2ForCausalLM with a small backbone (hidden 256, 2 layers) so that the head dominates, 16,384
image codes, and a text vocabulary of T ids (the head has T + 16,384 rows; T = 261 is the tiny policy's byte
tokens and specials, 152,064 is Qwen2.5's). R rows of L codes each are scored. Methods:

  ours chunked   grpo_image.core.logprobs.teacher_forced_logprobs, chunk = 1024 positions (the recipes' default):
                 the backbone, then the image head ([.., H] x [H, 16384]) over chunks, recomputed in backward
  ours 1 chunk   the same with chunk = L (image head only, no chunking)
  full vocab     model(...).logits ([R, P+L, T+16384], what transformers returns), then log_softmax over the
                 vocabulary and gather of the code ids: the peers' way
  TRL fused      TRL 1.16's fused LM head (trl.trainer.utils.add_fused_lm_head, what its GRPOTrainer uses): the
                 full vocabulary, projected in tiles of 4,096 tokens x 32,768 ids with an online log-sum-exp

Modes: `nograd` is the reference / behaviour pass (torch.no_grad); `grad` is the training pass, forward and
backward of the summed log-probs. The embedding and the output head are frozen (as under LoRA), so parameter
gradients do not grow with the vocabulary for any method; the backbone layers are trainable.

How memory is measured: torch's profiler with `profile_memory=True` records every allocation and free of the CPU
allocator with the running total of bytes held by tensors allocated since profiling started ("Total Allocated"
in its trace). The peak of that total over the pass, minus its value at the start, is the extra tensor memory the
pass needed at its worst moment: exact, deterministic, and blind to what existed before (weights, inputs). It
does not count allocator caching or fragmentation. As a cross-check (`--no-rss` skips it), each pass runs once
more, before the profiled run, while a thread polls the process's resident set size (psutil, every 0.5 ms)
after glibc's malloc_trim has returned freed heap memory to the OS: the rise of RSS over the pass, which includes
the allocator's behaviour (large tensors are mmapped and given back when freed) and can miss peaks shorter than
the polling interval.
Full-vocabulary cells that would need more than `--max-gib` are skipped, with the size they need (two copies of
the [R, P+L, T+16384] float32 logits without grad: logits and log-softmax; four with grad: and their gradients).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import threading
import time

import torch

from _common import print_header, save_json, set_threads, table

NUM_CODES = 16384
TINY_TEXT = 261  # 256 byte tokens, pad, eos, <SOM>, <EOM>, <IMAGE>
METHODS = ["ours chunked", "ours 1 chunk", "full vocab", "TRL fused"]


def build(text_vocab: int, length: int, hidden: int, layers: int, seed: int = 0):
    """A policy whose head has text_vocab + 16,384 rows (the tiny tokenizer encodes the prompt; the extra text rows
    follow the tiny layout's ids and are never produced by it, which is all a memory measurement needs)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo_image.policies.causal_lm import CausalLMPolicy
    from grpo_image.policies.tiny import code_range, build_tiny_tokenizer
    from grpo_image.policies.xomni import XOMNI_TEMPLATE

    tokenizer = build_tiny_tokenizer(NUM_CODES)
    extra = text_vocab - TINY_TEXT
    if extra < 0:
        raise ValueError(f"text vocabulary must be >= {TINY_TEXT}")
    config = Qwen2Config(
        vocab_size=len(tokenizer) + extra, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=length + 64, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    model.get_input_embeddings().weight.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(False)
    offset, codes = code_range(tokenizer)
    side = int(round(length ** 0.5))
    grid = (side, length // side)
    if grid[0] * grid[1] != length:
        raise ValueError(f"length {length} must be a product h*w with h = round(sqrt(L))")
    return CausalLMPolicy(model, tokenizer, offset, codes, grid, XOMNI_TEMPLATE)


def make_pass(method: str, policy, rows: int, mode: str):
    """A callable that runs one pass of `method` (and backward in grad mode)."""
    from grpo_image.core.logprobs import teacher_forced_logprobs
    from grpo_image.core.sampling import SamplingSettings, left_pad

    length = policy.num_positions
    prompts = ["a red square"] * rows
    codes = torch.randint(0, NUM_CODES, (rows, length), generator=torch.Generator().manual_seed(1))
    settings = SamplingSettings()
    model = policy.model
    prefix, prefix_mask = left_pad(policy.encode(prompts), policy.pad_token_id, policy.device)
    ids = torch.cat([prefix, policy.codes_to_ids(codes)], dim=1)  # [R, P+L]
    mask = torch.ones_like(ids)
    p = prefix.shape[1]

    if method.startswith("ours"):
        chunk = 1024 if method == "ours chunked" else length

        def forward():
            return teacher_forced_logprobs(policy, prompts, codes, settings, chunk=chunk)  # [R, L]
    elif method == "full vocab":

        def forward():
            logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits  # [R, P+L-1, T+V]
            logp = logits[:, p - 1:].float().log_softmax(-1)  # [R, L, T+V]
            return logp.gather(-1, ids[:, p:].unsqueeze(-1)).squeeze(-1)  # [R, L]
    elif method == "TRL fused":
        from trl.trainer.utils import add_fused_lm_head

        if not getattr(model, "_bench_fused", False):
            add_fused_lm_head(model, temperature=1.0, outputs=("log_probs",))
            model._bench_fused = True
        labels = ids.clone()
        labels[:, :p] = -100

        def forward():
            return model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs[:, p - 1:]
    else:
        raise ValueError(method)

    def run():
        if mode == "grad":
            model.train()
            out = forward()
            out.sum().backward()
            model.zero_grad(set_to_none=True)
        else:
            model.eval()
            with torch.no_grad():
                out = forward()
        assert out.shape == (rows, length), out.shape

    return run


def peak_tensor_bytes(fn) -> tuple[int, float, float]:
    """(peak extra bytes held by tensors during fn, wall s, cpu s) through the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        path = handle.name
    try:
        prof.export_chrome_trace(path)
        with open(path) as trace:
            events = [e["args"] for e in json.load(trace)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.unlink(path)
    if not events:
        return 0, wall, cpu
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start, wall, cpu


def timed_only(fn) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


class RssPeak:
    """Peak resident set size during a block, polled from a thread (psutil, every `interval` s)."""

    def __init__(self, interval: float = 0.0005) -> None:
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        gc.collect()
        _release_free_memory()
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def rise_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc), so that a rise of RSS is memory the pass needed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="L values")
    parser.add_argument("--text-vocabs", type=int, nargs="+", default=[TINY_TEXT, 152064])
    parser.add_argument("--rows", type=int, default=1, help="R rollouts scored together")
    parser.add_argument("--modes", nargs="+", default=["nograd", "grad"], choices=["nograd", "grad"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip full-vocab cells whose logits exceed this")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS cross-check")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    print_header("log-prob memory: image head chunked vs full vocabulary", vars(args))

    results = []
    for text_vocab in args.text_vocabs:
        for length in args.lengths:
            policy = build(text_vocab, length, args.hidden, args.layers)
            vocab = text_vocab + NUM_CODES
            logits_gib = args.rows * (length + 16) * vocab * 4 / 2**30
            for mode in args.modes:
                for method in args.methods:
                    cell = {"text_vocab": text_vocab, "length": length, "mode": mode, "method": method}
                    # logits + log_softmax; under grad also their gradients
                    copies = 4 if mode == "grad" else 2
                    if method == "full vocab" and copies * logits_gib > args.max_gib:
                        cell.update(skipped=f"needs >= {copies * logits_gib:.1f} GiB ({copies} copies of the logits)")
                        results.append(cell)
                        print(f"  {cell}", flush=True)
                        continue
                    run = make_pass(method, policy, args.rows, mode)
                    run()  # warm-up: first-call allocations (rotary caches, autograd setup) are not the pass's
                    if not args.no_rss:  # before the profiled run, so that nothing the profiler kept is counted
                        with RssPeak() as rss:
                            run()
                        cell["rss_rise_mib"] = rss.rise_mib
                    peak, _, _ = peak_tensor_bytes(run)
                    wall, cpu = timed_only(run)  # timed without the profiler's overhead
                    cell.update(peak_mib=peak / 2**20, wall_s=wall, cpu_s=cpu)
                    results.append(cell)
                    print(f"  {cell}", flush=True)
            del policy

    print()
    print(f"R = {args.rows} rows, backbone hidden {args.hidden} x {args.layers} layers, {NUM_CODES} image codes. "
          "Peak extra tensor memory in MiB (profiler accounting; one deterministic measurement per cell), "
          "and CPU seconds of the pass (one run, unprofiled)")
    for mode in args.modes:
        headers = ["text vocab", "L"] + [f"{m} MiB" for m in args.methods] + [f"{m} cpu s" for m in args.methods]
        if not args.no_rss:
            headers += [f"{m} RSS rise MiB" for m in args.methods]
        rows = []
        for text_vocab in args.text_vocabs:
            for length in args.lengths:
                cells = {r["method"]: r for r in results
                         if r["text_vocab"] == text_vocab and r["length"] == length and r["mode"] == mode}
                row = [text_vocab, length]
                row += [f"{cells[m]['peak_mib']:.0f}" if "peak_mib" in cells[m] else "skipped" for m in args.methods]
                row += [f"{cells[m]['cpu_s']:.2f}" if "cpu_s" in cells[m] else "-" for m in args.methods]
                if not args.no_rss:
                    row += [f"{cells[m]['rss_rise_mib']:.0f}" if "rss_rise_mib" in cells[m] else "-"
                            for m in args.methods]
                rows.append(row)
        print(f"\nmode: {mode} ({'forward and backward' if mode == 'grad' else 'forward under torch.no_grad'})")
        print(table(headers, rows))
    # how each method's peak moves with the text vocabulary, per mode and length
    print("\nratio of peak memory at the largest text vocabulary to the smallest (1.00 = independent of it):")
    lo_t, hi_t = min(args.text_vocabs), max(args.text_vocabs)
    ratio_rows = []
    for mode in args.modes:
        for length in args.lengths:
            row = [mode, length]
            for m in args.methods:
                a = [r for r in results if r["method"] == m and r["mode"] == mode and r["length"] == length]
                lo = next((r.get("peak_mib") for r in a if r["text_vocab"] == lo_t), None)
                hi = next((r.get("peak_mib") for r in a if r["text_vocab"] == hi_t), None)
                row.append(f"{hi / lo:.2f}" if lo and hi else "-")
            ratio_rows.append(row)
    print(table(["mode", "L"] + [f"{m} T={hi_t}/T={lo_t}" for m in args.methods], ratio_rows))
    save_json(args.json, {"settings": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
