"""A text-rendering decoder for CPU runs: each image code is one glyph of a real font.

The tiny colour demo is scored by a formula; a text-rendering demo should be scored by an OCR engine nobody here
wrote. This decoder lays codes out on the grid as lines of text (grid row i is line i, code j of the row its j-th
character cell) in a real TrueType font, so that a policy that "renders text" has to emit the right glyph codes in
the right order, and the OCR reward reads the result as it would read any picture of text.

Each rollout gets its own seeded variation, so that reading it stays a real OCR task and the reward cannot be a
lookup of one fixed bitmap per code: every glyph is shifted by up to `jitter` px, each image draws its stroke weight
from `stroke_widths` and a Gaussian blur radius from `blur`. The same (codes, seed) always gives the same image
(the decoder contract: images are reproducible from the rollout's decode seed).

A glyph that is a space is a blank cell: it lets a policy leave cells empty, so one grid fits words of several
lengths. The font is a file path or a family name that matplotlib's font manager resolves (it ships DejaVu Sans);
every glyph must be in the font, or construction fails naming the missing characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

BLANK = " "


def find_font(font: str) -> str:
    """A font file: `font` itself when it is a file, else the file matplotlib resolves for that family name."""
    if Path(font).is_file():
        return str(font)
    from matplotlib import font_manager

    try:
        return font_manager.findfont(font_manager.FontProperties(family=font), fallback_to_default=False)
    except ValueError as err:
        raise FileNotFoundError(f"GlyphDecoder: font {font!r} is neither a file nor a known font family") from err


def missing_glyphs(font_path: str, glyphs: Sequence[str]) -> list[str]:
    """Characters of `glyphs` that the font's character map lacks (a .ttc collection: its first font)."""
    from fontTools.ttLib import TTFont

    with TTFont(font_path, fontNumber=0, lazy=True) as face:
        cmap = face.getBestCmap()
    return [g for g in glyphs if g != BLANK and ord(g) not in cmap]


