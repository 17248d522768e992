"""GPU: the sampler at X-Omni's shape against the memory-bandwidth floor, and the MFU of the update pass.

    python bench/gpu_sampler.py                       # on an H100 / H200: 36 layers, G=16, 64x64 = 4,096 codes, bf16
    python bench/gpu_sampler.py --rows 16 --length 1024 --cfg-scale 3.0 --repeats 3
    python bench/gpu_sampler.py --device cpu --smoke  # a few seconds on a CPU: checks the code paths, no figures

The model is grpo_image's native XOmniForCausalLM with X-Omni's real layer sizes (Qwen2.5-7B: hidden 3,584, MLP
18,944, 28 query / 4 KV heads of 128; 28 LM layers + 4 multimodal adapter + 4 multimodal head layers = 36; text
vocabulary 152,064; 16,448 multimodal ids of which 16,384 image codes), random weights, bf16, SDPA attention, on
one GPU. `--layers` caps the layer count ("as many as fit": by default all 36 for sampling; the update pass keeps
the layer count whose weights, gradients and activations fit in 85% of free memory, see `--update-layers`).

Sampler: `grpo_image.sampling.sample_codes` on G rows of one prompt, L codes each (X-Omni's defaults: temperature
1.0, min-p 0.03, no CFG; `--cfg-scale` adds the unconditional rows in the same batch). Reported: codes/s
(G*L / seconds), ms per decode step (seconds / L), GPU-seconds per image (seconds / G), and the same for the bare
forwards (`floor`: prefill + L-1 cached single-token forwards + the image head, no sampling), timed with
torch.cuda.synchronize() around each run, medians of `--repeats` interleaved runs after a short warm-up.

Memory-bandwidth floor (a decode step must read every weight it uses and the whole KV cache once):
    W      = bytes of the decoder layers and final norm + the image head's V x H rows (the text head is never read)
    KV(t)  = 2 (K and V) x layers x R x kv_heads x head_dim x (P + t) x bytes_per_element   R = G (2G with CFG)
    floor  = sum over t = 0 .. L-1 of (W + KV(t)) / BW             (writes of one new K/V row per step ignored)
with BW the GPU's peak HBM bandwidth (H100 SXM 3.35 TB/s, H100 PCIe 2.0, H100 NVL 3.9, H200 4.8; `--peak-bw`
overrides) and, as a second floor, the bandwidth this GPU achieves copying a 4 GiB buffer (read + write).
Reported as the sampler's time over the floor (1.0 = at the floor).

MFU of the update pass: `teacher_forced_logprobs` with grad + `grpo_loss` + backward on `--update-rows` rows of
P + L tokens, timed over `--repeats` runs:
    FLOPs  = 3 x [ 2 x P_layers x R x T  +  2 x V x H x R x L  +  4 x layers x R x T^2 x H / 2 ]
             (forward x 3 for forward + backward; P_layers = matmul weights of the decoder layers, all T = P + L
              tokens go through every layer; the image head on the L scored positions; causal attention: QK^T and
              PV at 2 T^2 head_dim each per head, halved by the mask; recomputation of the checkpointed head chunks
              is not counted, as MFU counts model FLOPs only)
    MFU    = FLOPs / (seconds x peak dense bf16 FLOP/s)   (H100 SXM / H200 989 TFLOP/s, H100 PCIe 756, NVL 835;
             `--peak-tflops` overrides)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from _common import print_header, save_json, spread, table

# (name substring, peak HBM bytes/s, peak dense bf16 FLOP/s), most specific first
GPU_SPECS = [
    ("H200", 4.8e12, 989.4e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989.4e12),
    ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100", 1.555e12, 312e12),
]

REAL = dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, layers=36, mm_adap=4, mm_head=4,
            vocab=152064, mm_vocab=16448, codes=16384)
SMOKE = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, layers=4, mm_adap=1, mm_head=1,
             vocab=300, mm_vocab=16384 + 64, codes=16384)


def build_policy(shape: dict, layers: int, device: str, dtype: torch.dtype, grid: tuple[int, int]):
    from grpo_image.policies.xomni import XOmniPolicy, build_tiny_xomni_tokenizer
    from grpo_image.policies.xomni_model import XOmniConfig, XOmniForCausalLM

    mm_adap = min(shape["mm_adap"], layers // 4)
    mm_head = min(shape["mm_head"], layers // 4)
    tokenizer = build_tiny_xomni_tokenizer(shape["vocab"], shape["codes"], shape["mm_vocab"])
    config = XOmniConfig(
        vocab_size=shape["vocab"], mm_vocab_size=shape["mm_vocab"], image_vocab_size=shape["codes"],
        num_mm_adap_layers=mm_adap, num_mm_head_layers=mm_head, hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"], num_hidden_layers=layers, num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = XOmniForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return XOmniPolicy(model.eval(), tokenizer, grid)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def decoder_matmul_params(model) -> int:
    """Weights of the decoder layers that are matmul operands (what 2 x params x tokens counts)."""
    return sum(p.numel() for layer in model.get_decoder().layers for p in layer.parameters() if p.ndim == 2)


def weight_bytes_per_step(policy) -> int:
    """Bytes a decode step must read: decoder layers, final norms, the image head's rows (not the text head)."""
    model = policy.model
    decoder = model.get_decoder()
    layers = sum(p.numel() * p.element_size() for p in decoder.layers.parameters())
    norms = sum(p.numel() * p.element_size() for p in (decoder.mm_norm.weight, decoder.lm_norm.weight))
    head = policy.num_codes * model.config.hidden_size * model.mm_head.weight.element_size()
    return layers + norms + head


