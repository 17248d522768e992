"""The palette decoder (exact pixels), the colour and JPEG rewards (hand-derived scores), image helpers."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from grpo_image.decoders.palette import PaletteDecoder
from rewards._image import as_uint8_images, parse_rgb, to_pil
from rewards.color import ColorAdherence
from rewards.jpeg import JPEGCompressibility

RED, BLUE, BLACK = (255, 0, 0), (0, 0, 255), (0, 0, 0)
WHITE, LIME, YELLOW = (255, 255, 255), (0, 255, 0), (255, 255, 0)


# ---------------------------------------------------------------- palette decoder


def test_default_codebook_is_the_16_web_colours_in_order():
    decoder = PaletteDecoder()
    assert decoder.num_codes == 16
    assert decoder.palette.dtype == np.uint8
    # Spot checks against the HTML colour list: 0 black, 1 silver, 5 red, 13 blue, 15 aqua.
    assert decoder.palette[0].tolist() == [0, 0, 0]
    assert decoder.palette[1].tolist() == [192, 192, 192]
    assert decoder.palette[5].tolist() == [255, 0, 0]
    assert decoder.palette[13].tolist() == [0, 0, 255]
    assert decoder.palette[15].tolist() == [0, 255, 255]


def test_decoder_paints_each_code_as_a_patch_in_row_major_order():
    decoder = PaletteDecoder(patch_size=2)
    # Grid h=2, w=3, row-major: row 0 = red(5) blue(13) black(0); row 1 = white(3) lime(9) yellow(11).
    codes = np.array([[5, 13, 0, 3, 9, 11], [0] * 6], dtype=np.int64)  # int64 [n=2, L=6]
    images = decoder(codes, (2, 3), seeds=np.array([0, 1], dtype=np.int64))
    assert images.shape == (2, 4, 6, 3) and images.dtype == np.uint8  # H = 2*2, W = 3*2
    # Each code fills a 2x2 block: pixel (y, x) comes from cell (y // 2, x // 2).
    row_a = [RED, RED, BLUE, BLUE, BLACK, BLACK]
    row_b = [WHITE, WHITE, LIME, LIME, YELLOW, YELLOW]
    expected = np.array([row_a, row_a, row_b, row_b], dtype=np.uint8)  # uint8 [4, 6, 3]
    np.testing.assert_array_equal(images[0], expected)
    assert images[0, 1, 3].tolist() == list(BLUE)  # cell (0, 1), inside the patch, not its corner
    assert images[0, 3, 5].tolist() == list(YELLOW)  # the last pixel is the last code
    assert not images[1].any()  # the second image is all black (code 0)
    images[0, 0, 0] = 7  # the result is a fresh writable array, not a view of the codebook
    assert decoder.palette[5].tolist() == [255, 0, 0]


def test_decoder_custom_colours():
    decoder = PaletteDecoder(patch_size=1, colors=["#102030", "#a0b0c0"])
    assert decoder.num_codes == 2
    images = decoder(np.array([[1, 0]]), (1, 2), seeds=np.array([42]))
    assert images.tolist() == [[[[160, 176, 192], [16, 32, 48]]]]  # 0xa0=160, 0xb0=176, 0xc0=192


@pytest.mark.parametrize(
    "codes, grid, seeds, match",
    [
        (np.array([[0, 16]]), (1, 2), np.array([0]), r"\[0, 16\)"),  # 16 is one past the last code
        (np.array([[-1, 0]]), (1, 2), np.array([0]), r"\[0, 16\)"),
        (np.array([[0, 1, 2]]), (2, 2), np.array([0]), "L=3.*2x2"),
        (np.array([[0, 1]]), (1, 2), np.array([0, 1]), "seeds"),
        (np.array([[0.0, 1.0]]), (1, 2), np.array([0]), "integer"),
    ],
)
def test_decoder_rejects_bad_input(codes, grid, seeds, match):
    with pytest.raises(ValueError, match=match):
        PaletteDecoder()(codes, grid, seeds)


def test_decoder_rejects_bad_colours():
    with pytest.raises(ValueError, match="RRGGBB"):
        PaletteDecoder(colors=["#FFF"])


# ---------------------------------------------------------------- image helpers


def test_image_helpers():
    with pytest.raises(ValueError, match="dtype float32"):
        as_uint8_images(np.zeros((1, 2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(2, 2, 3\)"):
        as_uint8_images(np.zeros((2, 2, 3), dtype=np.uint8))  # a single image without the batch axis
    pil = to_pil(np.full((2, 3, 5, 3), 9, dtype=np.uint8))
    assert len(pil) == 2 and pil[0].mode == "RGB" and pil[0].size == (5, 3)  # PIL size is (W, H)
    assert parse_rgb("#ff8000") == (255, 128, 0)
    assert parse_rgb([1, 2, 3]) == (1, 2, 3)
    assert parse_rgb(np.array([0, 0, 255])) == (0, 0, 255)
    for bad in ("red", "#FF00", [1, 2], [0, 0, 256], [0.5, 0, 0], [True, 0, 0]):
        with pytest.raises(ValueError):
            parse_rgb(bad)


# ---------------------------------------------------------------- colour reward


def _half_red_half_blue() -> np.ndarray:
    image = np.zeros((1, 4, 4, 3), dtype=np.uint8)  # uint8 [n=1, H=4, W=4, 3]
    image[:, :, :2] = RED  # left two columns
    image[:, :, 2:] = BLUE  # right two columns
    return image


def test_color_half_red_half_blue_scores_one_half():
    reward = ColorAdherence()
    image = _half_red_half_blue()
    # 8 of 16 pixels are exactly red; blue is 360.6 away from red, far beyond the tolerance of 60.
    out = reward(image, ["a red square"], [{"color": "#FF0000"}])
    assert out.scores.dtype == np.float32
    assert out.scores.tolist() == [0.5]
    # The [r, g, b] form of the target works the same way.
    assert reward(image, ["x"], [{"color": [0, 0, 255]}]).scores.tolist() == [0.5]
    # A colour present nowhere (lime) scores 0.
    assert reward(image, ["x"], [{"color": "#00FF00"}]).scores.tolist() == [0.0]


def test_color_tolerance_boundary_is_inclusive():
    # (219, 48, 0) is at distance sqrt(36^2 + 48^2) = 60 from red (255, 0, 0): a 3-4-5 triangle.
    image = np.full((1, 2, 2, 3), (219, 48, 0), dtype=np.uint8)
    meta = [{"color": "#FF0000"}]
    assert ColorAdherence(tolerance=60.0)(image, ["x"], meta).scores.tolist() == [1.0]
    assert ColorAdherence(tolerance=59.99)(image, ["x"], meta).scores.tolist() == [0.0]
    assert ColorAdherence(tolerance=0.0)(image, ["x"], meta).scores.tolist() == [0.0]


def test_color_is_nan_without_metadata_and_uses_the_configured_key():
    images = np.concatenate([_half_red_half_blue(), np.full((1, 4, 4, 3), 255, np.uint8)])  # [2, 4, 4, 3]
    scores = ColorAdherence()(images, ["a", "b"], [{"color": "#0000FF"}, {}]).scores
    assert scores[0] == 0.5 and np.isnan(scores[1])  # sample 1 has no "color": not applicable
    meta = [{"color": "#0000FF"}, {"target": "#FFFFFF"}]
    scores = ColorAdherence(metadata_key="target")(images, ["a", "b"], meta).scores
    assert np.isnan(scores[0]) and scores[1] == 1.0  # the white image is all white
    all_nan = ColorAdherence()(images, ["a", "b"], [{}, {}]).scores
    assert np.isnan(all_nan).all()


def test_color_malformed_target_names_the_sample():
    images = np.zeros((2, 2, 2, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"sample 1: metadata\['color'\]"):
        ColorAdherence()(images, ["a", "b"], [{"color": "#000000"}, {"color": "dark"}])


# ---------------------------------------------------------------- JPEG reward


def test_jpeg_flat_scores_higher_than_noise():
    flat = np.full((1, 64, 64, 3), 128, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, size=(1, 64, 64, 3), dtype=np.uint8)
    scores = JPEGCompressibility(scale="fraction")(np.concatenate([flat, noise]), ["a", "b"], [{}, {}]).scores
    assert scores.dtype == np.float32
    # A flat 64x64 image is little more than JPEG's ~600 bytes of headers and tables against 12,288 raw.
    assert scores[0] > 0.9
    # Noise only loses what 4:2:0 chroma subsampling and quantisation throw away (about 3/4 here): well below.
    assert scores[1] < 0.85
    assert ((scores >= 0) & (scores <= 1)).all()
    kilobytes = JPEGCompressibility()(np.concatenate([flat, noise]), ["a", "b"], [{}, {}]).scores
    assert kilobytes[0] > kilobytes[1] and (kilobytes < 0).all()  # minus the size: flat is the smaller file


def _ddpo_jpeg_compressibility(images: np.ndarray) -> np.ndarray:
    """The reference, re-stated from kvablack/ddpo-pytorch ddpo_pytorch/rewards.py (flow_grpo's is the same, then
    divided by 500): each image saved by PIL as JPEG at quality 95, `-buffer.tell() / 1000`."""
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return -np.array(sizes)


def test_jpeg_default_is_ddpos_kilobytes_at_quality_95():
    rng = np.random.default_rng(2)
    smooth = np.linspace(0, 255, 40 * 24 * 3).reshape(1, 24, 40, 3).astype(np.uint8)  # [1, H=24, W=40, 3]
    images = np.concatenate([smooth, rng.integers(0, 256, (2, 24, 40, 3), dtype=np.uint8)])  # [3, 24, 40, 3]
    scores = JPEGCompressibility()(images, ["a", "b", "c"], [{}] * 3).scores
    # the same bytes from the same encoder; only the float32 cast of a value of a few units differs (<= 5e-7)
    np.testing.assert_allclose(scores, _ddpo_jpeg_compressibility(images), rtol=0, atol=1e-6)


def test_jpeg_quality_changes_the_ranking_not_only_the_scale():
    # A gradient under grain of growing strength, and a one-pixel checkerboard. Quality 75 quantises the grain away
    # but not the checkerboard's hard edges, which then costs as much as strong grain (between sigma 32 and 64);
    # quality 95 keeps the grain, and the checkerboard falls between sigma 8 and 16. Each neighbour differs by 35
    # bytes or more, far beyond any encoder-version wobble: the quality decides which image the reward prefers.
    rng = np.random.default_rng(3)
    rows = []
    for level in (2, 4, 8, 16, 32, 64):
        base = np.linspace(0, 255, 32 * 32 * 3).reshape(32, 32, 3)
        rows.append(np.clip(base + rng.normal(0, level, base.shape), 0, 255).astype(np.uint8))
    edges = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    images = np.stack(rows + [edges])  # [7, 32, 32, 3]
    q75 = JPEGCompressibility(quality=75)(images, ["x"] * 7, [{}] * 7).scores
    q95 = JPEGCompressibility(quality=95)(images, ["x"] * 7, [{}] * 7).scores
    assert list(np.argsort(q75)) != list(np.argsort(q95))
    assert q75[4] > q75[6] > q75[5] and q95[2] > q95[6] > q95[3]


@pytest.mark.parametrize("quality", [30, 75, 95])
def test_jpeg_fraction_is_one_minus_jpeg_bytes_over_raw_bytes(quality):
    rng = np.random.default_rng(1)
    smooth = np.linspace(0, 255, 48 * 32 * 3).reshape(1, 32, 48, 3).astype(np.uint8)  # [1, H=32, W=48, 3]
    images = np.concatenate([smooth, rng.integers(0, 256, (1, 32, 48, 3), dtype=np.uint8)])  # [2, 32, 48, 3]
    expected = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        expected.append(max(0.0, 1.0 - len(buffer.getvalue()) / (32 * 48 * 3)))
    scores = JPEGCompressibility(quality=quality, scale="fraction")(images, ["a", "b"], [{}, {}]).scores
    # the same bytes counted by the same encoder; only the float32 cast of a value in [0, 1] differs (<= 6e-8)
    np.testing.assert_allclose(scores, np.array(expected, dtype=np.float32), rtol=0, atol=1e-7)


def test_jpeg_rejects_bad_quality_and_scale():
    with pytest.raises(ValueError, match="quality"):
        JPEGCompressibility(quality=0)
    with pytest.raises(ValueError, match="scale"):
        JPEGCompressibility(scale="bytes")


# ---------------------------------------------------------------- both rewards


@pytest.mark.parametrize(
    "reward", [ColorAdherence(tolerance=10.0, metadata_key="c"), JPEGCompressibility(quality=50)]
)
def test_rewards_pickle_round_trip(reward):
    clone = pickle.loads(pickle.dumps(reward))
    assert type(clone) is type(reward) and vars(clone) == vars(reward)
    images = _half_red_half_blue()
    meta = [{"c": "#FF0000"}]
    np.testing.assert_array_equal(clone(images, ["x"], meta).scores, reward(images, ["x"], meta).scores)


@pytest.mark.parametrize("reward", [ColorAdherence(), JPEGCompressibility()])
def test_rewards_check_lengths_and_image_format(reward):
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(images, ["a"], [{}])
    with pytest.raises(ValueError, match="uint8"):
        reward(images.astype(np.float32), ["a", "b"], [{}, {}])
