"""JPEG compressibility: a cheap, model-free proxy for image simplicity.

Score = clip(1 - jpeg_bytes / raw_bytes, 0, 1), with raw_bytes = H * W * 3 and jpeg_bytes the size of the
image encoded by Pillow at `quality`. Flat, smooth images compress well and score near 1; noise scores
near 0. Used (as in DDPO) as a sanity reward with a known optimum and to ablate against learned rewards;
it needs no weights, so it runs on any machine.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._image import as_uint8_images, to_pil


class JPEGCompressibility:
    """1 - (JPEG size at `quality`) / (raw RGB size), clipped to [0, 1]; higher = more compressible."""

    @staticmethod
    def gpu_parameters(**_: Any) -> int:
        """Nothing on the worker's GPU (it computes on the CPU)."""
        return 0

    def __init__(self, quality: int = 75) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEGCompressibility: quality must be in 1..100, got {quality}")
        self.quality = int(quality)

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
        raw_bytes = height * width * 3
        scores = np.clip(1.0 - jpeg_bytes / raw_bytes, 0.0, 1.0)  # float64 [n]
        return RewardOutput(scores=scores.astype(np.float32))

    def _jpeg_size(self, image: Any) -> int:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=self.quality)
        return buffer.tell()
