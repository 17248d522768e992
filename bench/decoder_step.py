"""What decoder GRPO costs next to the plain decode it replaces, on a GLM-Image DiT of a CPU-feasible size.

    python bench/decoder_step.py                  # 4 layers, hidden 256, 256 x 256 px, N = 10, w = 2, CFG 1.5
    python bench/decoder_step.py --smoke          # a one-layer DiT at 64 x 64 px, one round: the code path only

A decoder-GRPO step replaces the reward workers' plain decode of a code sample with a decode on the training process
that keeps its window (grpo_image/training/decoder_grpo.py), followed by a training pass over that window. Three
variants run interleaved on the same decoder, the same G decodes of one code sample (one decoder batch), the same
seeds:

  (a) plain decode   `GlmImageDecoder.__call__`: the diffusers pipeline, N guided Euler steps and the VAE, with the
                     LoRA adapters switched off (the decoder a run without decoder training would call);
  (b) rollout        `DecoderTrainer.rollout`: the same N guided steps, the window's w steps stochastic with their
                     log-probs and start latents kept, then the VAE (adapters on);
  (c) update         `DecoderTrainer.update` on (b)'s window: the window's log-probs recomputed with grad (guidance
                     included), Flow-GRPO's loss, backward into the LoRA adapters, gradient clip, one AdamW step.

What counting DiT passes predicts (c = 2 passes a step with guidance, 1 without): (a) runs N c passes, (b) the same
N c, (c) w c passes forward and their backward. The backward of a pass costs about twice its forward when every
weight gets a gradient, so (c) is near 3 w c passes; with the base frozen only the activations' gradients and the
small adapters' are computed, which can bring it nearer 2 w c. Expected: (b)/(a) = 1, (c)/(a) = 3 w / N,
(b+c)/(a) = 1 + 3 w / N (1.6 for N = 10, w = 2). The text encoder and the VAE run once in (a) and (b) and not in
(c); at these sizes they are a small share of (a), printed beside the ratios as `vae+text share`. A fourth
variant, the plain decode with the adapters on (`plain+lora`), splits what (b) adds to (a) into the adapters' own
cost and the windowed loop's (`rollout/(plain+lora)`, expected 1).

The DiT is diffusers' `GlmImageTransformer2DModel` built from a config (random weights: cost does not depend on
them), with the tiny VAE, ByT5 encoder and scheduler of grpo_image/decoders/tiny_glm_image.py. LoRA rank scales
with the width (`--rank`, default 8 on hidden 256) so that the adapters take about the share of a pass that the
recipe's rank 64 takes on GLM-Image's hidden 2,560 (5 to 6% of each adapted projection's multiply-adds).
"""

from __future__ import annotations

import argparse
import math

import _common as common  # first: it sets OMP_WAIT_POLICY before torch loads OpenMP
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

PROMPT = 'a sign that reads "OPEN"'
VAE_FACTOR, PATCH = 8, 2  # the tiny VAE's 8 px per latent, GLM-Image's DiT patch: 32 px per large-grid code side


