"""A transformers CLIP model and its processor, returning L2-normalised embeddings: shared by CLIPScore, PickScore
and Aesthetic, which differ only in what they do with the embeddings.

Works with transformers 4 (`get_*_features` return tensors) and 5 (they return output objects whose
`pooler_output` is the projected embedding). Batched. Precision is each reward's `dtype` ("float32", "bfloat16",
"float16"), by default its reference's: a score a fraction of a point off its reference (PickScore's scale is about
21) is a different reward.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rewards._image import to_pil
from rewards._rebuild import RebuildOnUnpickle


DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def torch_dtype(name: str) -> Any:
    """"float32" / "bfloat16" / "float16" -> the torch dtype; ValueError naming the choices otherwise."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)


def features(output: Any) -> Any:
    """A `get_*_features` result as a tensor [n, D]: transformers 5 wraps it in an output object."""
    return output if hasattr(output, "dim") else output.pooler_output


def clip_parameters(model_path: str) -> int:
    """Parameters of the transformers CLIP model in `model_path`, counted from its config alone (meta device)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig.from_pretrained(model_path)
    with torch.device("meta"):
        return sum(p.numel() for p in CLIPModel(config).parameters())


class CLIPEncoder(RebuildOnUnpickle):
    """CLIPModel + processor from `model_path` (a local folder, or a hub id when online); processor from
    `processor_path` when the model folder has none (PickScore's weights use the LAION ViT-H-14 processor).
    Weights and compute in `dtype` (a name of DTYPES); embeddings come back in float32."""

    def __init__(
        self,
        model_path: str,
        processor_path: str | None = None,
        device: str | None = None,
        batch_size: int = 32,
        dtype: str = "float32",
    ) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self._init_args = dict(
            model_path=model_path, processor_path=processor_path, device=device, batch_size=batch_size, dtype=dtype
        )
        self.device = resolve_device(device)
        self.dtype = torch_dtype(dtype)
        self.batch_size = int(batch_size)
        self.model = CLIPModel.from_pretrained(str(model_path), dtype=self.dtype).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(processor_path or model_path))
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp())

    def images(self, images: np.ndarray) -> Any:
        """uint8 RGB [n, H, W, 3] -> float32 [n, D], unit norm."""
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=to_pil(images[start : start + self.batch_size]), return_tensors="pt")
            pixel_values = pixels["pixel_values"].to(self.device, self.dtype)  # [b, 3, S, S]
            with torch.no_grad():
                out.append(features(self.model.get_image_features(pixel_values=pixel_values)).float())  # [b, D]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()  # [n, D]

    def texts(self, texts: list[str]) -> Any:
        """n strings -> float32 [n, D], unit norm (truncated to the model's context length)."""
        import torch

        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.processor(
                text=list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(self.device)  # input_ids, attention_mask [b, T]
            with torch.no_grad():
                out.append(features(self.model.get_text_features(**tokens)).float())  # [b, D]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()  # [n, D]
