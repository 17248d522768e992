"""Colour adherence: how much of the image is the colour the prompt asked for.

The tiny CPU demo's reward. Its prompt set names a colour in `metadata["color"]`; the score is the fraction
of pixels within `tolerance` (Euclidean distance in RGB, 0..441) of that colour. It is dense (every pixel
counts, so partial progress is rewarded), exact on the palette decoder's flat patches, and cheap enough
to run in the trainer's own process.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._image import as_uint8_images, parse_rgb


class ColorAdherence:
    """Fraction of pixels within `tolerance` of the target colour `metadata[metadata_key]`; range [0, 1].

    The target is "#RRGGBB" or [r, g, b]. A sample whose metadata lacks the key scores NaN (not
    applicable); a present but malformed colour is an error naming the sample.
    """

    @staticmethod
    def gpu_parameters(**_: Any) -> int:
        """Nothing on the worker's GPU (it computes on the CPU)."""
        return 0

    def __init__(self, tolerance: float = 60.0, metadata_key: str = "color") -> None:
        if not tolerance >= 0:
            raise ValueError(f"ColorAdherence: tolerance must be >= 0, got {tolerance}")
        self.tolerance = float(tolerance)
        self.metadata_key = metadata_key

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        images = as_uint8_images(images)  # uint8 [n, H, W, 3]
        n = len(images)
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(
                f"ColorAdherence: {n} images but {len(prompts)} prompts "
                f"and {len(metadata)} metadata entries"
            )
        rows = [i for i, meta in enumerate(metadata) if self.metadata_key in meta]
        rgb = [self._target(i, metadata[i]) for i in rows]  # n' applicable samples
        targets = np.array(rgb, dtype=np.int32).reshape(-1, 3)  # int32 [n', 3]
        diff = images[rows].astype(np.int32) - targets[:, None, None, :]  # int32 [n', H, W, 3]
        dist2 = np.einsum("nhwc,nhwc->nhw", diff, diff)  # int32 [n', H, W], squared distance, exact
        scores = np.full(n, np.nan, dtype=np.float32)  # float32 [n]
        scores[rows] = (dist2 <= self.tolerance**2).mean(axis=(1, 2))  # [n'], fraction of pixels in range
        return RewardOutput(scores=scores)

    @staticmethod
    def missing_inputs(prompt: str, metadata: dict[str, Any], tolerance: float = 60.0, metadata_key: str = "color") -> str | None:
        """Why a prompt cannot be scored (checked before training when the reward is required), or None."""
        if metadata_key not in metadata:
            return f"its metadata has no {metadata_key!r}"
        try:
            parse_rgb(metadata[metadata_key])
        except ValueError as err:
            return f"metadata[{metadata_key!r}]: {err}"
        return None

    def _target(self, index: int, meta: dict[str, Any]) -> tuple[int, int, int]:
        try:
            return parse_rgb(meta[self.metadata_key])
        except ValueError as err:
            raise ValueError(
                f"ColorAdherence: sample {index}: metadata[{self.metadata_key!r}]: {err}"
            ) from err
