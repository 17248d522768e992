"""HPSv2 / HPSv2.1: human preference score, X-Omni's main RL reward.

HPS is open_clip's ViT-H-14 fine-tuned on human preference pairs (Wu et al., 2023); its checkpoint
(`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`, key "state_dict") replaces the whole state dict of a ViT-H-14
built without pretrained weights. The `hpsv2` package is not used: it cannot load offline and pins protobuf<4.

- score: cosine of the L2-normalised image and text features (not times the logit scale), about 0.2-0.35.
- preprocessing, as HPS evaluates: longest side to 224 (bicubic), zero-padded to a centred square, OpenAI
  mean/std (open_clip's `image_transform(resize_mode="longest", fill_color=0)`).
- checkpoint: `checkpoint` (a local path), else the hpsv2 cache folder ($HPS_ROOT, else ~/.cache/hpsv2) when it
  already holds the version's file; nothing is downloaded.
- batched; bf16 weights on GPU, fp32 on CPU. `model_name` is any open_clip model name, or
  "local-dir:/folder" holding an open_clip_config.json (how tests build a tiny model of the same class).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._image import to_pil, validate_batch
from rewards._rebuild import RebuildOnUnpickle

CHECKPOINT_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def find_checkpoint(version: str, checkpoint: str | None) -> Path:
    """The checkpoint to load: the given path, else the version's file in the hpsv2 cache folder."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"HPSv2: checkpoint {path} does not exist")
        return path
    root = Path(os.environ.get("HPS_ROOT") or Path.home() / ".cache" / "hpsv2").expanduser()
    path = root / CHECKPOINT_FILES[version]
    if not path.is_file():
        raise FileNotFoundError(
            f"HPSv2: no checkpoint given and {path} does not exist; download {CHECKPOINT_FILES[version]} "
            f"from the xswu/HPSv2 repository on the Hugging Face hub and pass its path as `checkpoint`"
        )
    return path


class HPSv2(RebuildOnUnpickle):
    """HPS score (cosine) of each image against its prompt; see the module docstring."""

    @staticmethod
    def gpu_parameters(model_name: str = "ViT-H-14", **_: Any) -> int:
        """Parameters of the open_clip model on the worker's GPU (for `grpo-image plan`), from its config alone.

        `model_name` may be "local-dir:FOLDER" (an open_clip_config.json, as the tests use).
        """
        import json

        import open_clip
        import torch

        if model_name.startswith("local-dir:"):
            config = json.loads((Path(model_name.removeprefix("local-dir:")) / "open_clip_config.json").read_text())
            config = config["model_cfg"]
        else:
            config = open_clip.get_model_config(model_name)
            if config is None:
                raise ValueError(f"HPSv2: model_name {model_name!r} is not an open_clip model")
        with torch.device("meta"):
            return sum(p.numel() for p in open_clip.CLIP(**config).parameters())

    def __init__(
        self,
        version: str = "v2.1",
        checkpoint: str | None = None,
        model_name: str = "ViT-H-14",
        device: str | None = None,
        batch_size: int = 16,
    ) -> None:
        import open_clip
        import torch

        if version not in CHECKPOINT_FILES:
            raise ValueError(f"HPSv2: version must be one of {sorted(CHECKPOINT_FILES)}, got {version!r}")
        self._init_args = dict(
            version=version, checkpoint=checkpoint, model_name=model_name, device=device, batch_size=batch_size
        )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = int(batch_size)
        self.checkpoint_path = find_checkpoint(version, checkpoint)
        self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        model = open_clip.create_model(model_name)  # random init, fp32 on CPU: every weight is replaced next
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "state_dict" not in state:
            raise ValueError(f"HPSv2: {self.checkpoint_path} has no 'state_dict' key")
        model.load_state_dict(state["state_dict"])
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.preprocess = open_clip.image_transform(
            model.visual.image_size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
            std=open_clip.OPENAI_DATASET_STD, resize_mode="longest", interpolation="bicubic", fill_color=0,
        )

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        import torch
        import torch.nn.functional as F

        images = validate_batch("HPSv2", images, prompts, metadata)  # uint8 [n, H, W, 3]
        scores = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            pixels = torch.stack([self.preprocess(im) for im in to_pil(images[start:stop])])  # [b, 3, 224, 224]
            tokens = self.tokenizer(list(prompts[start:stop])).to(self.device)  # int64 [b, 77]
            with torch.no_grad():
                image_features = self.model.encode_image(pixels.to(self.device, self.dtype)).float()  # [b, D]
                text_features = self.model.encode_text(tokens).float()  # [b, D]
            cosine = (F.normalize(image_features, dim=-1) * F.normalize(text_features, dim=-1)).sum(-1)  # [b]
            scores.append(cosine.cpu())
        return RewardOutput(scores=torch.cat(scores).numpy())
