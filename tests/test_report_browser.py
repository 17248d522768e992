"""The HTML report of `grpo-image eval` opens in headless Chromium (Debian's chromium package) and shows its images.

A screenshot is taken and checked: it is not blank, and the colours of the sampled images (flat palette patches,
shown enlarged pixel for pixel) are on screen in blocks as large as the report draws them. A missing Chromium
fails the test rather than skipping it: `make test` installs it.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.helpers_eval import COLORS, RECIPE, SMALL, Images, cli, write_jsonl

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--force-color-profile=srgb", "--hide-scrollbars", "--window-size=1000,1400",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")


def test_report_opens_in_chromium_and_shows_its_images(tmp_path):
    browser = chromium()
    prompts = write_jsonl(tmp_path / "colors.jsonl", COLORS)
    out = tmp_path / "eval"
    assert cli("eval", RECIPE, *SMALL, "--prompts", prompts, "--n", "2", "--out", out) == 0
    report = out / "report.html"
    parser = Images()
    parser.feed(report.read_text(encoding="utf-8"))
    assert len(parser.sources) == 3 * 2
    files = [out / src for src in parser.sources]
    assert all(f.is_file() for f in files), parser.sources

    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         report.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    screen = np.asarray(Image.open(shot).convert("RGB"))  # uint8 [1400, 1000, 3]
    assert screen.shape[:2] == (1400, 1000)
    assert (screen != 255).any(axis=-1).mean() > 0.05, "the screenshot is (nearly) blank"
    # Each 16 x 16 image is 2 x 2 flat patches, drawn 128 px wide: a patch is a 64 x 64 block on screen.
    # Every colour of every image must cover at least one such block (text never does).
    for path in files:
        image = np.asarray(Image.open(path).convert("RGB"))  # uint8 [16, 16, 3]
        for colour in np.unique(image.reshape(-1, 3), axis=0):
            if colour.tolist() in ([255, 255, 255], [0, 0, 0]):
                continue  # the page's own background and text
            on_screen = np.all(screen == colour, axis=-1).sum()
            assert on_screen >= 64 * 64, (path.name, colour.tolist(), on_screen)