class GlyphDecoder:
    """Codes -> lines of glyphs: code v on grid cell (i, j) draws character `glyphs[v]` in cell (i, j).

    Geometry: a cell is `cell[0]` px wide and `cell[1]` px tall; the image has `margin` px of paper on every side,
    so a grid (h, w) gives images of H = h * cell[1] + 2 * margin rows and W = w * cell[0] + 2 * margin columns.
    Each glyph is centred in its cell (horizontally on its advance width, vertically on the font's line box).
    """

    def __init__(
        self,
        glyphs: str | Sequence[str],
        font: str = "DejaVu Sans",
        font_size: int = 30,
        cell: Sequence[int] = (24, 40),
        margin: int = 8,
        jitter: int = 2,
        stroke_widths: Sequence[int] = (0, 1),
        blur: Sequence[float] = (0.0, 0.6),
        ink: Sequence[int] = (20, 20, 30),
        paper: Sequence[int] = (250, 248, 240),
    ) -> None:
        from PIL import ImageFont

        glyphs = list(glyphs)
        if not glyphs or any(not isinstance(g, str) or len(g) != 1 for g in glyphs):
            raise ValueError(f"GlyphDecoder: glyphs must be one character each (a string or a list), got {glyphs!r}")
        if len(set(glyphs)) != len(glyphs):
            raise ValueError(f"GlyphDecoder: glyphs repeat a character: {glyphs!r}")
        if len(cell) != 2 or min(cell) < 1 or font_size < 1 or margin < 0 or jitter < 0:
            raise ValueError(
                f"GlyphDecoder: need cell [w, h] >= 1, font_size >= 1, margin >= 0 and jitter >= 0, got cell={cell}, "
                f"font_size={font_size}, margin={margin}, jitter={jitter}"
            )
        if not stroke_widths or min(stroke_widths) < 0:
            raise ValueError(f"GlyphDecoder: stroke_widths must be a non-empty list of px >= 0, got {stroke_widths}")
        if len(blur) != 2 or not 0 <= blur[0] <= blur[1]:
            raise ValueError(f"GlyphDecoder: blur must be [low, high] radii with 0 <= low <= high, got {blur}")
        self.font_path = find_font(font)
        missing = missing_glyphs(self.font_path, glyphs)
        if missing:
            raise ValueError(f"GlyphDecoder: font {self.font_path} has no glyph for {''.join(missing)!r}")
        self.glyphs = glyphs
        self.cell = (int(cell[0]), int(cell[1]))
        self.margin, self.jitter = int(margin), int(jitter)
        self.stroke_widths = [int(s) for s in stroke_widths]
        self.blur = (float(blur[0]), float(blur[1]))
        self.ink, self.paper = tuple(int(c) for c in ink), tuple(int(c) for c in paper)
        self.face = ImageFont.truetype(self.font_path, int(font_size))
        ascent, descent = self.face.getmetrics()
        self._top = (self.cell[1] - ascent - descent) / 2  # y of the line box's top inside a cell
        self._left = [(self.cell[0] - self.face.getlength(g)) / 2 for g in glyphs]  # x of each glyph inside a cell

    @property
    def num_codes(self) -> int:
        """V, the glyph set's size: valid codes are 0 .. V-1."""
        return len(self.glyphs)

    def text(self, codes: Sequence[int], grid: tuple[int, int]) -> list[str]:
        """What a grid of codes says, one string per line (blank cells kept as spaces), for logs and tests."""
        h, w = grid
        return ["".join(self.glyphs[int(c)] for c in codes[i * w : (i + 1) * w]) for i in range(h)]

    def codes_for(self, text: str) -> list[int]:
        """The codes that spell `text` (each character must be a glyph), e.g. to build a known line in tests."""
        index = {g: v for v, g in enumerate(self.glyphs)}
        unknown = sorted({ch for ch in text if ch not in index})
        if unknown:
            raise ValueError(f"GlyphDecoder: no glyph for {''.join(unknown)!r} in this glyph set")
        return [index[ch] for ch in text]

    def __call__(self, codes: np.ndarray, grid: tuple[int, int], seeds: np.ndarray) -> np.ndarray:
        """codes int [n, L] (row-major h x w grid), seeds int64 [n] -> uint8 RGB [n, H, W, 3]."""
        h, w = grid
        codes = np.asarray(codes)  # int [n, L]
        seeds = np.asarray(seeds)  # int64 [n]
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"GlyphDecoder: codes must be an integer array [n, L], got {codes.dtype} {codes.shape}")
        n, length = codes.shape
        if h < 1 or w < 1 or length != h * w:
            raise ValueError(f"GlyphDecoder: codes have L={length} per image but grid {h}x{w} needs L={h * w}")
        if seeds.shape != (n,):
            raise ValueError(f"GlyphDecoder: seeds must have shape [n]=({n},), got {seeds.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(
                f"GlyphDecoder: codes must be in [0, {self.num_codes}), got range [{codes.min()}, {codes.max()}]"
            )
        size = (w * self.cell[0] + 2 * self.margin, h * self.cell[1] + 2 * self.margin)  # (W, H)
        images = np.empty((n, size[1], size[0], 3), dtype=np.uint8)  # uint8 [n, H, W, 3]
        for i in range(n):
            images[i] = self._render(codes[i].reshape(h, w), int(seeds[i]), size)
        return images

    def _render(self, cells: np.ndarray, seed: int, size: tuple[int, int]) -> np.ndarray:
        """One image of an [h, w] grid of codes; every random draw comes from this rollout's seed."""
        from PIL import Image, ImageDraw, ImageFilter

        rng = np.random.default_rng(seed)
        h, w = cells.shape
        offsets = rng.integers(-self.jitter, self.jitter + 1, size=(h, w, 2))  # int [h, w, 2]: dx, dy per glyph
        stroke = int(rng.choice(self.stroke_widths))
        radius = float(rng.uniform(*self.blur))
        image = Image.new("RGB", size, self.paper)
        draw = ImageDraw.Draw(image)
        for i in range(h):
            for j in range(w):
                code = int(cells[i, j])
                if self.glyphs[code] == BLANK:
                    continue
                x = self.margin + j * self.cell[0] + self._left[code] + offsets[i, j, 0]
                y = self.margin + i * self.cell[1] + self._top + offsets[i, j, 1]
                draw.text((x, y), self.glyphs[code], font=self.face, fill=self.ink, stroke_width=stroke,
                          stroke_fill=self.ink)
        if radius > 0:
            image = image.filter(ImageFilter.GaussianBlur(radius))
        return np.asarray(image)
