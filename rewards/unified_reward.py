"""UnifiedReward: a VLM judge served by the user (vLLM or sglang), asked to rate each image against its prompt.

The UnifiedReward models (CodeGoat24/UnifiedReward-*) were fine-tuned on fixed pointwise instructions, and a judge
asked in other words scores differently, so each rubric is the reference's text byte for byte, kept as data with
its source and licence in rewards/instructions/ (see rewards/_chat.py), together with the reference client's image
size and encoding, its token budget and its score pattern:

- "v1.5": UnifiedReward-7b-v1.5 as flow_grpo asks it through sglang (512x512 PNG, `Final Score: x` in 1..5, the
  first match of flow_grpo's pattern);
- "v1.5_acs": UnifiedReward-7b-v1.5's word-wise rubric (LLaVA inference script), Alignment / Coherence / Style;
- "qwen": UnifiedReward-qwen-*'s point-score rubric (key elements marked 0/1, then `Final Score: x`);
- "qwen_acs": UnifiedReward-qwen-*'s word-wise rubric;
- "2.0": UnifiedReward-2.0's ACS rubric, as its vLLM client sends it (JPEG quality 95, max_tokens 4096);
- "qwenvl_aesthetic": flow_grpo's Qwen2.5-VL aesthetic rubric, which has no prompt slot (`<Score>X</Score>`).

The score is the mean of the chosen axes divided by the rubric's maximum (5), so it lies in [0.2, 1]. A reply in
which a chosen axis does not match its pattern, or matches outside [minimum, maximum], is NaN and counted in
`info["unparsed"]`: never a silent 0 (flow_grpo's choice), which would teach the policy that the judge hated the
image.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._chat import ChatClient, image_options, load_instruction, message_text
from rewards._image import validate_batch

RUBRICS = {
    "v1.5": "unified_reward_v1.5",
    "v1.5_acs": "unified_reward_v1.5_acs",
    "qwen": "unified_reward_qwen",
    "qwen_acs": "unified_reward_qwen_acs",
    "2.0": "unified_reward_2.0",
    "qwenvl_aesthetic": "qwenvl_aesthetic",
}
MATCHES = ("first", "last")


def parse_scores(
    reply: str, patterns: dict[str, str], match: str, minimum: float, maximum: float
) -> dict[str, float] | None:
    """Each field's number (its pattern's one group, the `match` occurrence), or None if one is missing or out of
    [minimum, maximum]."""
    values = {}
    for name, pattern in patterns.items():
        found = re.findall(pattern, reply)
        if not found:
            return None
        value = float(found[0] if match == "first" else found[-1])
        if not minimum <= value <= maximum:
            return None
        values[name] = value
    return values


class UnifiedReward:
    """VLM-judge score in [min/max, 1]: the mean of the chosen rubric axes divided by the rubric maximum.

    rubric: a key of RUBRICS. template: replaces the rubric's instruction (with a `{prompt}` slot, or without one
    for a question about the image alone). fields: which of the rubric's axes to average (default all; e.g.
    ["alignment"] for the "2.0" rubric). score_patterns: for a custom template, {name: regex with one group}, and
    `match` ("first" or "last"), `minimum` and `maximum` of the numbers they read. max_tokens, image_format,
    image_size ([W, H], or "full" for no resize) and jpeg_quality: None takes the rubric's (its reference client's).
    The remaining arguments configure the shared chat client (see rewards/_chat.py).
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
        score_patterns: dict[str, str] | None = None,
        match: str | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_concurrency: int = 8,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        image_format: str | None = None,
        image_size: list[int] | str | None = None,
        jpeg_quality: int | None = None,
    ) -> None:
        if rubric not in RUBRICS:
            raise ValueError(f"UnifiedReward: unknown rubric {rubric!r}; known: {sorted(RUBRICS)}")
        base = load_instruction(RUBRICS[rubric])
        self.rubric = rubric
        self.template = base["template"] if template is None else template
        self.score_patterns = dict(base["scores"] if score_patterns is None else score_patterns)
        bad = [name for name, pattern in self.score_patterns.items() if re.compile(pattern).groups != 1]
        if bad:
            raise ValueError(f"UnifiedReward: score_patterns {bad} must each have exactly one group (the number)")
        chosen = list(self.score_patterns) if fields is None else list(fields)
        unknown = [name for name in chosen if name not in self.score_patterns]
        if unknown or not chosen:
            raise ValueError(f"UnifiedReward: fields {chosen} not all in {sorted(self.score_patterns)}")
        self.fields = chosen
        self.parsed = {name: self.score_patterns[name] for name in chosen}  # an axis not averaged is not required
        self.match = base["match"] if match is None else match
        if self.match not in MATCHES:
            raise ValueError(f"UnifiedReward: match must be one of {MATCHES}, got {self.match!r}")
        self.minimum = float(base["minimum"] if minimum is None else minimum)
        self.maximum = float(base["maximum"] if maximum is None else maximum)
        tokens = base.get("max_tokens") if max_tokens is None else max_tokens
        self.request = {"temperature": float(temperature)}
        if tokens is not None:  # flow_grpo's sglang client sends none: the server's own limit applies
            self.request["max_tokens"] = int(tokens)
        image = image_options(base, image_format, image_size, jpeg_quality)
        self.client = ChatClient(
            base_url, model, api_key_env, timeout, max_retries, backoff, max_concurrency=max_concurrency, **image
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
            values = parse_scores(message_text(reply), self.parsed, self.match, self.minimum, self.maximum)
            if values is not None:
                scores[i] = np.mean([values[name] for name in self.fields]) / self.maximum
        return RewardOutput(scores=scores, info={"unparsed": float(np.isnan(scores).sum())})
