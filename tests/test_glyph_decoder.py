"""The glyph decoder: real fonts read back by a real OCR engine (rapidocr, offline), exact geometry, seeded variation.

The decoders under test are the text demo's own (built from recipes/tiny_text_en.yaml and tiny_text_zh.yaml), so a
change to a recipe's glyphs, font or cells that OCR can no longer read fails here before it fails a training run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from grpo_image.base.config import instantiate, load_recipe
from grpo_image.decoders.glyph import GlyphDecoder
from rewards.ocr import OCR

REPO = Path(__file__).resolve().parents[1]
WQY = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
STILL = dict(jitter=0, stroke_widths=[0], blur=[0.0, 0.0])  # every per-rollout variation off


def recipe_decoder(name: str) -> GlyphDecoder:
    return instantiate(load_recipe(REPO / "recipes" / name).decoder)


@pytest.fixture(scope="module")
def ocr() -> OCR:
    return OCR(engine_options={"threads": 1})


@pytest.fixture(scope="module")
def english() -> GlyphDecoder:
    return recipe_decoder("tiny_text_en.yaml")


@pytest.fixture(scope="module")
def chinese() -> GlyphDecoder:
    if not Path(WQY).exists():  # fail, not skip: a skipped real-OCR test would hide a missing install step
        pytest.fail(f"missing {WQY}: install it with `make fonts` (apt fonts-wqy-microhei)")
    return recipe_decoder("tiny_text_zh.yaml")


def test_ocr_reads_english_lines_back_as_their_text(ocr, english):
    words = ["moon", "star", "rain", "tree", "lion", "salt", "mint", "iron", "mi t", "  on"]  # blanks leave gaps
    codes = np.array([english.codes_for(word) for word in words])  # int64 [10, 4]
    images = english(codes, (1, 4), seeds=np.arange(10, dtype=np.int64))  # uint8 [10, 56, 112, 3]
    assert images.shape == (10, 56, 112, 3) and images.dtype == np.uint8  # 4 * 24 + 2 * 8 wide, 40 + 2 * 8 tall
    read = ["".join(text.split()) for text in ocr.read(images)]  # the edit metric ignores spaces too
    assert read == ["moon", "star", "rain", "tree", "lion", "salt", "mint", "iron", "mit", "on"]
    assert english.text(codes[8], (1, 4)) == ["mi t"]


def test_ocr_reads_two_lines_in_reading_order(ocr, english):
    codes = np.array([english.codes_for("moonstar")])  # grid row 0 = "moon", row 1 = "star"
    image = english(codes, (2, 4), seeds=np.array([7]))  # uint8 [1, 96, 112, 3]: 2 * 40 + 16 rows
    assert image.shape == (1, 96, 112, 3)
    (read,) = ocr.read(image)
    assert " " in read and "".join(read.split()) == "moonstar"  # a text box per line, top to bottom, space-joined


def test_ocr_reads_chinese_words_back(ocr, chinese):
    words = ["山水", "人口", "大小", "上下", "天下", "大人", "小山", "中山"]
    codes = np.array([chinese.codes_for(word) for word in words])  # int64 [8, 2]
    images = chinese(codes, (1, 2), seeds=np.arange(8, dtype=np.int64) + 100)  # uint8 [8, 56, 96, 3]
    assert images.shape == (8, 56, 96, 3)
    assert ocr.read(images) == words
    scores = ocr(images, words, [{"text": word} for word in words]).scores
    assert scores.tolist() == [1.0] * 8


def test_same_seed_same_image_and_seeds_vary_the_rendering(english):
    codes = np.array([english.codes_for("moon")] * 3)  # the same line three times
    images = english(codes, (1, 4), seeds=np.array([5, 5, 6]))
    again = english(codes[:1], (1, 4), seeds=np.array([5]))
    np.testing.assert_array_equal(images[0], images[1])  # the image is a function of (codes, seed)
    np.testing.assert_array_equal(images[0], again[0])  # and not of the batch it is decoded in
    assert not np.array_equal(images[0], images[2])  # another seed: other jitter, stroke or blur


def test_without_variation_every_seed_gives_the_same_image():
    decoder = GlyphDecoder(" ab", **STILL)
    codes = np.array([[1, 2, 0]] * 2)
    images = decoder(codes, (1, 3), seeds=np.array([0, 12345]))
    np.testing.assert_array_equal(images[0], images[1])


def test_blank_cells_are_paper_and_glyphs_stay_in_their_cells():
    paper = (250, 248, 240)
    decoder = GlyphDecoder(" o", cell=(24, 40), margin=8, paper=paper, **STILL)
    images = decoder(np.array([[0, 0, 0], [0, 1, 0]]), (1, 3), seeds=np.array([0, 0]))  # uint8 [2, 56, 88, 3]
    assert (images[0] == paper).all()  # all blank: not one pixel of ink
    ink = (images[1] != paper).any(-1)  # bool [56, 88]
    columns = np.flatnonzero(ink.any(0))
    # The 'o' (18 px wide at 30 px) sits in cell 1, pixels 8 + 24 = 32 .. 55 (no jitter, blur or stroke): its ink
    # stays inside.
    assert columns.min() >= 32 and columns.max() <= 55 and columns.size > 10


def test_geometry_follows_cells_margin_and_grid():
    decoder = GlyphDecoder("ab", cell=(10, 20), margin=3, **STILL)
    images = decoder(np.zeros((2, 6), np.int64), (2, 3), seeds=np.array([0, 1]))
    assert images.shape == (2, 2 * 20 + 6, 3 * 10 + 6, 3)  # H = h * cell_h + 2 * margin, W = w * cell_w + 2 * margin
    assert decoder.num_codes == 2


def test_font_family_resolves_through_matplotlib():
    from matplotlib import font_manager

    assert GlyphDecoder("a").font_path == font_manager.findfont("DejaVu Sans", fallback_to_default=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(glyphs="ab山"), "has no glyph for '山'"),  # DejaVu Sans has no CJK characters
    (dict(glyphs="aba"), "repeat a character"),
    (dict(glyphs=["ab"]), "one character each"),
    (dict(glyphs="ab", font="No Such Font Family"), "neither a file nor a known font family"),
    (dict(glyphs="ab", blur=[0.5, 0.1]), "blur must be"),
])
def test_bad_settings_fail_with_the_reason(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        GlyphDecoder(**kwargs)


def test_bad_codes_fail_naming_the_problem():
    decoder = GlyphDecoder("ab")
    with pytest.raises(ValueError, match=r"codes must be in \[0, 2\)"):
        decoder(np.array([[0, 2]]), (1, 2), seeds=np.array([0]))
    with pytest.raises(ValueError, match="grid 1x3 needs L=3"):
        decoder(np.array([[0, 1]]), (1, 3), seeds=np.array([0]))
    with pytest.raises(ValueError, match=r"seeds must have shape \[n\]"):
        decoder(np.array([[0, 1]]), (1, 2), seeds=np.array([0, 1]))
    with pytest.raises(ValueError, match="no glyph for 'z'"):
        decoder.codes_for("abz")
