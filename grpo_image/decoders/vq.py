"""Janus-Pro's VQ decoder behind the `Decoder` protocol: codes [n, 576] -> uint8 RGB [n, 384, 384, 3].

The decode is transformers' `JanusVQVAE.decode` (normalised codebook rows -> post-quant conv -> conv decoder),
whose output lies in [-1, 1]; it becomes uint8 exactly as DeepSeek's `generation_inference.py` does it:
`clip((x + 1) / 2 * 255, 0, 255)` in float32, then truncated by the cast to uint8. A VQ decoder draws no
randomness, so the seeds are validated (the contract) and otherwise unused: the image is a function of the codes.

A reward worker needs only the VQ part of a Janus checkpoint, so a folder is read for the `model.vqmodel.*`
tensors alone (about 70M parameters), never the language model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

VQ_PREFIX = "model.vqmodel."  # where transformers-format Janus checkpoints keep the VQ model's weights


def load_janus_vq(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The JanusVQVAE of a transformers-format Janus folder, built from its config and its `model.vqmodel.*` tensors."""
    from safetensors import safe_open
    from transformers import JanusConfig, JanusVQVAE

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"JanusVQDecoder: no Janus checkpoint (config.json) in {folder}")
    vq_config = JanusConfig.from_pretrained(folder).vq_config  # num_patches set from the vision config
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({file for key, file in weight_map.items() if key.startswith(VQ_PREFIX)})
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
    state = {}
    for file in files:
        with safe_open(folder / file, "pt") as weights:
            for key in weights.keys():
                if key.startswith(VQ_PREFIX):
                    state[key.removeprefix(VQ_PREFIX)] = weights.get_tensor(key).to(dtype)
    if not state:
        raise ValueError(f"JanusVQDecoder: {folder} holds no {VQ_PREFIX}* safetensors weights (a transformers-format "
                         "Janus checkpoint such as deepseek-community/Janus-Pro-7B is needed)")  # fmt: skip
    with torch.device("meta"):
        vq = JanusVQVAE(vq_config)
    missing = set(vq.state_dict()) - set(state)
    if missing:
        example = VQ_PREFIX + sorted(missing)[0]
        raise ValueError(f"JanusVQDecoder: {folder} lacks {len(missing)} VQ weights, e.g. {example}")
    vq.load_state_dict(state, strict=True, assign=True)
    return vq.eval()


def _vq_module(source) -> nn.Module:
    """Accept a JanusVQVAE, a JanusModel or a JanusForConditionalGeneration (the VQ inside it)."""
    for attribute in ("model", "vqmodel"):
        if hasattr(source, attribute) and not hasattr(source, "quantize"):
            source = getattr(source, attribute)
    if not (hasattr(source, "quantize") and hasattr(source, "decode")):
        kind = type(source).__name__
        raise TypeError(f"JanusVQDecoder: expected a Janus folder or a Janus / JanusVQVAE model, got {kind}")
    return source


class JanusVQDecoder:
    """Janus's VQ decode, batched: codes int [n, L] on a (side, side) grid -> uint8 RGB [n, 16 side, 16 side, 3].

    `path_or_model`: a transformers-format Janus folder (only its VQ tensors are read) or a loaded Janus /
    JanusVQVAE model (shared, not copied). `dtype` defaults to bfloat16 on GPU (as Janus runs) and float32 on
    CPU; `max_batch_size` caps the images per decoder call (the output does not depend on it).
    """

    def __init__(
        self, path_or_model, dtype: str | None = None, device: str | None = None, max_batch_size: int | None = 8
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        name = dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        self.dtype = getattr(torch, str(name).removeprefix("torch."))
        if isinstance(path_or_model, (str, Path)):
            vq = load_janus_vq(path_or_model, self.dtype)
        else:
            vq = _vq_module(path_or_model)
        self.vq = vq.to(self.device, self.dtype).eval()
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"JanusVQDecoder: max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.side = int(self.vq.quantize.quant_state_dims[0])  # codes per image side: 24 for Janus-Pro
        self.num_codes = int(self.vq.config.num_embeddings)  # V: 16,384 for Janus-Pro

    def __call__(self, codes: np.ndarray, grid: tuple[int, int], seeds: np.ndarray) -> np.ndarray:
        """codes int [n, L] (row-major), grid (h, w), seeds int64 [n] (unused: deterministic) -> uint8 [n, H, W, 3]."""
        codes = np.asarray(codes)  # int [n, L]
        seeds = np.asarray(seeds)  # int64 [n]
        if tuple(grid) != (self.side, self.side):
            raise ValueError(f"JanusVQDecoder: this VQ decodes a {self.side}x{self.side} grid only, got {tuple(grid)}")
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer) or codes.shape[1] != self.side**2:
            raise ValueError(
                f"JanusVQDecoder: codes must be integer [n, {self.side**2}], got {codes.dtype} {codes.shape}"
            )
        n = codes.shape[0]
        if seeds.shape != (n,):
            raise ValueError(f"JanusVQDecoder: seeds must have shape ({n},), got {seeds.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(
                f"JanusVQDecoder: codes must lie in [0, {self.num_codes}), got [{codes.min()}, {codes.max()}]"
            )
        step = self.max_batch_size or max(n, 1)
        images = [self.decode(torch.as_tensor(codes[s : s + step], dtype=torch.long)) for s in range(0, n, step)]
        if not images:
            size = self.side * 2 ** (len(self.vq.config.channel_multiplier) - 1)
            return np.zeros((0, size, size, 3), dtype=np.uint8)
        return np.concatenate(images)  # uint8 [n, H, W, 3]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """One decoder call: codes int64 [m, L] -> uint8 [m, H, W, 3]."""
        pixels = self.vq.decode(codes.to(self.device))  # [m, 3, H, W] in [-1, 1]
        return to_uint8(pixels)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Janus's conversion: float32 [m, 3, H, W] in [-1, 1] -> clip((x + 1) / 2 * 255), truncated -> uint8 [m, H, W, 3]

    Truncation, not rounding, because DeepSeek's script assigns the clipped floats into a uint8 numpy array.
    """
    images = pixels.float().permute(0, 2, 3, 1)  # [m, H, W, 3]
    return ((images + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).cpu().numpy()