def glm_dit_decoder(layers: int, heads: int, head_dim: int, num_codes: int, num_inference_steps: int,
                    guidance_scale: float, seed: int = 0):
    """A `GlmImageDecoder` around a GLM-Image DiT of the given size, the rest of its pipeline tiny (fp32, CPU).

    A component the trainer builds from its recipe node (`decoder._component_`): importable by name, so that
    `DecoderTrainer` measures its own construction path, adapters and optimizer included.
    """
    from diffusers import GlmImagePipeline, GlmImageTransformer2DModel

    from grpo_image.decoders.glm_image import GlmImageDecoder
    from grpo_image.decoders.tiny_glm_image import tiny_dit_parts

    parts = tiny_dit_parts(num_codes, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts["transformer"] = GlmImageTransformer2DModel(
            patch_size=PATCH, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=head_dim,
            num_attention_heads=heads, text_embed_dim=parts["text_encoder"].config.d_model, time_embed_dim=128,
            condition_dim=64, prior_vq_quantizer_codebook_size=num_codes,
        ).eval()  # fmt: skip
    pipe = GlmImagePipeline(processor=None, vision_language_encoder=None, **parts)
    return GlmImageDecoder.from_pipeline(pipe, num_inference_steps, guidance_scale, None, "cpu")


def trainer_config(args) -> DictConfig:
    """The recipe keys DecoderTrainer reads: the defaults' decoder_train with this run's sizes."""
    from grpo_image.base.config import DEFAULTS_PATH

    decoder_train = OmegaConf.load(DEFAULTS_PATH).decoder_train
    decoder_train.merge_with({
        "group_size": args.decodes, "num_inference_steps": args.steps, "window": args.window,
        "guidance_scale": args.guidance, "kind": args.kind, "noise_level": args.noise_level,
        "lora": {"r": args.rank, "alpha": 2 * args.rank},
    })  # fmt: skip
    decoder = {"_component_": "decoder_step.glm_dit_decoder", "layers": args.layers, "heads": args.heads,
               "head_dim": args.head_dim, "num_codes": args.codes, "num_inference_steps": args.steps,
               "guidance_scale": args.guidance}  # fmt: skip
    return OmegaConf.create({"seed": 0, "decoder": decoder, "decoder_train": decoder_train})


def expected_ratios(steps: int, window: int, backward_factor: float = 3.0) -> dict[str, float]:
    """(b)/(a), (c)/(a), (b+c)/(a) from counting DiT passes (guidance doubles every side alike)."""
    update = backward_factor * window / steps
    return {"rollout/plain": 1.0, "update/plain": update, "(rollout+update)/plain": 1.0 + update}


def lora_share(transformer) -> float:
    """Multiply-adds of the adapters over those of the projections they adapt: what LoRA adds to a pass's matmuls."""
    from peft.tuners.lora import LoraLayer

    base = extra = 0
    for module in transformer.modules():
        if isinstance(module, LoraLayer) and hasattr(module.get_base_layer(), "in_features"):
            layer = module.get_base_layer()
            r = module.r["default"]
            base += layer.in_features * layer.out_features
            extra += r * (layer.in_features + layer.out_features)
    return extra / base if base else 0.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="DiT blocks (GLM-Image: 30)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (GLM-Image: 64)")
    parser.add_argument("--head-dim", type=int, default=64, help="per head (GLM-Image: 40); hidden = heads x head_dim")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (a multiple of 32)")
    parser.add_argument("--codes", type=int, default=1024, help="the prior's codebook size")
    parser.add_argument("--steps", type=int, default=10, help="N: denoising steps (decoder_train's default)")
    parser.add_argument("--window", type=int, default=2, help="w: stochastic, trained steps (decoder_train's default)")
    parser.add_argument("--guidance", type=float, default=1.5, help="CFG scale (GLM-Image's pipeline default)")
    parser.add_argument("--decodes", type=int, default=4, help="G: decodes of the code sample (one decoder batch)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank, as the recipe's 64/128)")
    parser.add_argument("--kind", default="sde", choices=["sde", "cps"])
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--smoke", action="store_true", help="a one-layer DiT at 64 px, N 4, w 1, one round, no "
                        "warm-up: checks the code path, its figures mean nothing")
    common.add_round_arguments(parser, repeats=3)
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.heads, args.head_dim, args.size, args.codes = 1, 2, 8, 64, 64
        args.steps, args.window, args.decodes, args.rank, args.repeats, args.warmup = 4, 1, 2, 2, 1, 0
    if args.size % (VAE_FACTOR * PATCH * 2):
        parser.error("--size must be a multiple of 32 (one large-grid code covers 32 x 32 px)")
    common.set_threads(args.threads)

    from grpo_image.decoders.flow_lora import adapters_disabled
    from grpo_image.training.decoder_grpo import DecoderTrainer
    from grpo_image.training.distributed import World

    trainer = DecoderTrainer(trainer_config(args), World())  # the decoder, LoRA adapters and AdamW of a run
    decoder, transformer = trainer.flow.decoder, trainer.flow.transformer
    side = args.size // (VAE_FACTOR * PATCH * 2)
    grid = (side, side)
    settings = {**{k: v for k, v in vars(args).items() if k != "json"}, "hidden": args.heads * args.head_dim,
                "grid": grid, "image_tokens": (args.size // (VAE_FACTOR * PATCH)) ** 2,
                "dit_parameters": sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n),
                "lora_parameters": sum(p.numel() for p in trainer.params),
                "lora_share_of_adapted_matmuls": round(lora_share(transformer), 4)}  # fmt: skip
    common.print_header("Decoder GRPO step vs the plain decode (GLM-Image DiT)", settings)

    codes = torch.randint(0, args.codes, (1, side * side), generator=torch.Generator().manual_seed(0))  # [1, L]
    seeds = torch.arange(100, 100 + args.decodes)  # [G]: one per decode, the same for (a) and (b)
    advantages = torch.randn(args.decodes, generator=torch.Generator().manual_seed(1))
    advantages = (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-6)  # [G], a group's
    state = {"step": 0, "chunks": None}

    def plain() -> None:
        with adapters_disabled(transformer):  # the decoder a policy-only run's workers call
            plain_with_adapters()

    def plain_with_adapters() -> None:  # what the adapters alone add to a decode: (b) against this is the loop's cost
        decoder(codes.repeat(args.decodes, 1).numpy(), grid, seeds.numpy(), prompts=[PROMPT] * args.decodes)

    def rollout() -> dict:
        state["step"] += 1  # a new window start each round, as each training step draws one
        images, state["chunks"] = trainer.rollout(state["step"], codes, [PROMPT], grid, seeds)
        return {"window_start": state["chunks"][0].window.start, "images_finite": bool(np.isfinite(images).all())}

    def update() -> dict:
        return trainer.update(state["chunks"], advantages)

    def vae_and_text() -> None:  # what (a) and (b) spend outside the DiT: one prompt encoding, one VAE decode
        flow = trainer.flow
        with torch.no_grad():
            decoder.pipe.encode_prompt([PROMPT] * args.decodes, args.guidance > 1, device=decoder.device,
                                       dtype=decoder.dtype)  # fmt: skip
            latents = flow.initial_latents(grid, [torch.Generator().manual_seed(int(s)) for s in seeds])
            flow.to_images(latents, grid)

    variants = {"plain": plain, "plain+lora": plain_with_adapters, "rollout": rollout, "update": update,
                "vae+text": vae_and_text}
    samples = common.interleaved(variants, args.repeats, args.warmup)
    report = summarise(samples, args)
    print()
    print(report["table"])
    print()
    print(report["seconds_table"])
    common.save_json(args.json, {"settings": settings, **{k: v for k, v in report.items() if "table" not in k},
                                 "samples": {name: [vars(s) for s in runs] for name, runs in samples.items()}})
    return report