def kv_bytes_per_row_token(config, element_size: int) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element_size


def measured_bandwidth(device: str) -> float | None:
    """Bytes/s of a device-to-device copy of a 4 GiB buffer (read + write counted)."""
    if not device.startswith("cuda"):
        return None
    src = torch.empty(2**31, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timed(lambda: dst.copy_(src), device) for _ in range(5)]
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**32 / statistics.median(times)


def gpu_spec(device: str, args) -> tuple[float | None, float | None, str]:
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    bw, flops = None, None
    for key, spec_bw, spec_flops in GPU_SPECS:
        if key in name:
            bw, flops = spec_bw, spec_flops
            break
    return args.peak_bw * 1e12 if args.peak_bw else bw, args.peak_tflops * 1e12 if args.peak_tflops else flops, name


def fits_update(policy, layers: int, rows: int, tokens: int, device: str) -> bool:
    """Rough check that weights + gradients + activations of the update pass fit in 85% of free memory."""
    if not device.startswith("cuda"):
        return True
    cfg = policy.model.config
    torch.cuda.empty_cache()  # what PyTorch caches is free for this purpose
    free, _ = torch.cuda.mem_get_info()
    per_layer = sum(p.numel() for p in policy.model.get_decoder().layers[0].parameters()) * 2  # bf16
    acts = rows * tokens * (cfg.hidden_size * 16 + cfg.intermediate_size * 4) * 2  # saved activations per layer
    head = rows * min(tokens, 1024) * policy.num_codes * 4 * 4  # one checkpointed head chunk, fp32 temporaries
    return layers * (per_layer + acts) + head < 0.85 * free  # the weights are already resident: gradients + acts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (CPU check of the code paths, no figures)")
    parser.add_argument("--layers", type=int, default=36, help="decoder layers for sampling (X-Omni: 36)")
    parser.add_argument("--update-layers", type=int, default=0, help="layers for the update pass (0: as many fit)")
    parser.add_argument("--rows", type=int, default=None, help="G rows sampled (default 16; 2 with --smoke)")
    parser.add_argument("--length", type=int, default=None,
                        help="L codes, a square grid (default 4,096: X-Omni at 1024 px; 64 with --smoke)")
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.03)
    parser.add_argument("--update-rows", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-update", action="store_true")
    parser.add_argument("--peak-bw", type=float, default=None, help="TB/s, overrides the table")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 TFLOP/s, overrides the table")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (use --device cpu --smoke to check the code paths)")
        return 2
    if args.rows is None:
        args.rows = 2 if args.smoke else 16
    if args.length is None:
        args.length = 64 if args.smoke else 4096
    side = int(round(args.length ** 0.5))
    if side * side != args.length:
        parser.error("--length must be a square")
    shape = SMOKE if args.smoke else REAL
    dtype = torch.float32 if args.smoke else torch.bfloat16
    layers = min(args.layers, shape["layers"]) if not args.smoke else shape["layers"]
    print_header("GPU sampler at X-Omni's shape", vars(args))
    peak_bw, peak_flops, gpu_name = gpu_spec(args.device, args)

    from grpo_image.loss import grpo_loss
    from grpo_image.logprobs import teacher_forced_logprobs
    from grpo_image.sampling import SamplingSettings, sample_codes
    from sampling import make_variants

    policy = build_policy(shape, layers, args.device, dtype, (side, side))
    n_params = sum(p.numel() for p in policy.model.parameters())
    print(f"model: {layers} layers, {n_params / 1e9:.2f} B parameters ({dtype}), device {gpu_name}", flush=True)
    settings = SamplingSettings(min_p=args.min_p, cfg_scale=args.cfg_scale)
    prompt = "a photograph of a red fox sitting in the snow, soft morning light"
    prompts = [prompt] * args.rows
    seeds = torch.arange(args.rows) + 1000
    variants = make_variants(policy, prompts, settings, seeds)
    results: dict = {"settings": vars(args), "gpu": gpu_name, "layers": layers, "parameters": n_params}

    # ---- sampler vs floor, interleaved
    with torch.no_grad():
        sample_codes(policy, prompts[:2], seeds[:2], settings)  # warm-up (kernels, allocator)
        times = {"ours": [], "floor": []}
        for _ in range(args.repeats):
            for name in times:
                times[name].append(timed(variants[name], args.device))
                print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    if args.device.startswith("cuda"):
        results["sampler_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    prefix_len = len(policy.encode([prompt])[0])
    rows = 2 * args.rows if settings.uses_cfg else args.rows
    w_bytes = weight_bytes_per_step(policy)
    kv_row_token = kv_bytes_per_row_token(policy.model.config, policy.model.mm_head.weight.element_size())
    step_bytes = [w_bytes + kv_row_token * rows * (prefix_len + t) for t in range(args.length)]
    total_bytes = sum(step_bytes)
    bw_measured = measured_bandwidth(args.device)
    ours, floor = statistics.median(times["ours"]), statistics.median(times["floor"])
    table_rows = []
    for label, seconds in (("ours (sample_codes)", times["ours"]), ("bare forwards", times["floor"])):
        s = statistics.median(seconds)
        table_rows.append([label, spread(seconds, 2), f"{args.rows * args.length / s:.0f}",
                           f"{1000 * s / args.length:.2f}", f"{s / args.rows:.3f}"])
    for label, bw in (("HBM floor, spec bandwidth", peak_bw), ("HBM floor, measured copy bandwidth", bw_measured)):
        if bw:
            s = total_bytes / bw
            table_rows.append([label, f"{s:.2f}", f"{args.rows * args.length / s:.0f}",
                               f"{1000 * s / args.length:.2f}", f"{s / args.rows:.3f}"])
    print()
    print(f"G = {args.rows}, L = {args.length}, prompt {prefix_len} tokens, rows per forward {rows}, "
          f"weights read per step {w_bytes / 2**30:.2f} GiB, KV cache at the last step "
          f"{kv_row_token * rows * (prefix_len + args.length) / 2**30:.2f} GiB")
    print(table(["sampler", "seconds", "codes/s", "ms / decode step", "GPU-s / image"], table_rows))
    summary = {"ours_s": ours, "floor_forwards_s": floor, "ours_over_forwards": ours / floor,
               "bytes_moved": total_bytes, "peak_bw": peak_bw, "measured_bw": bw_measured}
    if peak_bw:
        summary["ours_over_hbm_floor_spec"] = ours / (total_bytes / peak_bw)
        print(f"ours / HBM floor (spec bandwidth): {summary['ours_over_hbm_floor_spec']:.2f}")
    if bw_measured:
        summary["ours_over_hbm_floor_measured"] = ours / (total_bytes / bw_measured)
        print(f"ours / HBM floor (measured bandwidth {bw_measured / 1e12:.2f} TB/s): "
              f"{summary['ours_over_hbm_floor_measured']:.2f}")
    print(f"ours / bare forwards: {ours / floor:.2f}")
    results["sampler"] = {"times": times, **summary}

    # ---- MFU of the update pass
    if not args.skip_update:
        del variants
        tokens = prefix_len + args.length - 1
        update_layers = args.update_layers or layers
        if not args.smoke and not args.update_layers:
            while update_layers > 1 and not fits_update(policy, update_layers, args.update_rows, tokens, args.device):
                update_layers -= 1
        if update_layers != layers:
            del policy
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            policy = build_policy(shape, update_layers, args.device, dtype, (side, side))
        model = policy.model.train()
        codes = torch.randint(0, policy.num_codes, (args.update_rows, args.length), device=args.device)
        up_prompts = [prompt] * args.update_rows
        old = torch.zeros(args.update_rows, args.length, device=args.device)
        adv = torch.randn(args.update_rows, device=args.device)

        def update_pass():
            logp = teacher_forced_logprobs(policy, up_prompts, codes, settings)
            loss, _ = grpo_loss(logp, old, logp.detach(), adv, 0.2, 0.2, 0.01)
            loss.backward()
            model.zero_grad(set_to_none=True)

        update_pass()  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        up_times = [timed(update_pass, args.device) for _ in range(args.repeats)]
        cfg = model.config
        r, t, l, h, v = args.update_rows, prefix_len + args.length - 1, args.length, cfg.hidden_size, policy.num_codes
        mix = 2 if settings.uses_cfg and settings.cfg_logprobs == "mixture" else 1
        forward = mix * (2 * decoder_matmul_params(model) * r * t + 2 * v * h * r * l
                         + 4 * cfg.num_hidden_layers * r * t * t * h / 2)
        flops = 3 * forward
        s = statistics.median(up_times)
        print()
        print(f"update pass: {update_layers} layers, {r} row(s) x {t} tokens{' x 2 (CFG mixture)' if mix == 2 else ''}: "
              f"{spread(up_times, 3)} s, {flops / 1e12:.1f} TFLOP, {flops / s / 1e12:.1f} TFLOP/s")
        results["update"] = {"layers": update_layers, "times": up_times, "flops": flops, "tflops_per_s": flops / s / 1e12}
        if args.device.startswith("cuda"):
            results["update"]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if peak_flops:
            results["update"]["mfu"] = flops / s / peak_flops
            print(f"MFU of the update pass: {100 * results['update']['mfu']:.1f}% of {peak_flops / 1e12:.0f} TFLOP/s")
    if args.smoke:
        print("\n(smoke run: toy sizes on " + args.device + "; these numbers are not GPU measurements)")
    save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
