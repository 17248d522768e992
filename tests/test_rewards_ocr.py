"""The OCR reward for real: text rendered with system fonts, read by rapidocr's shipped PP-OCR models (offline).

English (DejaVu Sans) and Chinese (WenQuanYi Micro Hei) strings, clean and with clutter (outlines and lines in
other colours), rotation and blur. The expected scores are derived from the formulas and from what the engine
read, which the tests pin so that a change in the engine shows up as what it is.
"""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from rewards._text import edit_reward
from rewards.ocr import OCR

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
WQY = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
BACKGROUND = (245, 240, 230)


@pytest.fixture(scope="module", autouse=True)
def fonts() -> None:
    """Fail, not skip, without the fonts: a skipped real-OCR test would hide a missing install step."""
    missing = [font for font in (DEJAVU, WQY) if not Path(font).exists()]
    if missing:
        pytest.fail(f"missing {missing}: the test setup must `apt-get install fonts-dejavu-core fonts-wqy-microhei`")


def render(text: str, font: str, clutter: bool = False, angle: float = 0.0, blur: float = 0.0) -> np.ndarray:
    """`text` centred on a 256x96 canvas -> uint8 [96, 256, 3]; clutter/rotation/blur make it harder to read."""
    rng = np.random.default_rng(0)
    image = Image.new("RGB", (256, 96), BACKGROUND)
    draw = ImageDraw.Draw(image)
    if clutter:
        for _ in range(12):
            x, y = rng.integers(0, 256), rng.integers(0, 96)
            colour = tuple(int(c) for c in rng.integers(120, 230, 3))
            draw.ellipse([x, y, x + rng.integers(5, 30), y + rng.integers(5, 30)], outline=colour, width=2)
            draw.line([tuple(rng.integers(0, 256, 2)), tuple(rng.integers(0, 96, 2))], fill=colour, width=1)
    face = ImageFont.truetype(font, 28)
    draw.text(((256 - draw.textlength(text, font=face)) / 2, 30), text, fill=(20, 20, 60), font=face)
    if angle:
        image = image.rotate(angle, resample=Image.BICUBIC, fillcolor=BACKGROUND)
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(image)


HARD = dict(clutter=True, angle=6.0, blur=1.0)


@pytest.fixture(scope="module")
def ocr() -> OCR:
    return OCR()  # rapidocr, edit metric


@pytest.fixture(scope="module")
def ocr_accuracy() -> OCR:
    return OCR(metric="accuracy")


@pytest.fixture(scope="module")
def english() -> np.ndarray:
    return np.stack(
        [
            render("Hello World", DEJAVU),
            render("Helo World", DEJAVU),  # a misspelling of the target
            render("Banana Split", DEJAVU),  # unrelated to the target
            render("Hello World", DEJAVU, **HARD),
            render("GRPO Image 2025", DEJAVU, clutter=True, angle=-8.0, blur=1.2),
        ]
    )  # uint8 [5, 96, 256, 3]


def test_english_edit_reward(ocr, english):
    read = ocr.read(english)
    assert read[1] == "Helo World"  # what the engine sees; the expected score below follows from it
    prompts = ['a shop sign that says "Hello World"'] * 4 + ['a banner reading "GRPO Image 2025"']
    scores = ocr(english, prompts, [{}] * 5).scores
    assert scores.dtype == np.float32 and scores.shape == (5,)
    assert scores[0] == 1.0  # exact text
    # "heloworld" vs "helloworld": 1 edit of 10 letters.
    assert scores[1] == pytest.approx(0.9, abs=1e-6)  # float32 score of an exact ratio: off by at most half a float32 ULP (6e-8 relative)
    assert scores[1] == pytest.approx(edit_reward(read[1], "Hello World"), abs=1e-6)  # the same, float64 vs 32
    # "bananasplit" vs "helloworld": levenshtein 10, capped at 10 letters -> 0.
    assert scores[2] == pytest.approx(0.0, abs=1e-6)  # 1 - 10 / 10 = 0 exactly; the bound as above
    assert scores[3] == 1.0 and scores[4] == 1.0  # clutter, rotation and blur: still read exactly


def test_english_accuracy_metric_and_list_target(ocr_accuracy, english):
    meta = [{"text": "Hello World"}, {"text": "Hello World"}, {"text": "Hello World"}, {}, {"text": ["GRPO", "2025"]}]
    scores = ocr_accuracy(english, ["x", "x", "x", "no quotes here", "x"], meta).scores
    # Words: {hello, world}. "Helo World" matches world only: 1/2. "Banana Split": 0/2. The list target
    # {grpo, 2025} is all in "GRPO Image 2025": 2/2. Sample 3 has neither metadata nor quotes: NaN.
    np.testing.assert_allclose(scores[[0, 1, 2, 4]], [1.0, 0.5, 0.0, 1.0], atol=1e-6)  # halves: exact in float32
    assert np.isnan(scores[3])


