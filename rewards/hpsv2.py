"""HPSv2 / HPSv2.1: human preference score, X-Omni's main RL reward.

HPS is open_clip's ViT-H-14 fine-tuned on human preference pairs (Wu et al., 2023); its checkpoint
(`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`, key "state_dict") replaces the whole state dict of a ViT-H-14
built without pretrained weights. The `hpsv2` package is not used: it cannot load offline and pins protobuf<4.

- score: cosine of the L2-normalised image and text features (not times the logit scale), about 0.2-0.35.
- preprocessing in HPS's own order (hpsv2/src/open_clip/transform.py, `image_transform(resize_longest_max=True)`):
  the uint8 image to a float tensor in [0, 1] first, then its longest side to 224 by torchvision's bicubic resize
  of that float tensor (antialiased), zero-padded to a centred square, OpenAI mean/std. Resizing the uint8 image
  first, as open_clip's PIL transform does, rounds every resized pixel to 1/255 and moves noisy images' scores.
  Where the longest side is already 224 HPS neither resizes nor pads; a non-square image is then padded here
  (HPS's ViT would fail on it).
- precision (`dtype`): "amp", HPS's own (`precision='amp'`: fp32 weights, the forward under fp16 autocast on a
  GPU, plain fp32 on the CPU), or "float32" / "bfloat16" / "float16" weights and compute.
- checkpoint: `checkpoint` (a local path), else the hpsv2 cache folder ($HPS_ROOT, else ~/.cache/hpsv2) when it
  already holds the version's file; nothing is downloaded.
- batched. `model_name` is any open_clip model name, or "local-dir:/folder" holding an open_clip_config.json (how
  tests build a tiny model of the same class).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._image import validate_batch
from rewards._rebuild import RebuildOnUnpickle

CHECKPOINT_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
DTYPES = ("amp", "float32", "bfloat16", "float16")


def hps_pixels(image: np.ndarray, size: int) -> Any:
    """One uint8 RGB image [H, W, 3] -> float32 [3, size, size], in HPS's order: to [0, 1] floats, longest side to
    `size` (bicubic on the float tensor), zero padding split as HPS splits it (the odd pixel right and bottom)."""
    import torch
    import torchvision.transforms.functional as TF
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255  # [3, H, W], as ToTensor
    height, width = x.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_size = [round(dim * scale) for dim in (height, width)]
        x = TF.resize(x, new_size, TF.InterpolationMode.BICUBIC)  # [3, h, w], torchvision's default antialias
    pad_h, pad_w = size - x.shape[1], size - x.shape[2]
    x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)  # [3, size, size]
    return TF.normalize(x, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


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
        dtype: str = "amp",
    ) -> None:
        import open_clip
        import torch

        if version not in CHECKPOINT_FILES:
            raise ValueError(f"HPSv2: version must be one of {sorted(CHECKPOINT_FILES)}, got {version!r}")
        if dtype not in DTYPES:
            raise ValueError(f"HPSv2: dtype must be one of {DTYPES}, got {dtype!r}")
        self._init_args = dict(
            version=version, checkpoint=checkpoint, model_name=model_name, device=device, batch_size=batch_size,
            dtype=dtype,
        )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = int(batch_size)
        self.checkpoint_path = find_checkpoint(version, checkpoint)
        self.autocast = dtype == "amp" and self.device.startswith("cuda")  # HPS: torch.cuda.amp.autocast(), fp16
        self.dtype = torch.float32 if dtype == "amp" else getattr(torch, dtype)
        model = open_clip.create_model(model_name)  # random init, fp32 on CPU: every weight is replaced next
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "state_dict" not in state:
            raise ValueError(f"HPSv2: {self.checkpoint_path} has no 'state_dict' key")
        model.load_state_dict(state["state_dict"])
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = model.visual.image_size
        self.image_size = int(size if isinstance(size, int) else size[0])

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        import torch

        images = validate_batch("HPSv2", images, prompts, metadata)  # uint8 [n, H, W, 3]
        scores = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            pixels = torch.stack([hps_pixels(im, self.image_size) for im in images[start:stop]])  # [b, 3, 224, 224]
            tokens = self.tokenizer(list(prompts[start:stop])).to(self.device)  # int64 [b, 77]
            amp = torch.autocast("cuda", dtype=torch.float16) if self.autocast else contextlib.nullcontext()
            with torch.no_grad(), amp:
                image_features = self.model.encode_image(pixels.to(self.device, self.dtype), normalize=True)  # [b, D]
                text_features = self.model.encode_text(tokens, normalize=True)  # [b, D]
                cosine = (image_features @ text_features.T).diagonal()  # [b], as HPS scores (under its autocast)
            scores.append(cosine.float().cpu())
        return RewardOutput(scores=torch.cat(scores).numpy())
