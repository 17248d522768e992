"""X-Omni's diffusion image decoder: image codes -> SigLIP-like features -> FLUX sampling -> uint8 RGB.

X-Omni decodes its LM's image codes with a FLUX.1-dev-sized transformer conditioned on features rebuilt from
the codes (`xomni_projector`, injected by `xomni_transformer`). Its pipeline does "true" CFG against zeroed
features (and, for X-Omni-En, the empty prompt) in one batched transformer call per step, Euler steps on
FLUX.1-dev's resolution-shifted schedule, then the FLUX VAE. That loop is `sample_xomni_flux` below, built from
diffusers' own FLUX pipeline helpers (latent packing, image ids, shift, timesteps) and scheduler step, so the only
code here is what X-Omni does differently from the stock pipeline.

Unlike upstream, which draws the noise from the global RNG, every rollout draws its initial noise from its own
CPU `torch.Generator` seeded by its decode seed: an image is reproducible from (codes, seed) alone, on any device
and in any batch (a batch equals its rollouts decoded one by one).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from grpo_image.decoders.xomni_projector import XOmniProjector
from grpo_image.decoders.xomni_transformer import XOmniFluxTransformer2DModel, load_xomni_transformer


class PromptEncoder(Protocol):
    """X-Omni-En's text conditioning: prompts -> (T5 sequence [U, S, J], CLIP pooled [U, P]), S fixed (512)."""

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


class FluxPromptEncoder:
    """CLIP-L pooled + T5-XXL sequence from a local FLUX.1-dev folder, via diffusers' `FluxPipeline.encode_prompt`.

    This is what X-Omni-En's pipeline (a `FluxPipeline` subclass) calls, T5 padded to `max_sequence_length`.
    """

    def __init__(
        self, flux_path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
        max_sequence_length: int = 512,
    ) -> None:  # fmt: skip
        path = Path(flux_path)
        parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        missing = [d for d in parts if not (path / d).is_dir()]
        if missing:
            raise FileNotFoundError(f"FluxPromptEncoder: {path} is not a FLUX.1-dev folder (missing {missing})")
        self.device = torch.device(device)
        self.max_sequence_length = max_sequence_length
        self.pipe = FluxPipeline.from_pretrained(path, transformer=None, vae=None, dtype=dtype).to(self.device)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        return embeds, pooled  # [U, S, J], [U, P]


class PrecomputedPromptEmbeds:
    """Embeddings computed once for a fixed prompt set, so reward workers need not hold T5-XXL.

    File format (`save_prompt_embeds`): safetensors with `prompt_embeds` [P, S, J] and `pooled_prompt_embeds`
    [P, Pd], and the P prompt strings as JSON in the metadata key `prompts`; it must include "" (the negative).
    """

    def __init__(self, prompts: Sequence[str], embeds: torch.Tensor, pooled: torch.Tensor, source: str = "") -> None:
        if len(prompts) != embeds.shape[0] or len(prompts) != pooled.shape[0]:
            raise ValueError(
                f"PrecomputedPromptEmbeds{source}: {len(prompts)} prompts but {embeds.shape[0]} embeddings"
            )
        if "" not in prompts:
            raise ValueError(f"PrecomputedPromptEmbeds{source}: the empty prompt (the CFG negative) is missing")
        self.index = {p: i for i, p in enumerate(prompts)}
        self.embeds, self.pooled, self.source = embeds, pooled, source  # [P, S, J], [P, Pd]

    @classmethod
    def from_file(cls, path: str | Path) -> PrecomputedPromptEmbeds:
        with safe_open(str(path), framework="pt") as f:
            prompts = json.loads((f.metadata() or {}).get("prompts", "null"))
        if prompts is None:
            raise ValueError(f"{path}: no 'prompts' metadata; write it with save_prompt_embeds")
        tensors = load_file(path)
        return cls(prompts, tensors["prompt_embeds"], tensors["pooled_prompt_embeds"], source=f" ({path})")

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        unknown = [p for p in prompts if p not in self.index]
        if unknown:
            raise KeyError(f"PrecomputedPromptEmbeds{self.source}: no embeddings for prompts {unknown[:3]}")
        rows = torch.tensor([self.index[p] for p in prompts])  # [U]
        return self.embeds[rows], self.pooled[rows]  # [U, S, J], [U, Pd]


