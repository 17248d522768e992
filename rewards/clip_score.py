"""CLIPScore: image-prompt cosine similarity under a CLIP model (Hessel et al., 2021).

The oldest and cheapest alignment signal, and a useful floor in ablations: `w * max(cos, 0)` with w = 2.5 as in
the paper, where cos is the cosine of the L2-normalised CLIP image and text embeddings. It saturates early and
rewards keyword presence more than composition, so it is a weak reward on its own; VLMAlignment is the stronger
alignment signal when a judge server is available.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._clip import clip_parameters, CLIPEncoder
from rewards._image import validate_batch


class CLIPScore:
    """`weight * max(cos(image, prompt), 0)` in [0, weight], with a transformers CLIP model.

    model_path: a local CLIPModel folder (e.g. a copy of openai/clip-vit-large-patch14), or a hub id when online.
    processor_path: where the processor lives when the model folder has none.
    """

    @staticmethod
    def gpu_parameters(model_path: str, **_: Any) -> int:
        """Parameters this reward holds on its worker's GPU (for `grpo-image plan`), from the model's config."""
        return clip_parameters(model_path)

    def __init__(
        self,
        model_path: str,
        processor_path: str | None = None,
        weight: float = 2.5,
        device: str | None = None,
        batch_size: int = 32,
    ) -> None:
        self.weight = float(weight)
        self.encoder = CLIPEncoder(model_path, processor_path, device, batch_size)

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        images = validate_batch("CLIPScore", images, prompts, metadata)  # uint8 [n, H, W, 3]
        cosine = (self.encoder.images(images) * self.encoder.texts(prompts)).sum(-1)  # float32 [n]
        return RewardOutput(scores=(self.weight * cosine.clamp(min=0)).numpy())
