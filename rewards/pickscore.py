"""PickScore: a CLIP-H model fine-tuned on Pick-a-Pic human preferences (Kirstain et al., 2023).

Score = logit_scale.exp() * cosine(image, prompt), exactly the logit the model was trained to rank with
(about 18-24 for typical images with the released weights; differences of a fraction of a point are meaningful).
Raw, not divided by a constant: the recipe's weight sets its scale against other rewards.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._clip import clip_parameters, CLIPEncoder
from rewards._image import validate_batch


class PickScore:
    """`logit_scale.exp() * cos(image, prompt)` with the PickScore CLIPModel.

    model_path: a local copy of yuvalkirstain/PickScore_v1 (or a hub id when online). processor_path: its
    processor, laion/CLIP-ViT-H-14-laion2B-s32B-b79K in the original code; defaults to model_path. dtype: float32,
    as flow_grpo's PickScoreScorer runs it; "bfloat16" halves the memory.
    """

    @staticmethod
    def gpu_parameters(model_path: str, **_: Any) -> int:
        """Parameters this reward holds on its worker's GPU (for `grpo-image plan`), from the model's config."""
        return clip_parameters(model_path)

    def __init__(
        self,
        model_path: str,
        processor_path: str | None = None,
        device: str | None = None,
        batch_size: int = 32,
        dtype: str = "float32",
    ) -> None:
        self.encoder = CLIPEncoder(model_path, processor_path, device, batch_size, dtype)

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        images = validate_batch("PickScore", images, prompts, metadata)  # uint8 [n, H, W, 3]
        cosine = (self.encoder.images(images) * self.encoder.texts(prompts)).sum(-1)  # float32 [n]
        return RewardOutput(scores=(self.encoder.logit_scale * cosine).numpy())
