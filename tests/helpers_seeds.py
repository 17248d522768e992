"""A palette decoder that also writes down the seeds each call decodes with, to check what the trainer passes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from grpo_image.decoders.palette import PaletteDecoder


class SeedRecordingDecoder(PaletteDecoder):
    """PaletteDecoder's images; each call's seeds appended to `log` as one JSON line."""

    def __init__(self, log: str, patch_size: int = 8) -> None:
        super().__init__(patch_size=patch_size)
        self.log = Path(log)

    def __call__(self, codes: np.ndarray, grid: tuple[int, int], seeds: np.ndarray) -> np.ndarray:
        with self.log.open("a") as handle:
            handle.write(json.dumps([int(s) for s in seeds]) + "\n")
        return super().__call__(codes, grid, seeds)