def test_chinese(ocr, ocr_accuracy):
    images = np.stack(
        [
            render("你好世界", WQY),
            render("你好中国", WQY),  # two of four characters differ from the target
            render("欢迎光临", WQY, **HARD),
            render("你好，世界", WQY),  # full-width comma in the image
        ]
    )  # uint8 [4, 96, 256, 3]
    read = ocr.read(images)
    assert read[1] == "你好中国" and read[3] == "你好，世界"
    meta = [{"text": "你好世界"}, {"text": "你好世界"}, {"text": "欢迎光临"}, {"text": "你好,世界"}]
    edit = ocr(images, ["x"] * 4, meta).scores
    # 你好中国 vs 你好世界: 2 substitutions of 4 characters -> 0.5; the commas agree after NFKC -> 1.
    np.testing.assert_allclose(edit, [1.0, 0.5, 1.0, 1.0], atol=1e-6)  # halves: exact in float32
    accuracy = ocr_accuracy(images, ["x"] * 4, meta).scores
    np.testing.assert_allclose(accuracy, [1.0, 0.5, 1.0, 1.0], atol=1e-6)  # 你, 好 of 4 -> 0.5: exact in float32
    # Targets from Chinese quotation marks in the prompt.
    quoted = ocr(images[:1], ["一张写着“你好世界”的海报"], [{}]).scores
    assert quoted.tolist() == [1.0]


def test_no_target_is_nan_and_blank_image_scores_zero(ocr):
    blank = np.full((2, 96, 256, 3), 255, dtype=np.uint8)
    scores = ocr(blank, ["a quiet lake", 'a sign "OPEN"'], [{}, {}]).scores
    assert np.isnan(scores[0])  # nothing to read for: not applicable
    assert scores[1] == 0.0  # text expected, none found: 1 - 4/4


def test_bad_metadata_names_the_sample(ocr):
    with pytest.raises(ValueError, match=r"sample 1: metadata\['text'\]"):
        ocr(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"], [{}, {"text": 3}])


def test_ocr_pickle_round_trip(ocr, english):
    clone = pickle.loads(pickle.dumps(ocr))
    prompts = ['"Hello World"'] * 2
    np.testing.assert_array_equal(clone(english[:2], prompts, [{}, {}]).scores, ocr(english[:2], prompts, [{}, {}]).scores)


def test_a_prompt_with_several_spans_is_scored_on_its_first_by_default(ocr, english):
    # flow_grpo reads `prompt.split('"')[1]`: the image of "Hello World" satisfies the first span in full.
    prompt = ['a sign "Hello World" over a door marked "EXIT"']
    assert ocr(english[:1], prompt, [{}]).scores.tolist() == [1.0]
    every = OCR(target="all_spans")(english[:1], prompt, [{}]).scores
    # all spans joined: "helloworldexit" (14) against the read "helloworld": 4 deletions, 1 - 4/14
    assert every[0] == pytest.approx(1 - 4 / 14, abs=1e-7)  # float32 of a float64 division
    assert repr(ocr).endswith("target='first_span')")


def test_ocr_rejects_unknown_engine_metric_and_options():
    with pytest.raises(ValueError, match="unknown engine"):
        OCR(engine="tesseract")
    with pytest.raises(ValueError, match="unknown metric"):
        OCR(metric="bleu")
    with pytest.raises(TypeError, match="engine_options for engine 'rapidocr'"):
        OCR(engine_options={"languages": ["en"]})
    with pytest.raises(ValueError, match="target"):
        OCR(target="last_span")


def test_easyocr_engine_loads_from_a_local_folder_without_download(monkeypatch, tmp_path):
    """easyocr is an optional extra; a stand-in module checks how the engine is built and read."""
    calls = {}

    class Reader:
        def __init__(self, langs, **kwargs):
            calls.update(langs=langs, **kwargs)

        def readtext(self, image):
            calls["shape"] = image.shape
            return [([[0, 0]] * 4, "Hello", 0.9), ([[0, 0]] * 4, "World", 0.95), ([[0, 0]] * 4, "noise", 0.1)]

    monkeypatch.setitem(sys.modules, "easyocr", types.SimpleNamespace(Reader=Reader))
    ocr = OCR(engine="easyocr", engine_options={"model_dir": str(tmp_path), "gpu": False, "min_confidence": 0.5})
    scores = ocr(np.zeros((1, 20, 30, 3), np.uint8), ['"Hello World"'], [{}]).scores
    assert scores.tolist() == [1.0]  # "noise" (confidence 0.1) is dropped: "Hello World"
    assert calls["model_storage_directory"] == str(tmp_path) and calls["download_enabled"] is False
    assert calls["langs"] == ["ch_sim", "en"] and calls["gpu"] is False and calls["shape"] == (20, 30, 3)
