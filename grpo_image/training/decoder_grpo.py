"""Decoder GRPO on the training processes: the diffusion decoder's rollouts, with log-probs, and its update.

With `train.target: decoder | both` each training process holds the decoder with LoRA adapters (fp32, AdamW) next to
the policy: a rollout's window latents live where its training pass runs, and the adapters' gradients are averaged
over the processes as the policy's are. It decodes this process's code samples `decoder_train.group_size` times each
(G images of fixed codes: the decoder's group), keeping each decode's window (grpo_image/core/flow_window.py); the
images go to the reward workers, which score them without decoding; the decoder's advantages come back from the
nested groups (grpo_image/core/nested_advantages.py) and Flow-GRPO's loss (grpo_image/core/flow_loss.py) updates the
adapters, one decoder batch (the decoder's `max_batch_size` decodes of one prompt) and one window step per forward
and backward (the steps are independent terms of the loss: one step's graph is held at a time).

Everything random derives from seeds: each decode's noise from a CPU generator seeded by its decode seed, the
window's start from (seed, step); a resumed run decodes the same images.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from grpo_image.base.config import import_dotted, instantiate
from grpo_image.core.flow import step_kl
from grpo_image.core.flow_loss import flow_grpo_loss
from grpo_image.core.flow_window import WindowRollout, denoise_with_window, window_start, window_step_logprob
from grpo_image.decoders.flow_lora import adapter_state, adapters_disabled, add_decoder_lora, load_adapter_state
from grpo_image.decoders.glm_image import prompt_runs
from grpo_image.training.checkpoint import DECODER, WEIGHTS
from grpo_image.training.distributed import World, apply_update
from grpo_image.training.saved_weights import policy_folder

ADAPTER_FILE, ADAPTER_CONFIG, OPTIMIZER_FILE = "adapter_model.safetensors", "adapter_config.json", "optimizer.pt"


@dataclass
class DecoderChunk:
    """One decoder batch of a step: its rows among this process's decodes, its conditioning and its window."""

    rows: slice
    velocity: object  # (latents, timestep) -> velocity, the conditioning of these rows held inside
    window: WindowRollout


def trainer_decoder(node: DictConfig, device: torch.device):
    """The recipe's decoder built on this process's device (a decoder that takes `device` is given it)."""
    spec = OmegaConf.to_container(node, resolve=True)
    target = import_dotted(spec["_component_"])
    if "device" in inspect.signature(target).parameters:
        spec["device"] = str(device)
    decoder = instantiate(spec)
    if not hasattr(decoder, "flow"):
        raise ValueError(
            f"train.target decoder/both trains a flow-matching decoder; {type(decoder).__name__} has none to train "
            "(decoders with one: GlmImageDecoder, XOmniFluxDecoder)"
        )
    return decoder.flow()


