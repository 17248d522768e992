"""VLM alignment, VQAScore-style: the probability that a VLM answers "Yes" to `Does this image show "{prompt}"?`.

VQAScore (Lin et al., 2024) showed that P("Yes") from a strong VLM tracks human judgements of prompt alignment
better than CLIP similarity, especially for compositional prompts (counts, relations, attributes), which is why
X-Omni used a Qwen2.5-VL judge for alignment. The probability is read from the first generated token's top
logprobs, so one request costs one decoded token. It is a continuous score in [0, 1] rather than a sampled
yes/no, which gives GRPO a usable spread within a group.

The default question ends, as VQAScore's does, with "Please answer yes or no.": without it an instruction-tuned
VLM often starts with "The image ..." and P("Yes") on the first token collapses to ~0 for every image.

P("Yes") sums every top-logprob token that reads "yes" once stripped and lower-cased ("Yes", " yes", ...). A
"Yes" that is not among the top logprobs contributes 0 (its probability is below the smallest one listed). A
reply without logprobs is NaN, counted in `info["unparsed"]` (the server was likely started without logprobs).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._chat import ChatClient
from rewards._image import validate_batch

DEFAULT_TEMPLATE = 'Does this image show "{prompt}"? Please answer yes or no.'


def yes_probability(reply: dict[str, Any], yes: str = "yes") -> float | None:
    """P(first token reads `yes`) from a chat-completion reply's logprobs; None when it has none."""
    try:
        first = reply["choices"][0]["logprobs"]["content"][0]
        candidates = list(first.get("top_logprobs") or []) + [first]
        by_token = {c["token"]: float(c["logprob"]) for c in candidates}  # the chosen token may repeat: dedupe
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return min(1.0, sum(math.exp(lp) for tok, lp in by_token.items() if tok.strip().lower() == yes))


class VLMAlignment:
    """P("Yes") in [0, 1] for `template` (with a `{prompt}` slot) asked about each image.

    top_logprobs: how many alternatives the server returns for the first token (vLLM allows up to 20 by
    default). The other arguments configure the shared chat client (see rewards/_chat.py).
    """

    @staticmethod
    def gpu_parameters(**_: Any) -> int:
        """Nothing on the worker's GPU (a server the user runs)."""
        return 0

    def __init__(
        self,
        base_url: str,
        model: str,
        template: str = DEFAULT_TEMPLATE,
        api_key_env: str | None = None,
        top_logprobs: int = 20,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_concurrency: int = 8,
        image_format: str = "png",
    ) -> None:
        if "{prompt}" not in template:
            raise ValueError("VLMAlignment: template must contain '{prompt}'")
        self.template = template
        self.request = {"max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": int(top_logprobs)}
        self.client = ChatClient(
            base_url, model, api_key_env, timeout, max_retries, backoff, max_concurrency=max_concurrency,
            image_format=image_format,
        )

    def __repr__(self) -> str:
        return f"VLMAlignment(template={self.template!r}, client={self.client!r})"

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        images = validate_batch("VLMAlignment", images, prompts, metadata)  # uint8 [n, H, W, 3]
        questions = [self.template.replace("{prompt}", prompt) for prompt in prompts]
        replies = self.client.complete(images, questions, **self.request)  # n reply JSONs
        probs = [yes_probability(reply) for reply in replies]
        scores = np.array([np.nan if p is None else p for p in probs], dtype=np.float32)  # float32 [n]
        return RewardOutput(scores=scores, info={"unparsed": float(sum(p is None for p in probs))})
