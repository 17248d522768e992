"""VLM alignment: how likely a served VLM is to answer "yes" when asked whether the image shows the prompt.

VQAScore (Lin et al., 2024) showed that P("Yes") from a strong VLM tracks human judgements of prompt alignment
better than CLIP similarity, especially for compositional prompts (counts, relations, attributes), which is why
X-Omni used a Qwen2.5-VL judge for alignment. The probability is read from the first generated token's top
logprobs, so one request costs one decoded token, and it is a continuous score in [0, 1] rather than a sampled
yes/no, which gives GRPO a usable spread within a group.

Each variant is its reference's question, byte for byte, and its reference's formula, kept as data with source and
licence in rewards/instructions/ (see rewards/_chat.py):

- "vqascore": VQAScore's own question (CLIP-FlanT5 in t2v_metrics), `Does this figure show "{prompt}"? Please
  answer yes or no.`, score P("Yes"): the exact token `Yes`;
- "vqascore_qwen2vl": t2v_metrics' question for Qwen2-VL / Qwen2.5-VL judges (`... Please answer Yes or No.`),
  score P("Yes");
- "t2i_r1_orm": T2I-R1's outcome reward model, P(yes) / (P(yes) + P(no)) of the tokens `yes` and `no`, as the
  reference computes it after HF generate's temperature-0.3 warper: sigmoid((logprob(yes) - logprob(no)) / 0.3).

Logprobs are requested greedily (temperature 0), so servers return the raw model logprobs the formulas start from.
A token that is not among the top logprobs contributes probability 0 (it lies below the smallest one listed). A
reply without logprobs is NaN, counted in `info["unparsed"]` (the server was likely started without logprobs), and
so is an ORM reply whose first token is neither yes nor no (the reference scores that 0, which would teach the
policy that the judge said no).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._chat import ChatClient, image_options, load_instruction
from rewards._image import validate_batch

VARIANTS = {"vqascore": "vqascore", "vqascore_qwen2vl": "vqascore_qwen2vl", "t2i_r1_orm": "t2i_r1_orm"}


def first_token_logprobs(reply: dict[str, Any]) -> tuple[str, dict[str, float]] | None:
    """(the chosen first token, {token: logprob} of it and its top alternatives), or None without logprobs."""
    try:
        first = reply["choices"][0]["logprobs"]["content"][0]
        candidates = list(first.get("top_logprobs") or []) + [first]
        return first["token"], {c["token"]: float(c["logprob"]) for c in candidates}  # the chosen token may repeat
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def answer_probability(reply: dict[str, Any], token: str) -> float | None:
    """VQAScore: P(first token == `token`) exactly (0 when it is not listed); None without logprobs."""
    found = first_token_logprobs(reply)
    if found is None:
        return None
    return math.exp(found[1][token]) if token in found[1] else 0.0


def yes_over_yes_no(reply: dict[str, Any], yes: str, no: str, temperature: float) -> float | None:
    """T2I-R1's ORM: P(yes) / (P(yes) + P(no)) at `temperature`; None without logprobs or when the first token does
    not read yes or no (lower-cased, stripped: the reference's check)."""
    found = first_token_logprobs(reply)
    if found is None or found[0].strip().lower() not in (yes, no):
        return None
    logprobs = found[1]
    if yes not in logprobs and no not in logprobs:  # e.g. "Yes" chosen, "yes" and "no" both unlisted: unknown
        return None
    if no not in logprobs:
        return 1.0
    if yes not in logprobs:
        return 0.0
    # softmax(logits / T) restricted to two tokens: the normaliser cancels, leaving a sigmoid of the gap
    return 1.0 / (1.0 + math.exp((logprobs[no] - logprobs[yes]) / temperature))


class VLMAlignment:
    """Alignment in [0, 1] by `variant` (a key of VARIANTS); `template` replaces its question (a `{prompt}` slot, or
    none for a question about the image alone).

    top_logprobs: how many alternatives the server returns for the first token (vLLM allows up to 20 by
    default). image_format, image_size ([W, H] or "full"), jpeg_quality: None takes the variant's. The other
    arguments configure the shared chat client (see rewards/_chat.py).
    """

    @staticmethod
    def gpu_parameters(**_: Any) -> int:
        """Nothing on the worker's GPU (a server the user runs)."""
        return 0

    def __init__(
        self,
        base_url: str,
        model: str,
        variant: str = "vqascore",
        template: str | None = None,
        api_key_env: str | None = None,
        top_logprobs: int = 20,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_concurrency: int = 8,
        image_format: str | None = None,
        image_size: list[int] | str | None = None,
        jpeg_quality: int | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"VLMAlignment: unknown variant {variant!r}; known: {sorted(VARIANTS)}")
        base = load_instruction(VARIANTS[variant])
        self.variant = variant
        self.template = base["template"] if template is None else template
        self.answer = dict(base["answer"])
        self.request = {"max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": int(top_logprobs)}
        image = image_options(base, image_format, image_size, jpeg_quality)
        self.client = ChatClient(
            base_url, model, api_key_env, timeout, max_retries, backoff, max_concurrency=max_concurrency, **image
        )

    def __repr__(self) -> str:
        return f"VLMAlignment(variant={self.variant!r}, template={self.template!r}, client={self.client!r})"

    def score(self, reply: dict[str, Any]) -> float | None:
        """One reply's score by the variant's formula, or None when it cannot be read."""
        if self.answer["kind"] == "probability":
            return answer_probability(reply, self.answer["token"])
        yes, no = self.answer["tokens"]
        return yes_over_yes_no(reply, yes, no, float(self.answer["temperature"]))

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        images = validate_batch("VLMAlignment", images, prompts, metadata)  # uint8 [n, H, W, 3]
        questions = [self.template.replace("{prompt}", prompt) for prompt in prompts]
        replies = self.client.complete(images, questions, **self.request)  # n reply JSONs
        probs = [self.score(reply) for reply in replies]
        scores = np.array([np.nan if p is None else p for p in probs], dtype=np.float32)  # float32 [n]
        return RewardOutput(scores=scores, info={"unparsed": float(sum(p is None for p in probs))})
