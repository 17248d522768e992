"""A deterministic codebook decoder for CPU runs and tests.

Each image code is a patch_size x patch_size patch of one flat colour, so a tiny policy's output is readable
at a glance and a colour reward can score it exactly. It honours the shared decoder contract (grid, per-sample
seeds) so the trainer and reward workers treat it like any real VQ or diffusion decoder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# The 16 standard HTML colours, in the order of the HTML 4 spec; the tiny demo's codebook.
WEB_COLORS: tuple[str, ...] = (
    "#000000",  # black
    "#C0C0C0",  # silver
    "#808080",  # gray
    "#FFFFFF",  # white
    "#800000",  # maroon
    "#FF0000",  # red
    "#800080",  # purple
    "#FF00FF",  # fuchsia
    "#008000",  # green
    "#00FF00",  # lime
    "#808000",  # olive
    "#FFFF00",  # yellow
    "#000080",  # navy
    "#0000FF",  # blue
    "#008080",  # teal
    "#00FFFF",  # aqua
)

_HEX = re.compile(r"#[0-9A-Fa-f]{6}")


class PaletteDecoder:
    """Codes -> flat-colour patches: code v on grid cell (i, j) paints pixels [i*p:(i+1)*p, j*p:(j+1)*p]."""

    def __init__(self, patch_size: int = 8, colors: Sequence[str] | None = None) -> None:
        if patch_size < 1:
            raise ValueError(f"PaletteDecoder: patch_size must be >= 1, got {patch_size}")
        colors = WEB_COLORS if colors is None else list(colors)
        if not colors:
            raise ValueError("PaletteDecoder: colors must name at least one '#RRGGBB' colour")
        bad = [c for c in colors if not isinstance(c, str) or not _HEX.fullmatch(c)]
        if bad:
            raise ValueError(f"PaletteDecoder: colors must be '#RRGGBB' strings, got {bad}")
        self.patch_size = patch_size
        self.palette = np.array(
            [[int(c[k : k + 2], 16) for k in (1, 3, 5)] for c in colors], dtype=np.uint8
        )  # uint8 [V, 3]

    @property
    def num_codes(self) -> int:
        """V, the codebook size: valid codes are 0 .. V-1."""
        return len(self.palette)

    def __call__(self, codes: np.ndarray, grid: tuple[int, int], seeds: np.ndarray) -> np.ndarray:
        """codes int [n, L] (row-major h x w grid), seeds int64 [n] -> uint8 RGB [n, h*p, w*p, 3]."""
        h, w = grid
        codes = np.asarray(codes)  # int [n, L]
        seeds = np.asarray(seeds)  # int64 [n]
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(
                f"PaletteDecoder: codes must be an integer array [n, L], got {codes.dtype} {codes.shape}"
            )
        n, length = codes.shape
        if h < 1 or w < 1 or length != h * w:
            raise ValueError(
                f"PaletteDecoder: codes have L={length} per image but grid {h}x{w} needs L={h * w}"
            )
        if seeds.shape != (n,):
            raise ValueError(f"PaletteDecoder: seeds must have shape [n]=({n},), got {seeds.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(
                f"PaletteDecoder: codes must be in [0, {self.num_codes}), "
                f"got range [{codes.min()}, {codes.max()}]"
            )
        p = self.patch_size
        cells = self.palette[codes].reshape(n, h, 1, w, 1, 3)  # uint8 [n, h, 1, w, 1, 3]
        patches = np.empty((n, h, p, w, p, 3), dtype=np.uint8)  # uint8 [n, h, p, w, p, 3]
        patches[...] = cells  # broadcast each cell's colour over its p x p patch
        return patches.reshape(n, h * p, w * p, 3)  # uint8 [n, H, W, 3], a view of the contiguous buffer
