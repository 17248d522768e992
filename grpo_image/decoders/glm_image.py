"""GLM-Image's diffusion decoder: the large code grid of each rollout through diffusers' own `GlmImagePipeline`.

The pipeline (diffusers 0.42, pipelines/glm_image/pipeline_glm_image.py) normally runs the 9B AR model itself; given
`prior_token_ids` it skips that step (l.852-866) and only decodes, so this decoder loads it without the AR model and
its processor (`vision_language_encoder=None, processor=None`): a reward worker holds the DiT, the VAE and the ByT5
glyph encoder only. What it then does, and what this decoder keeps of it:

- Codes. A rollout holds the preview grid's codes, then the large grid's (`grpo_image.policies.glm_image`); the
  pipeline keeps only the large grid (`_extract_large_image_tokens`) and repeats every code over 2 x 2 (nearest
  upsampling, `_upsample_token_ids`, l.254-261): one prior code per 16 px DiT patch. So this decoder takes the last
  h * w codes of each rollout, (h, w) being the rollout's grid, and upsamples them the same way; the preview size
  needs no argument.
- Conditioning. The DiT sees the prior codes, ByT5 embeddings of the prompt's quoted text only (`get_glyph_texts`:
  text in '', "", “” or 「」, l.476-489), the target size, and classifier-free guidance against dropped priors and
  the empty prompt's glyphs (default scale 1.5, 50 Euler steps; l.733-736, l.987-1032). The pipeline pads different
  prompts' glyph embeddings with zeros and no mask (l.533-543), so a batch of different prompts is not decoded as
  each prompt alone would be; a batch of one prompt is. This decoder therefore calls the pipeline once per run of
  consecutive rollouts that share a prompt (a GRPO group), at most `max_batch_size` rollouts a call.
- Seeds. The pipeline draws the initial latents with `randn_tensor` from the generators it is given; each rollout
  gets its own CPU `torch.Generator` seeded by its decode seed, so an image depends on (codes, prompt, seed) only.
- Pixels. `output_type="np"` rounded as diffusers' `numpy_to_pil` rounds: the same pixels as the pipeline's images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def upsample_codes(codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Nearest 2x upsampling of each row-major h x w grid: [m, h*w] -> [m, 4*h*w] (one code per DiT patch)."""
    h, w = grid
    codes = codes.view(-1, h, w).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # [m, 2h, 2w]
    return codes.reshape(codes.shape[0], 4 * h * w)


def prompt_runs(prompts: Sequence[str], max_batch_size: int | None) -> list[slice]:
    """Consecutive rollouts with the same prompt, cut into pieces of at most max_batch_size."""
    runs, start = [], 0
    for index in range(1, len(prompts) + 1):
        if index == len(prompts) or prompts[index] != prompts[start]:
            step = max_batch_size or index - start
            runs += [slice(s, min(s + step, index)) for s in range(start, index, step)]
            start = index
    return runs


