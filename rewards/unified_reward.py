"""UnifiedReward: a VLM judge served by the user (vLLM or sglang), asked to rate each image against its prompt.

The UnifiedReward models (CodeGoat24/UnifiedReward-*) were fine-tuned on fixed pointwise rubrics, and score best
when asked in that shape. This file carries the rubrics of the three generations, paraphrased where they are prose
and exact where the model must answer in a format (the score lines and the `Text Caption: [...]` slot):

- "v1.5": UnifiedReward-7b-v1.5 (LLaVA-OneVision), as flow_grpo queries it through sglang: judge caption alignment
  and image quality, answer `Final Score: x` with x in 1..5.
- "qwen": UnifiedReward-qwen-{3b,7b,32b,72b} (Qwen2.5-VL; the repository's point-score rubric): the same two
  criteria, plus a list of the caption's key elements marked 0/1, then `Final Score: x` in 1..5.
- "v1.5_acs": the v1.5/qwen word-wise rubric: per-word scores, then `Alignment Score (1-5): X`,
  `Coherence Score (1-5): Y`, `Style Score (1-5): Z`.
- "2.0": UnifiedReward-2.0 (Qwen2.5-VL, Qwen3-VL, Qwen3.5): the three axis scores without the word list.

The score is the mean of the chosen axes divided by the rubric's maximum (5), so it lies in [0.2, 1]. A reply in
which a chosen axis is missing or out of range is NaN and counted in `info["unparsed"]`: never a silent 0, which
would teach the policy that the judge hated the image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._chat import ChatClient, message_text
from rewards._image import validate_batch

_NUMBER = r"([-+]?\d+(?:\.\d+)?)"

_ALIGN_QUALITY = (
    "You are shown an image generated from a text caption. Judge it on two things:\n"
    "1. Caption alignment: how faithfully the image depicts the caption - its objects, their attributes and "
    "the relations between them.\n"
    "2. Image quality: how clear, detailed, well-coloured and aesthetically pleasing the image is.\n"
)
_ACS_AXES = (
    "- Alignment Score: how well the content of the image matches the caption.\n"
    "- Coherence Score: how logically consistent the image is (no visual glitches or distorted objects).\n"
    "- Style Score: how aesthetically appealing the image is, whatever the caption says.\n\n"
)
_ACS_FORMAT = "Alignment Score (1-5): X\nCoherence Score (1-5): Y\nStyle Score (1-5): Z\n\n"
_CAPTION = "Your task is provided as follows:\nText Caption: [{prompt}]"


@dataclass(frozen=True)
class Rubric:
    """A prompt template with a `{prompt}` slot, the labelled scores its replies carry, and their range."""

    template: str
    fields: dict[str, str]  # short name -> label in the reply, e.g. "final" -> "Final Score"
    minimum: float = 1.0
    maximum: float = 5.0


_ACS_FIELDS = {
    "alignment": "Alignment Score (1-5)",
    "coherence": "Coherence Score (1-5)",
    "style": "Style Score (1-5)",
}

RUBRICS: dict[str, Rubric] = {
    "v1.5": Rubric(
        _ALIGN_QUALITY + "Weighing both, give a score from 1 to 5 after 'Final Score:'.\n" + _CAPTION,
        {"final": "Final Score"},
    ),
    "qwen": Rubric(
        _ALIGN_QUALITY
        + "List the key elements of the caption and whether each appears in the image, one per line as "
        "'element (type): value' (value=1 if generated, value=0 if not), then give a score from 1 to 5 after "
        "'Final Score:'.\n" + _CAPTION,
        {"final": "Final Score"},
    ),
    "v1.5_acs": Rubric(
        "You are shown an image generated from a text caption. Analyse it against the caption:\n\n"
        "1. Score every word of the caption by how poorly it is rendered in the image (higher = worse), as\n"
        '   Word-wise Scores: [["word1", score1], ["word2", score2], ..., ["[No_mistakes]", scoreM]]\n'
        "   where the special token [No_mistakes] is high when every element is depicted correctly.\n\n"
        "2. Rate the whole image from 1 to 5 on each axis:\n" + _ACS_AXES + "Answer in exactly this format:\n\n"
        '---\n\nWord-wise Scores: [["word1", score1], ..., ["[No_mistakes]", scoreM]]\n\n' + _ACS_FORMAT + _CAPTION,
        _ACS_FIELDS,
    ),
    "2.0": Rubric(
        "You are shown an image generated from a text caption. Rate the image against the caption from 1 to 5 on "
        "each axis:\n" + _ACS_AXES + "Answer in exactly this format:\n\n" + _ACS_FORMAT + _CAPTION,
        _ACS_FIELDS,
    ),
}


def parse_scores(reply: str, fields: dict[str, str], minimum: float, maximum: float) -> dict[str, float] | None:
    """The last `Label: number` of each field in the reply, or None if one is missing or out of range."""
    values = {}
    for name, label in fields.items():
        found = re.findall(re.escape(label) + r"\s*[:：]\s*\**\s*" + _NUMBER, reply)
        if not found:
            return None
        value = float(found[-1])  # a reasoning reply may quote the format first; the verdict comes last
        if not minimum <= value <= maximum:
            return None
        values[name] = value
    return values


class UnifiedReward:
    """VLM-judge score in [min/max, 1]: the mean of the chosen rubric axes divided by the rubric maximum.

    rubric: a name in RUBRICS. template: replaces the rubric's prompt (must contain "{prompt}"). fields: which of
    the rubric's axes to average (default all; e.g. ["alignment"] for the "2.0" rubric). score_fields / maximum:
    for a custom template, the labels to parse ({name: label}) and the top of their scale. The remaining arguments
    configure the shared chat client (see rewards/_chat.py); max_tokens bounds the judge's reply.
    """

    @staticmethod
    def gpu_parameters(**_: Any) -> int:
        """Nothing on the worker's GPU (a server the user runs)."""
        return 0

    def __init__(
        self,
        base_url: str,
        model: str = "UnifiedReward",
        rubric: str = "v1.5",
        template: str | None = None,
        fields: list[str] | None = None,
        score_fields: dict[str, str] | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_concurrency: int = 8,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        image_format: str = "png",
    ) -> None:
        if rubric not in RUBRICS:
            raise ValueError(f"UnifiedReward: unknown rubric {rubric!r}; known: {sorted(RUBRICS)}")
        base = RUBRICS[rubric]
        self.rubric = rubric
        self.template = base.template if template is None else template
        if "{prompt}" not in self.template:
            raise ValueError("UnifiedReward: template must contain '{prompt}'")
        self.score_fields = dict(base.fields if score_fields is None else score_fields)
        chosen = list(self.score_fields) if fields is None else list(fields)
        unknown = [name for name in chosen if name not in self.score_fields]
        if unknown or not chosen:
            raise ValueError(f"UnifiedReward: fields {chosen} not all in {sorted(self.score_fields)}")
        self.fields = chosen
        self.minimum = float(base.minimum if minimum is None else minimum)
        self.maximum = float(base.maximum if maximum is None else maximum)
        self.request = {"max_tokens": int(max_tokens), "temperature": float(temperature)}
        self.client = ChatClient(
            base_url, model, api_key_env, timeout, max_retries, backoff, max_concurrency=max_concurrency,
            image_format=image_format,
        )

    def __repr__(self) -> str:
        return f"UnifiedReward(rubric={self.rubric!r}, fields={self.fields}, client={self.client!r})"

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        images = validate_batch("UnifiedReward", images, prompts, metadata)  # uint8 [n, H, W, 3]
        questions = [self.template.replace("{prompt}", prompt) for prompt in prompts]
        replies = self.client.complete(images, questions, **self.request)  # n reply JSONs
        scores = np.full(len(prompts), np.nan, dtype=np.float32)  # float32 [n]
        for i, reply in enumerate(replies):
            values = parse_scores(message_text(reply), self.score_fields, self.minimum, self.maximum)
            if values is not None:
                scores[i] = np.mean([values[name] for name in self.fields]) / self.maximum
        return RewardOutput(scores=scores, info={"unparsed": float(np.isnan(scores).sum())})
