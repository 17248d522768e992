"""Shared by the sample / eval / LongText / ablation / report tests: the tiny recipe at test size, CLI runs,
small prompt files, and a text reader with canned answers (named by dotted path, like a user's own reader)."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from grpo_image.app.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")
SMALL = [  # as in test_cli_train.py: N = 2 * 4 rollouts of 2 x 2 codes (16 x 16 px images), a 1-layer model
    f"data.prompts={REPO / 'prompts' / 'tiny_colors.jsonl'}",
    "data.batch_size=2", "data.group_size=4", "train.minibatches=2",
    "policy.hidden_size=32", "policy.num_layers=1", "policy.grid=[2,2]",
    "save_every=2", "sample_every=0", "logging.tensorboard=false",
]
COLORS = [  # three prompts of the demo's kind
    {"prompt": "a red square", "metadata": {"color": "#FF0000", "color_name": "red"}},
    {"prompt": "a blue picture", "metadata": {"color": "#0000FF", "color_name": "blue"}},
    {"prompt": "paint it all yellow", "metadata": {"color": "#FFFF00", "color_name": "yellow"}},
]


def cli(*args: str) -> int:
    return main([str(a) for a in args])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def train_tiny(out: Path, mode: str, steps: int = 2) -> Path:
    """A short tiny run whose weights moved far enough from the start for its samples to differ."""
    assert cli("train", RECIPE, *SMALL, f"output_dir={out}", f"steps={steps}", f"train.mode={mode}",
               "train.lr=0.05") == 0
    return out


class CannedReader:
    """A text reader whose answer for an image is texts[image[0, 0, 0]]: tests mark each image with its answer."""

    def __init__(self, texts: list[str]):
        self.texts = list(texts)

    def read(self, images: np.ndarray) -> list[str]:
        return [self.texts[int(image[0, 0, 0])] for image in images]

    def text_counts(self, read: str, target, lang: str | None) -> tuple[int, int]:
        """LongText-Bench's counts, as a reader of one's own would take them from the OCR reward's text module."""
        from rewards._text import text_accuracy_counts

        return text_accuracy_counts(read, target, lang)


class Images(HTMLParser):
    """The src of every <img> of an HTML report, in order."""

    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])