class GlmImageDecoder:
    """GLM-Image's DiT decoder behind the `Decoder` protocol: codes [n, L] -> uint8 RGB [n, 32h, 32w, 3].

    - `path`: the GLM-Image folder (zai-org/GLM-Image downloaded): `transformer/`, `vae/`, `text_encoder/`,
      `tokenizer/`, `scheduler/` are read; the AR model and its processor are not loaded.
    - `num_inference_steps`, `guidance_scale`: the DiT's Euler steps and CFG scale (the pipeline's defaults, 50 and
      1.5; GLM-Image's README example uses 30 steps).
    - `max_batch_size`: rollouts per pipeline call (each runs the DiT twice a step, conditional and unconditional);
      None: a whole group per call. The images do not depend on it beyond floating-point rounding.
    - `dtype`, `device`: default bfloat16 on CUDA, float32 on the CPU.
    Call with `prompts=` (the generation prompt of each rollout): the glyph encoder reads its quoted text.
    """

    def __init__(
        self,
        path: str,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.5,
        max_batch_size: int | None = None,
        dtype: str | None = None,
        device: str | None = None,
    ) -> None:
        from diffusers import GlmImagePipeline

        if not (Path(path) / "model_index.json").is_file() or not (Path(path) / "transformer").is_dir():
            raise FileNotFoundError(
                f"GlmImageDecoder: {path} is not a GLM-Image folder (it needs model_index.json and transformer/)"
            )
        if num_inference_steps < 1 or guidance_scale <= 0:
            raise ValueError("GlmImageDecoder: need num_inference_steps >= 1 and guidance_scale > 0")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"GlmImageDecoder: max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        name = str(dtype or ("bfloat16" if self.device.type == "cuda" else "float32")).removeprefix("torch.")
        self.dtype = getattr(torch, name, None)
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"GlmImageDecoder: dtype {dtype!r} is not a torch dtype (e.g. 'bfloat16', 'float32')")
        self.num_inference_steps, self.guidance_scale = int(num_inference_steps), float(guidance_scale)
        self.max_batch_size = max_batch_size
        self._use(GlmImagePipeline.from_pretrained(path, vision_language_encoder=None, processor=None, dtype=self.dtype))

    @classmethod
    def from_pipeline(cls, pipe, num_inference_steps: int = 50, guidance_scale: float = 1.5,
                      max_batch_size: int | None = None, device: str | None = None) -> GlmImageDecoder:
        """A decoder around a pipeline already in memory (a tiny one built from configs), in the pipeline's dtype."""
        decoder = cls.__new__(cls)
        decoder.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        decoder.dtype = pipe.dtype
        decoder.num_inference_steps, decoder.guidance_scale = int(num_inference_steps), float(guidance_scale)
        decoder.max_batch_size = max_batch_size
        decoder._use(pipe)
        return decoder

    def _use(self, pipe) -> None:
        self.pipe = pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        # pixels per large-grid code side: 2 x 2 prior codes, each one DiT patch of patch_size latents
        self.code_px = 2 * self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size

    def __call__(
        self, codes: np.ndarray, grid: tuple[int, int], seeds: np.ndarray, *, prompts: Sequence[str] | None = None
    ) -> np.ndarray:
        """codes int64 [n, L] (preview then large grid), seeds int64 [n], n prompts -> uint8 [n, H, W, 3]."""
        h, w = int(grid[0]), int(grid[1])
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)  # [n, L]
        seeds = np.asarray(seeds)
        n = codes.shape[0]
        if codes.ndim != 2 or codes.shape[1] < h * w:
            raise ValueError(
                f"GlmImageDecoder: codes must be [n, L] with L >= {h * w} (grid {h}x{w}), got {tuple(codes.shape)}"
            )
        if seeds.shape != (n,) or prompts is None or len(prompts) != n:
            raise ValueError(f"GlmImageDecoder: pass one seed and one prompt (prompts=) per rollout ({n})")
        large = codes[:, codes.shape[1] - h * w :]  # [n, h*w]: the large grid, after the preview
        prompts = list(prompts)
        runs = prompt_runs(prompts, self.max_batch_size)
        images = [self.decode(large[run], grid, seeds[run], prompts[run.start]) for run in runs]  # uint8 [m, H, W, 3]
        if not images:
            return np.zeros((0, h * self.code_px, w * self.code_px, 3), dtype=np.uint8)
        return np.concatenate(images)  # uint8 [n, H, W, 3]

    @torch.no_grad()
    def decode(self, large: torch.Tensor, grid: tuple[int, int], seeds: Sequence[int], prompt: str) -> np.ndarray:
        """One pipeline call for m rollouts of one prompt: large codes [m, h*w], m seeds -> uint8 [m, H, W, 3]."""
        h, w = grid
        m = large.shape[0]
        images = self.pipe(
            prompt=[prompt] * m,
            prior_token_ids=upsample_codes(large, grid).to(self.device),  # [m, 4*h*w]
            height=h * self.code_px,
            width=w * self.code_px,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
            output_type="np",
        ).images  # float [m, H, W, 3] in [0, 1]
        return (images * 255).round().astype(np.uint8)

    def flow(self):
        """This decoder as decoder GRPO trains it: the `FlowDecoder` of grpo_image/decoders/glm_image_flow.py."""
        from grpo_image.decoders.glm_image_flow import GlmImageFlow

        return GlmImageFlow(self)
