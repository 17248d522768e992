"""OCR reward: does the image show the text the prompt asked for?

Autoregressive image models are judged (and X-Omni was trained) on rendering long English and Chinese text, and a
preference model such as HPS barely sees spelling. This reward reads the image with an OCR engine and compares the
read-out with the target text:

- target: `metadata["text"]` (a string, or a list of strings read in order), else the prompt's quoted spans
  (`"..."`, `“...”`, `「...」`): by default the first (`target: first_span`, as flow_grpo's OCR reward reads
  `prompt.split('"')[1]`), or all of them joined (`target: all_spans`); a sample with neither scores NaN (not
  applicable), never 0.
- engine: "rapidocr" (default; models ship in its wheel), "easyocr" (weights from a local folder) or "vlm" (an
  OpenAI-compatible server reading the text out); `engine_options` are the engine's arguments (see
  rewards/_ocr_engines.py).
- metric: "edit" (flow_grpo's reward: 1 if the target appears verbatim, else 1 - normalised edit distance; NFKC
  first, where flow_grpo compares code points) or "accuracy" (LongText-Bench's published metric, without NFKC as
  published: the share of the target's words, or characters for Chinese, that were read; `case_fold` also
  lower-cases Chinese mode). Both are in rewards/_text.py.
- `text_counts` gives LongText-Bench's (matched, expected) counts of a read-out: `grpo-image eval --longtext` asks
  its reader (an OCR reward, by default) for them, so the benchmark and the reward count alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._image import validate_batch
from rewards._ocr_engines import ENGINES
from rewards._text import METRICS, SPANS, target_text, text_accuracy_counts


class OCR:
    """Text-rendering score in [0, 1] per image (NaN without a target); see the module docstring."""

    def __init__(
        self,
        engine: str = "rapidocr",
        metric: str = "edit",
        metadata_key: str = "text",
        engine_options: dict[str, Any] | None = None,
        case_fold: bool = False,
        target: str = "first_span",
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"OCR: unknown engine {engine!r}; known: {sorted(ENGINES)}")
        if metric not in METRICS:
            raise ValueError(f"OCR: unknown metric {metric!r}; known: {sorted(METRICS)}")
        if target not in SPANS:
            raise ValueError(f"OCR: target must be one of {SPANS}, got {target!r}")
        self.target = target
        self.engine_name = engine
        self.metric = metric
        self.metadata_key = metadata_key
        self.case_fold = case_fold
        try:
            self.engine = ENGINES[engine](**(engine_options or {}))
        except TypeError as err:
            raise TypeError(f"OCR: engine_options for engine {engine!r}: {err}") from err

    def __repr__(self) -> str:
        return (
            f"OCR(engine={self.engine_name!r}, metric={self.metric!r}, metadata_key={self.metadata_key!r}, "
            f"target={self.target!r})"
        )

    @staticmethod
    def gpu_parameters(engine: str = "rapidocr", **_: Any) -> int | None:
        """Nothing on the worker's GPU for rapidocr (ONNX on the CPU) or a VLM server; easyocr's is not counted."""
        return 0 if engine in ("rapidocr", "vlm") else None

    @staticmethod
    def missing_inputs(prompt: str, metadata: dict[str, Any], metadata_key: str = "text", **_: Any) -> str | None:
        """Why a prompt cannot be scored (checked before training when the reward is required), or None."""
        if target_text(prompt, metadata, metadata_key) is None:
            return f"it has no target text: neither metadata[{metadata_key!r}] nor a quoted span in the prompt"
        return None

    def read(self, images: np.ndarray) -> list[str]:
        """The engine's read-out of each image, uint8 RGB [n, H, W, 3] -> n strings (for logging and tests)."""
        return self.engine.read(images)

    def text_counts(self, recognized: str, target: str | list[str], lang: str | None = None) -> tuple[int, int]:
        """LongText-Bench's (matched units, expected units) of a read-out against its target."""
        return text_accuracy_counts(recognized, target, lang, self.case_fold)

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        images = validate_batch("OCR", images, prompts, metadata)  # uint8 [n, H, W, 3]
        targets = []
        for i, (prompt, meta) in enumerate(zip(prompts, metadata)):
            try:
                targets.append(target_text(prompt, meta, self.metadata_key, self.target))
            except ValueError as err:
                raise ValueError(f"OCR: sample {i}: {err}") from err
        rows = [i for i, target in enumerate(targets) if target is not None]  # n' samples with a target
        scores = np.full(len(prompts), np.nan, dtype=np.float32)  # float32 [n]
        if rows:
            texts = self.engine.read(images[rows])  # n' strings
            if self.metric == "accuracy":
                counts = [self.text_counts(text, targets[i]) for i, text in zip(rows, texts)]
                scores[rows] = [m / e if e else np.nan for m, e in counts]
            else:
                scores[rows] = [METRICS[self.metric](text, targets[i]) for i, text in zip(rows, texts)]
        return RewardOutput(scores=scores)