def summarise(samples: dict, args) -> dict:
    """Per-round ratios against the plain decode, median and range, next to what counting passes predicts."""
    expected = expected_ratios(args.steps, args.window)
    measured = {}
    for clock in ("cpu", "wall"):
        a = [s.__dict__[clock] for s in samples["plain"]]
        b = [s.__dict__[clock] for s in samples["rollout"]]
        c = [s.__dict__[clock] for s in samples["update"]]
        v = [s.__dict__[clock] for s in samples["vae+text"]]
        lora = [s.__dict__[clock] for s in samples["plain+lora"]]
        measured[clock] = {"rollout/plain": common.ratios(b, a), "update/plain": common.ratios(c, a),
                           "(rollout+update)/plain": common.ratios([x + y for x, y in zip(b, c)], a),
                           "plain+lora/plain": common.ratios(lora, a), "rollout/(plain+lora)": common.ratios(b, lora),
                           "vae+text share of plain": common.ratios(v, a)}  # fmt: skip
    expected = {**expected, "plain+lora/plain": None, "rollout/(plain+lora)": 1.0, "vae+text share of plain": None}
    rows = [[name, "-" if expected[name] is None else f"{expected[name]:.2f}", common.spread(measured["cpu"][name], 2),
             common.spread(measured["wall"][name], 2)] for name in expected]  # fmt: skip
    table = common.table(["ratio", "expected (DiT passes)", "measured, CPU s", "measured, wall s"], rows)
    seconds_rows = [[name, common.spread([s.cpu for s in runs]), common.spread([s.wall for s in runs])]
                    for name, runs in samples.items()]  # fmt: skip
    seconds_table = common.table(["variant", "CPU s", "wall s"], seconds_rows)
    finite = all(math.isfinite(x) and x > 0 for clock in measured.values() for xs in clock.values() for x in xs)
    stats = samples["update"][-1].extra
    return {"expected": {k: v for k, v in expected.items() if v is not None}, "measured": measured,
            "all_finite_positive": finite, "last_update": {k: v for k, v in stats.items() if isinstance(v, float)},
            "table": table, "seconds_table": seconds_table}  # fmt: skip


if __name__ == "__main__":
    main()  # run as a script, bench/ is on sys.path: the trainer imports `decoder_step.glm_dit_decoder` by name