def save_prompt_embeds(
    path: str | Path, prompts: Sequence[str], encoder: PromptEncoder, batch_size: int = 16
) -> None:
    """Encode a prompt set (plus "") once, e.g. with `FluxPromptEncoder`, into a `PrecomputedPromptEmbeds` file."""
    unique = sorted(set(prompts) | {""})
    parts = [encoder(unique[s : s + batch_size]) for s in range(0, len(unique), batch_size)]
    embeds = torch.cat([e for e, _ in parts]).cpu().contiguous()  # [P, S, J] in the encoder's dtype (4 MiB a prompt)
    pooled = torch.cat([p for _, p in parts]).cpu().contiguous()  # [P, Pd]
    save_file(
        {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, str(path), metadata={"prompts": json.dumps(unique)}
    )


def set_xomni_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler, length: int, num_inference_steps: int, device: torch.device | str
) -> torch.Tensor:
    """Give `scheduler` the schedule X-Omni samples L = `length` tokens with, and return its timesteps.

    FLUX.1-dev's unshifted sigmas (linear from 1 to 1/steps), shifted by mu for the token count without a clamp, as
    upstream: 72x72 codes give mu ~ 1.334. One place for the sampler and the decoder-GRPO loop, so they cannot drift.
    """
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    cfg = scheduler.config
    mu = calculate_shift(
        length,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    return timesteps


@torch.no_grad()
def sample_xomni_flux(
    transformer: XOmniFluxTransformer2DModel,
    scheduler: FlowMatchEulerDiscreteScheduler,
    latents: torch.Tensor,
    features: torch.Tensor,
    img_ids: torch.Tensor,
    num_inference_steps: int,
    cfg_scale: float,
    guidance_scale: float = 1.0,
    text: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> torch.Tensor:
    """X-Omni's denoising loop (its `FluxPipelineWithSigLIP.__call__`), batched over n rollouts.

    latents [n, L, C] packed initial noise; features [n, L, z] from the projector; img_ids [L, 3];
    text (en only): (encoder_hidden_states [2n, S, J], pooled [2n, P]) already stacked as [cond; uncond].
    `on_step(i, tensors)` sees each step's `model_output` [2n, L, C], `noise_pred` [n, L, C] and `latents`.
    Returns the final packed latents [n, L, C].
    """
    n, length = latents.shape[:2]
    device = latents.device
    timesteps = set_xomni_timesteps(scheduler, length, num_inference_steps, device)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([2 * n], guidance_scale, device=device, dtype=torch.float32)  # [2n]
    feats = torch.cat([features, torch.zeros_like(features)]).to(latents.dtype)  # [2n, L, z]: cond, uncond
    text_kwargs: dict[str, Any] = {}
    if text is not None:
        embeds, pooled = text  # [2n, S, J], [2n, P]
        text_kwargs = {
            "encoder_hidden_states": embeds.to(device, latents.dtype),
            "pooled_projections": pooled.to(device, latents.dtype),
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=device, dtype=latents.dtype),  # [S, 3]
        }
    for i, t in enumerate(timesteps):
        timestep = t.expand(2 * n).to(latents.dtype) / 1000  # cast before /1000, as upstream (rounds in bf16)
        model_output = transformer(
            hidden_states=torch.cat([latents, latents]),  # [2n, L, C]
            timestep=timestep,
            img_ids=img_ids,
            siglip_tensor=feats,
            guidance=guidance,
            return_dict=False,
            **text_kwargs,
        )[0]  # [2n, L, C]
        pos, neg = model_output.chunk(2)  # [n, L, C] each
        noise_pred = neg + cfg_scale * (pos - neg)  # true CFG, [n, L, C]
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]  # Euler in fp32, cast back
        if on_step is not None:
            on_step(i, {"model_output": model_output, "noise_pred": noise_pred, "latents": latents})
    return latents


