"""JPEG compressibility: a cheap, model-free proxy for image simplicity.

DDPO (ddpo_pytorch/rewards.py) and flow_grpo (flow_grpo/rewards.py) score an image by the size of its JPEG at quality
95, in kilobytes (bytes / 1000), negated: `scale: kilobytes`, the default, gives exactly that (flow_grpo also
divides by 500, which is a weight: put 1/500 in the recipe's weight). The quality changes the ranking, not only the
scale: at 95 fine texture costs bytes that quality 75 quantises away. `scale: fraction` gives
clip(1 - jpeg_bytes / raw_bytes, 0, 1) with raw_bytes = H * W * 3, a per-pixel score in [0, 1] that does not depend
on the image size. Flat, smooth images score highest; noise lowest. Used (as in DDPO) as a sanity reward with a
known optimum and to ablate against learned rewards; it needs no weights, so it runs on any machine.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._image import as_uint8_images, to_pil

SCALES = ("kilobytes", "fraction")


class JPEGCompressibility:
    """-(JPEG kilobytes at `quality`) by default, or 1 - JPEG bytes / raw RGB bytes in [0, 1]; higher = simpler."""

    @staticmethod
    def gpu_parameters(**_: Any) -> int:
        """Nothing on the worker's GPU (it computes on the CPU)."""
        return 0

    def __init__(self, quality: int = 95, scale: str = "kilobytes") -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEGCompressibility: quality must be in 1..100, got {quality}")
        if scale not in SCALES:
            raise ValueError(f"JPEGCompressibility: scale must be one of {SCALES}, got {scale!r}")
        self.quality = int(quality)
        self.scale = scale

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        images = as_uint8_images(images)  # uint8 [n, H, W, 3]
        n, height, width, _ = images.shape
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(
                f"JPEGCompressibility: {n} images but {len(prompts)} prompts "
                f"and {len(metadata)} metadata entries"
            )
        jpeg_bytes = np.array([self._jpeg_size(im) for im in to_pil(images)], dtype=np.float64)  # [n]
        if self.scale == "kilobytes":
            scores = -jpeg_bytes / 1000  # float64 [n]
        else:
            scores = np.clip(1.0 - jpeg_bytes / (height * width * 3), 0.0, 1.0)  # float64 [n]
        return RewardOutput(scores=scores.astype(np.float32))

    def _jpeg_size(self, image: Any) -> int:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=self.quality)
        return buffer.tell()
