"""Sample grids: rollouts upscaled and captioned with their prompt and every reward's score, for people to judge.

A caption line with CJK characters is drawn in an installed CJK font (Pillow's default font has none, and a Chinese
prompt would show as boxes).
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_CELL_PX = 128  # images are upscaled (integer factor, nearest) to at least this on their longer side
PAD = 4  # px of white around each image inside its grid cell
FONT_SIZE = 13
LINE_HEIGHT = FONT_SIZE + 4  # ascent 13 + descent 3 of Pillow's default font at size 13, plus 1 px
MAX_WRAPPED_LINES = 3  # per caption line, so that a long prompt cannot push the reward scores out
CJK = re.compile("[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")  # CJK, kana, hangul, full-width
CJK_FAMILIES = ("WenQuanYi Micro Hei", "Noto Sans CJK SC", "Source Han Sans SC")  # tried in order for such lines


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


@lru_cache(maxsize=1)
def _cjk_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """An installed font with CJK glyphs (Pillow's default has none: a Chinese prompt would show as boxes), else
    the default font."""
    from matplotlib import font_manager

    for family in CJK_FAMILIES:
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        except ValueError:
            continue
        return ImageFont.truetype(path, FONT_SIZE)
    return _font()


def _caption_font(line: str) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return _cjk_font() if CJK.search(line) else _font()


def _wrap(line: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` px, breaking over-long words; at most MAX_WRAPPED_LINES, '...' if cut."""
    out: list[str] = []
    for word in line.split():
        while font.getlength(word) > width and len(word) > 1:  # break a word wider than the cell
            cut = max([1] + [i for i in range(2, len(word)) if font.getlength(word[:i]) <= width])
            out.append(word[:cut])
            word = word[cut:]
        if out and font.getlength(f"{out[-1]} {word}") <= width:
            out[-1] = f"{out[-1]} {word}"
        else:
            out.append(word)
    if len(out) > MAX_WRAPPED_LINES:
        out = out[:MAX_WRAPPED_LINES]
        while out[-1] and font.getlength(out[-1] + "...") > width:
            out[-1] = out[-1][:-1]
        out[-1] += "..."
    return out or [""]


def make_grid(images: np.ndarray, captions: list[str], columns: int = 8) -> Image.Image:
    """A white grid of images, each upscaled and captioned beneath, for humans to judge samples.

    Geometry (exact, tests rely on it): s = max(1, ceil(MIN_CELL_PX / max(H, W))); a cell is
    (W*s + 2*PAD) wide and (H*s + 2*PAD + n*LINE_HEIGHT) tall, where n is the most wrapped caption lines of
    any image; image i sits at column i % c, row i // c with c = min(columns, T), its top-left corner PAD
    px inside its cell; caption lines start right below the image's bottom padding.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [T, H, W, 3], got {images.dtype} {images.shape}")
    if len(captions) != len(images):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if len(images) == 0 or columns < 1:
        raise ValueError(f"need at least one image and one column, got {len(images)} images, {columns} columns")
    t, h, w, _ = images.shape
    scale = max(1, math.ceil(MIN_CELL_PX / max(h, w)))
    wrapped = [[(part, _caption_font(line)) for line in caption.split("\n") for part in
                _wrap(line, _caption_font(line), w * scale)] for caption in captions]  # (text, font) per drawn line
    n_lines = max(len(lines) for lines in wrapped)
    cell_w, cell_h = w * scale + 2 * PAD, h * scale + 2 * PAD + n_lines * LINE_HEIGHT
    cols = min(columns, t)
    grid = Image.new("RGB", (cols * cell_w, math.ceil(t / cols) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, wrapped)):  # image: uint8 [H, W, 3]
        x0, y0 = (i % cols) * cell_w, (i // cols) * cell_h
        upscaled = image.repeat(scale, axis=0).repeat(scale, axis=1)  # uint8 [H*s, W*s, 3]
        grid.paste(Image.fromarray(upscaled), (x0 + PAD, y0 + PAD))
        for j, (line, font) in enumerate(lines):
            draw.text((x0 + PAD, y0 + h * scale + 2 * PAD + j * LINE_HEIGHT), line, fill="black", font=font)
    return grid
