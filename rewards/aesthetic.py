"""Aesthetic: the LAION aesthetic predictor, a small head on CLIP ViT-L/14 image embeddings.

A prompt-free quality signal (how much people like the look of an image, on the AVA-style 1-10 scale) that
DDPO and flow_grpo use as a sanity reward. The head takes the L2-normalised CLIP ViT-L/14 image embedding
(OpenAI weights; 768-d) and is either LAION's linear head (`sa_0_4_vit_l_14_linear.pth`: keys weight [1, 768],
bias [1]) or the "improved" MLP (`sac+logos+ava1-l14-linearMSE.pth`: keys layers.{0,2,4,6,7}.*), detected from
the file's keys. The file is read with torch.load(weights_only=True), or as safetensors by its extension.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._clip import clip_parameters, CLIPEncoder
from rewards._image import validate_batch
from rewards._rebuild import RebuildOnUnpickle


def load_head(path: str) -> Any:
    """The head module for a LAION head file (linear or improved MLP), in eval mode."""
    import torch
    from torch import nn

    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    if set(state) == {"weight", "bias"}:
        head = nn.Linear(state["weight"].shape[1], 1)
    elif "layers.0.weight" in state:
        dim = state["layers.0.weight"].shape[1]
        head = nn.Sequential(  # the improved-aesthetic-predictor MLP; dropout is inactive in eval mode
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )
        state = {k.removeprefix("layers."): v for k, v in state.items()}
    else:
        raise ValueError(f"Aesthetic: {path} is neither a linear head (weight, bias) nor the MLP (layers.*)")
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval()


class Aesthetic(RebuildOnUnpickle):
    """Predicted aesthetic rating (about 1-10; typical images score 4-7) from a CLIP ViT-L/14 image embedding.

    model_path: a local copy of openai/clip-vit-large-patch14 (or a hub id when online). head_path: the head file.
    dtype: the CLIP model's precision, float32 as DDPO's and flow_grpo's AestheticScorer run it (the head is fp32).
    """

    @staticmethod
    def gpu_parameters(model_path: str, **_: Any) -> int:
        """Parameters this reward holds on its worker's GPU (for `grpo-image plan`), from the model's config."""
        return clip_parameters(model_path)

    def __init__(
        self, model_path: str, head_path: str, device: str | None = None, batch_size: int = 32, dtype: str = "float32"
    ) -> None:
        self._init_args = dict(
            model_path=model_path, head_path=head_path, device=device, batch_size=batch_size, dtype=dtype
        )
        self.encoder = CLIPEncoder(model_path, None, device, batch_size, dtype)
        self.head = load_head(head_path)

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        import torch

        images = validate_batch("Aesthetic", images, prompts, metadata)  # uint8 [n, H, W, 3]
        with torch.no_grad():
            scores = self.head(self.encoder.images(images))[:, 0]  # float32 [n]
        return RewardOutput(scores=scores.numpy())