class DecoderTrainer:
    """The decoder a training process trains: its flow form, LoRA adapters and their optimizer."""

    def __init__(self, cfg: DictConfig, world: World) -> None:
        self.cfg, self.seed, self.world = cfg.decoder_train, cfg.seed, world
        self.flow = trainer_decoder(cfg.decoder, world.device)
        lora = self.cfg.lora
        with torch.random.fork_rng(devices=[world.device] if world.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 1)  # the adapters' A matrices: the same on every process, on its device
            self.targets = lora.target_regex or self.flow.lora_targets
            self.params = add_decoder_lora(self.flow.transformer, r=lora.r, alpha=lora.alpha, targets=self.targets)
        earlier = trained_decoder_folder(OmegaConf.select(cfg, "train.init_from", default=None))
        if earlier is not None:  # a stage continues the decoder its run started from (the optimizer starts anew)
            self.load(earlier, with_optimizer=False)
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, betas=tuple(self.cfg.adam_betas),
                                           weight_decay=self.cfg.weight_decay)  # fmt: skip
        self.flow.transformer.eval()  # no dropout: the training pass recomputes the rollout's log-probs exactly
        if self.cfg.gradient_checkpointing:  # keep each block's input only; recompute the rest in the backward
            self.flow.transformer.enable_gradient_checkpointing()

    @torch.no_grad()
    def rollout(self, step: int, codes: torch.Tensor, prompts: list[str], grid: tuple[int, int],
                seeds: torch.Tensor) -> tuple[np.ndarray, list[DecoderChunk]]:
        """Decode each code sample G times: codes [n, L], n prompts, seeds [n*G] -> uint8 [n*G, H, W, 3], chunks."""
        cfg, g = self.cfg, self.cfg.group_size
        codes = codes.repeat_interleave(g, dim=0)  # [n*G, L]: each sample's decodes are contiguous
        prompts = [p for p in prompts for _ in range(g)]
        self.flow.set_timesteps(grid, cfg.num_inference_steps)
        start = window_start(self.seed, step, cfg.num_inference_steps, cfg.window)
        images, chunks = [], []
        for rows in prompt_runs(prompts, self.flow.max_batch_size):
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[rows]]
            velocity = self.flow.velocity(codes[rows], grid, prompts[rows.start], cfg.guidance_scale)
            latents = self.flow.initial_latents(grid, generators)  # fp32 [m, ...]
            window = denoise_with_window(self.flow.scheduler, velocity, latents, start=start, window=cfg.window,
                                         noise_level=cfg.noise_level, kind=cfg.kind, generators=generators)
            images.append(self.flow.to_images(window.final, grid))  # uint8 [m, H, W, 3]
            chunks.append(DecoderChunk(rows, velocity, _without_final(window)))
        return np.concatenate(images), chunks

    def update(self, chunks: list[DecoderChunk], advantages: torch.Tensor) -> dict[str, float]:
        """Flow-GRPO's loss over every chunk's window, `decoder_train.minibatches` optimizer steps; advantages [n*G].
        Returns the step's `decoder/*` metrics."""
        cfg, world = self.cfg, self.world
        parts = [list(part) for part in np.array_split(np.arange(len(chunks)), cfg.minibatches)]
        if any(not part for part in parts):
            raise ValueError(f"decoder_train.minibatches ({cfg.minibatches}) is more than the {len(chunks)} decoder "
                             "batches of this process: lower it, or lower the decoder's max_batch_size")
        totals: dict[str, list[float]] = {}
        for part in parts:
            self.optimizer.zero_grad(set_to_none=True)
            rows = sum(chunks[i].rows.stop - chunks[i].rows.start for i in part)
            stats: dict[str, float] = {}
            finite = True
            for i in part:
                chunk = chunks[i]
                steps = len(chunk.window.timesteps)
                # the loss is a mean over the minibatch's decodes and their window steps; one step's graph at a time
                share = (chunk.rows.stop - chunk.rows.start) / rows / steps
                for k in range(steps):
                    loss, step_stats = self._step_loss(chunk, k, advantages[chunk.rows])
                    finite = finite and bool(torch.isfinite(loss))
                    (loss * share).backward()
                    for key, value in step_stats.items():
                        stats[key] = stats.get(key, 0.0) + share * value
            stats["grad_norm"], applied = apply_update(world, self.params, self.optimizer, cfg.max_grad_norm, finite)
            stats["skipped_updates"] = 0.0 if applied else 1.0
            for key, value in stats.items():
                totals.setdefault(key, []).append(value)
        metrics = {f"decoder/{key}": float(np.mean(values)) for key, values in totals.items()}
        metrics["decoder/skipped_updates"] = float(sum(totals["skipped_updates"]))
        metrics["decoder/ratio_mean_first"] = totals["ratio_mean"][0]  # on-policy: 1 up to the kernels' rounding
        metrics["decoder/adv_abs_mean"] = float(advantages.abs().mean())
        return metrics

    def _step_loss(self, chunk: DecoderChunk, k: int, advantages: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Window step k's loss with grad: its log-prob recomputed, guidance included, and the KL if asked."""
        cfg, scheduler = self.cfg, self.flow.scheduler
        logprob, mean, std = window_step_logprob(scheduler, chunk.velocity, chunk.window, k,
                                                 noise_level=cfg.noise_level, kind=cfg.kind)  # [m], [m, ...]
        kl = None
        if cfg.beta > 0:
            with torch.no_grad(), adapters_disabled(self.flow.transformer):
                _, reference, _ = window_step_logprob(scheduler, chunk.velocity, chunk.window, k,
                                                      noise_level=cfg.noise_level, kind=cfg.kind)  # fmt: skip
            kl = step_kl(mean, reference, std).unsqueeze(1)  # [m, 1]
        return flow_grpo_loss(logprob.unsqueeze(1), chunk.window.logprobs[:, k : k + 1], advantages.to(logprob.device),
                              clip_range=cfg.clip_range, adv_clip=cfg.adv_clip, kl=kl, beta=cfg.beta)  # fmt: skip

    def save(self, folder) -> None:
        """The adapters (peft's names), what they are (r, alpha, the targets' regex: `adapter_config.json`, so that
        `sample`, `eval` and `export` attach them as trained) and AdamW's state; the adapters are whole on every
        process: rank 0 writes."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(adapter_state(self.flow.transformer), str(folder / ADAPTER_FILE))
        lora = {"r": int(self.cfg.lora.r), "lora_alpha": float(self.cfg.lora.alpha), "target_modules": self.targets}
        (folder / ADAPTER_CONFIG).write_text(json.dumps(lora, indent=1))
        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load(self, folder, with_optimizer: bool = True) -> None:
        from safetensors.torch import load_file

        load_adapter_state(self.flow.transformer, load_file(folder / ADAPTER_FILE), str(folder))
        if with_optimizer:
            self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True))


def _without_final(window: WindowRollout) -> WindowRollout:
    """What training keeps of a rollout: its window (the final latents are already pixels)."""
    return WindowRollout(final=window.final[:0], start=window.start, timesteps=window.timesteps,
                         latents=window.latents, logprobs=window.logprobs)  # fmt: skip


def trained_decoder_folder(checkpoint, hashed: str | None = WEIGHTS) -> Path | None:
    """The `decoder/` of a checkpoint (a run folder's newest, a checkpoint, or its `policy/`) whose run trained the
    decoder; None for no checkpoint, or one whose run trained the policy only. `hashed`: as `policy_folder`."""
    if not checkpoint:
        return None
    folder = policy_folder(checkpoint, hashed).parent / DECODER
    return folder if folder.is_dir() else None


def saved_lora(folder: Path) -> dict:
    """What a checkpoint's decoder adapters are: {"r", "lora_alpha", "target_modules" (a regex)}."""
    return json.loads((folder / ADAPTER_CONFIG).read_text())


def attach_trained_adapters(decoder, folder: Path) -> None:
    """A checkpoint's decoder adapters (`folder`: its decoder/) on a recipe's decoder, in place, as its run trained
    them: `sample` and `eval` then decode as training did."""
    from safetensors.torch import load_file

    flow, lora = decoder.flow(), saved_lora(folder)
    add_decoder_lora(flow.transformer, r=lora["r"], alpha=lora["lora_alpha"], targets=lora["target_modules"])
    load_adapter_state(flow.transformer, load_file(folder / ADAPTER_FILE), str(folder))
    flow.transformer.requires_grad_(False)
