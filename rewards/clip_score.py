"""CLIPScore: image-prompt cosine similarity under a CLIP model (Hessel et al., 2021).

The oldest and cheapest alignment signal, and a useful floor in ablations: `w * max(cos, 0)` with w = 2.5 as in
the paper, where cos is the cosine of the L2-normalised CLIP image and text embeddings. As in the reference
(jmhessel/clipscore, clipscore.py), the text is the prompt after the prefix "A photo depicts " (a space is added to
a prefix that lacks one; `prefix: ""` for none): the prefix changes the cosine itself. Precision as the reference
runs: float16 on a GPU (the paper's numbers), float32 on the CPU. It saturates early and rewards keyword presence
more than composition, so it is a weak reward on its own; VLMAlignment is the stronger alignment signal when a
judge server is available.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._clip import clip_parameters, CLIPEncoder, resolve_device
from rewards._image import validate_batch

HESSEL_PREFIX = "A photo depicts"


class CLIPScore:
    """`weight * max(cos(image, prefix + prompt), 0)` in [0, weight], with a transformers CLIP model.

    model_path: a local CLIPModel folder (e.g. a copy of openai/clip-vit-large-patch14), or a hub id when online.
    processor_path: where the processor lives when the model folder has none. dtype: None for the reference's
    (float16 on CUDA, float32 elsewhere), else "float32", "bfloat16" or "float16".
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
        prefix: str = HESSEL_PREFIX,
        dtype: str | None = None,
    ) -> None:
        self.weight = float(weight)
        self.prefix = prefix if not prefix or prefix.endswith(" ") else prefix + " "  # the reference's rule
        if dtype is None:
            dtype = "float16" if resolve_device(device).startswith("cuda") else "float32"
        self.encoder = CLIPEncoder(model_path, processor_path, device, batch_size, dtype)

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        images = validate_batch("CLIPScore", images, prompts, metadata)  # uint8 [n, H, W, 3]
        texts = [self.prefix + prompt for prompt in prompts]
        cosine = (self.encoder.images(images) * self.encoder.texts(texts)).sum(-1)  # float32 [n]
        return RewardOutput(scores=(self.weight * cosine.clamp(min=0)).numpy())