class XOmniFluxDecoder:
    """X-Omni's image decoder behind the `Decoder` protocol: codes [n, h*w] -> uint8 RGB [n, 16h, 16w, 3].

    What to pass. Nothing is downloaded: every path must exist locally.
    - `xomni_path`: the X-Omni checkpoint folder (X-Omni-En or the Chinese model). Its `config.json`
      `vision_config` supplies the projector file (`encoder.projector_path`), the transformer subfolder
      (`decoder.model_path`), the default `num_inference_steps` and `cfg_scale` (`decoder.*`) and `dtype`.
    - `flux_path`: a FLUX.1-dev folder (`vae/`, `scheduler/`, and for en `text_encoder*/`, `tokenizer*/`).
    - Or give the parts one by one (each overrides what the two folders imply): `projector` (weights file),
      `transformer`, `vae`, `scheduler` (folders).
    - `text_encoder` (en only; zh has no text stream): a FLUX.1-dev folder (CLIP-L + T5-XXL on this worker), a
      `.safetensors` file of precomputed embeddings (written once by `save_prompt_embeds`, so reward workers
      need not hold T5-XXL), or any `PromptEncoder` object. Defaults to `flux_path`.
    - `variant`: "auto" tells en from zh by the saved weights (zh has a learned `pooled_embeds`).
    - `num_inference_steps`, `cfg_scale`: override X-Omni's vision_config (required without `xomni_path`).
    - `guidance_scale` is FLUX's embedded guidance, fixed at 1.0 by X-Omni. `max_batch_size` caps the rollouts
      per transformer call (each is run twice, cond and uncond): 4 by default (`grpo-image plan` says what a
      batch needs); None decodes a whole chunk at once. The result does not depend on it.
    For en, call with `prompts=` (the generation prompt of each rollout); the empty prompt is the negative.
    """

    def __init__(
        self,
        xomni_path: str | None = None,
        flux_path: str | None = None,
        *,
        projector: str | None = None,
        transformer: str | None = None,
        vae: str | None = None,
        scheduler: str | None = None,
        text_encoder: str | PromptEncoder | None = None,
        variant: str = "auto",
        num_inference_steps: int | None = None,
        cfg_scale: float | None = None,
        guidance_scale: float = 1.0,
        dtype: str | None = None,
        device: str | None = None,
        max_batch_size: int | None = 4,
    ) -> None:
        vision = _vision_config(xomni_path) if xomni_path is not None else {}
        encoder_cfg, decoder_cfg = vision.get("encoder", {}), vision.get("decoder", {})
        if decoder_cfg.get("upscale_factor", 16) != 16:
            raise ValueError(f"{xomni_path}: vision_config.decoder.upscale_factor must be 16 (one code per token)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = str(dtype or vision.get("dtype") or ("bfloat16" if self.device.type == "cuda" else "float32"))
        self.dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"XOmniFluxDecoder: dtype {dtype!r} is not a torch dtype (e.g. 'bfloat16', 'float32')")
        self.num_inference_steps = int(_pick(num_inference_steps, decoder_cfg, "num_inference_steps", xomni_path))
        self.cfg_scale = float(_pick(cfg_scale, decoder_cfg, "cfg_scale", xomni_path))
        self.guidance_scale = float(guidance_scale)
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"XOmniFluxDecoder: max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size

        projector = projector or _join(xomni_path, encoder_cfg.get("projector_path"), "projector")
        transformer = transformer or _join(xomni_path, decoder_cfg.get("model_path"), "transformer")
        vae = vae or _join(flux_path, "vae", "vae")
        scheduler = scheduler or _join(flux_path, "scheduler", "scheduler")
        for name, path in (("transformer", transformer), ("vae", vae), ("scheduler", scheduler)):
            if not Path(path).is_dir():
                raise FileNotFoundError(f"XOmniFluxDecoder: {name} folder {path} does not exist")

        self.projector = XOmniProjector.from_file(projector).to(self.device, self.dtype)
        self.transformer = load_xomni_transformer(
            transformer, variant, self.projector.z_channels, self.dtype
        ).to(self.device)
        self.variant = "zh" if hasattr(self.transformer, "pooled_embeds") else "en"
        self.vae = AutoencoderKL.from_pretrained(vae, dtype=self.dtype).to(self.device).eval()
        self.vae.enable_slicing()  # one image at a time: bounded memory at 1152 px, and batch-independent pixels
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # 8 for FLUX's VAE
        self.patch_px = 2 * self.vae_scale_factor  # pixels per code side: 2x2 latents per token
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.patch_px)

        self.text_encoder: PromptEncoder | None = None
        if self.variant == "en":
            text_encoder = text_encoder if text_encoder is not None else flux_path
            if text_encoder is None:
                raise ValueError(
                    "XOmniFluxDecoder: X-Omni-En needs text_encoder (a FLUX.1-dev folder or an embeddings file)"
                )
            if isinstance(text_encoder, (str, Path)):
                path = Path(text_encoder)
                if path.is_file():
                    text_encoder = PrecomputedPromptEmbeds.from_file(path)
                else:
                    text_encoder = FluxPromptEncoder(path, device=self.device, dtype=self.dtype)
            self.text_encoder = text_encoder

    @property
    def needs_prompts(self) -> bool:
        """True for X-Omni-En: its images depend on the prompt, so callers must pass `prompts=`."""
        return self.variant == "en"

    def __call__(
        self, codes: np.ndarray, grid: tuple[int, int], seeds: np.ndarray, *, prompts: Sequence[str] | None = None
    ) -> np.ndarray:
        """codes int64 [n, L] (L = h*w, row-major), seeds int64 [n], prompts n strings (en) -> uint8 [n, H, W, 3]."""
        h, w = grid
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)  # [n, L]
        seeds = np.asarray(seeds)  # [n]
        n = codes.shape[0]
        if codes.ndim != 2 or codes.shape[1] != h * w:
            raise ValueError(
                f"XOmniFluxDecoder: codes must be [n, {h * w}] for grid {h}x{w}, got {tuple(codes.shape)}"
            )
        if seeds.shape != (n,):
            raise ValueError(f"XOmniFluxDecoder: seeds must have shape ({n},), got {seeds.shape}")
        if self.needs_prompts and (prompts is None or len(prompts) != n):
            raise ValueError(f"XOmniFluxDecoder (X-Omni-En): pass prompts= with one prompt per rollout ({n})")
        step = self.max_batch_size or max(n, 1)
        prompts = None if prompts is None else list(prompts)
        chunks = [slice(s, s + step) for s in range(0, n, step)]
        images = [
            self.decode(codes[c], grid, seeds[c], None if prompts is None else prompts[c]) for c in chunks
        ]  # each uint8 [m, H, W, 3]
        if not images:
            return np.zeros((0, h * self.patch_px, w * self.patch_px, 3), dtype=np.uint8)
        return np.concatenate(images)  # uint8 [n, H, W, 3]

    @torch.no_grad()
    def decode(
        self, codes: torch.Tensor, grid: tuple[int, int], seeds: np.ndarray, prompts: Sequence[str] | None = None
    ) -> np.ndarray:
        """One transformer batch: codes [m, L], seeds [m] -> uint8 [m, H, W, 3]."""
        features = self.projector(codes.to(self.device), grid)  # [m, L, z]
        latents = self.initial_latents(seeds, grid)  # [m, L, C]
        latents = self.denoise(latents, features, grid, prompts)  # [m, L, C]
        return to_uint8(self.latents_to_images(latents, grid))

    def initial_latents(self, seeds: Sequence[int], grid: tuple[int, int]) -> torch.Tensor:
        """Packed noise [m, h*w, C], rollout i drawn from CPU `torch.Generator().manual_seed(seeds[i])`."""
        return self.noise([torch.Generator("cpu").manual_seed(int(s)) for s in seeds], grid)

    def noise(self, generators: Sequence[torch.Generator], grid: tuple[int, int]) -> torch.Tensor:
        """Packed noise [m, h*w, C] in the decoder's dtype, rollout i drawn from generators[i] (FLUX's draw)."""
        h, w = grid
        channels = self.transformer.config.in_channels // 4
        shape = (len(generators), channels, 2 * h, 2 * w)  # [m, C/4, 2h, 2w], as FLUX's prepare_latents
        noise = randn_tensor(shape, generator=list(generators), device=self.device, dtype=self.dtype)
        return FluxPipeline._pack_latents(noise, len(generators), channels, 2 * h, 2 * w)  # [m, h*w, C]

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """en: ([T5(prompts); T5('')] [2m, S, J], [CLIP(prompts); CLIP('')] [2m, P]), each prompt encoded once."""
        unique = sorted(set(prompts) | {""})
        embeds, pooled = self.text_encoder(unique)  # [U, S, J], [U, P]
        pos = torch.tensor([unique.index(p) for p in prompts])  # [m]
        rows = torch.cat([pos, torch.full_like(pos, unique.index(""))])  # [2m]: cond rows, then uncond rows
        return embeds[rows].to(self.device, self.dtype), pooled[rows].to(self.device, self.dtype)

    def denoise(
        self,
        latents: torch.Tensor,
        features: torch.Tensor,
        grid: tuple[int, int],
        prompts: Sequence[str] | None = None,
        on_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    ) -> torch.Tensor:
        """latents [m, L, C], features [m, L, z] -> final latents [m, L, C] (see `sample_xomni_flux`)."""
        h, w = grid
        img_ids = FluxPipeline._prepare_latent_image_ids(1, h, w, self.device, self.dtype)  # [L, 3]: (0, row, col)
        text = self.encode_prompts(prompts) if self.needs_prompts else None
        return sample_xomni_flux(
            self.transformer, self.scheduler, latents.to(self.device, self.dtype), features.to(self.dtype),
            img_ids, self.num_inference_steps, self.cfg_scale, self.guidance_scale, text, on_step,
        )  # fmt: skip

    @torch.no_grad()
    def latents_to_images(self, latents: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Packed latents [m, L, C] -> images float [m, 3, H, W] in [0, 1] (upstream's output_type='pt')."""
        h, w = grid
        latents = FluxPipeline._unpack_latents(latents, h * self.patch_px, w * self.patch_px, self.vae_scale_factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor  # [m, C/4, 2h, 2w]
        images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]  # [m, 3, H, W] in [-1, 1]
        return self.image_processor.postprocess(images, output_type="pt")  # [m, 3, H, W] in [0, 1]


    def flow(self):
        """This decoder as decoder GRPO trains it: the `FlowDecoder` of grpo_image/decoders/xomni_flux_flow.py."""
        from grpo_image.decoders.xomni_flux_flow import XOmniFluxFlow

        return XOmniFluxFlow(self)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[m, 3, H, W] in [0, 1] -> uint8 [m, H, W, 3], rounded as diffusers' `numpy_to_pil` (upstream's PIL output)."""
    array = images.permute(0, 2, 3, 1).float().cpu().numpy()  # [m, H, W, 3]
    return (array * 255).round().astype(np.uint8)


def _vision_config(xomni_path: str) -> dict:
    path = Path(xomni_path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"XOmniFluxDecoder: {path} not found (xomni_path: an X-Omni checkpoint folder)")
    config = json.loads(path.read_text())
    if "vision_config" not in config:
        raise ValueError(f"{path}: no 'vision_config' (is this an X-Omni checkpoint?)")
    return config["vision_config"]


def _pick(value: Any, decoder_cfg: dict, key: str, xomni_path: str | None) -> Any:
    """An explicit argument wins; otherwise X-Omni's vision_config.decoder value; neither is an error."""
    if value is not None:
        return value
    if key in decoder_cfg:
        return decoder_cfg[key]
    where = f"{xomni_path}/config.json vision_config.decoder" if xomni_path else "an X-Omni config (no xomni_path)"
    raise ValueError(f"XOmniFluxDecoder: '{key}' not given and not found in {where}")


def _join(folder: str | None, relative: str | None, name: str) -> str:
    if folder is None or relative is None:
        raise ValueError(f"XOmniFluxDecoder: no {name} path: pass {name}= or the folder it lives in")
    return str(Path(folder) / relative)
