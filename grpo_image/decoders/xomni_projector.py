"""X-Omni's code -> feature projector (the decode half of `VQConvProjector` in `modeling_siglip_tokenizer.py`).

The X-Omni image decoder is conditioned on SigLIP-like features rebuilt from the LM's image codes: each code
picks its codebook row (raw, not L2-normalised: the encoder normalises for its nearest-neighbour search, decode
does not), a 1x1 conv widens the rows from the codebook width to the feature width z, and two pre-activation
residual blocks (GroupNorm(32) -> exact GELU -> 3x3 conv, twice) mix neighbouring codes. The residual blocks are
diffusers' `ResnetBlock2D` without a time embedding, which computes exactly that and has the same parameter
names (`norm1`, `conv1`, `norm2`, `conv2`). The encoder-only `quant_conv` is kept so the saved state dict loads
strictly, as upstream loads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers.models.resnet import ResnetBlock2D
from safetensors.torch import load_file
from torch import nn


class XOmniProjector(nn.Module):
    """Image codes on an (h, w) grid -> features [n, h*w, z], one per code, row-major (h outer)."""

    def __init__(self, z_channels: int, codebook_size: int, codebook_dim: int, conv_layers: int = 2) -> None:
        super().__init__()
        self.z_channels = z_channels
        self.codebook_size = codebook_size
        self.quant_conv = nn.Conv2d(z_channels, codebook_dim, 1)  # encoder side only; present in the weights file
        self.quantize = nn.ModuleDict({"embedding": nn.Embedding(codebook_size, codebook_dim)})
        self.post_quant_conv = nn.Conv2d(codebook_dim, z_channels, 1)
        self.post_conv = nn.ModuleList(
            ResnetBlock2D(
                in_channels=z_channels,
                temb_channels=None,
                groups=32,
                eps=1e-5,
                non_linearity="gelu",  # exact (erf) GELU, as upstream
            )
            for _ in range(conv_layers)
        )

    def forward(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """codes int64 [n, L] with L = h*w, values in [0, codebook_size) -> features [n, L, z]."""
        h, w = grid
        n, length = codes.shape
        if length != h * w:
            raise ValueError(f"XOmniProjector: codes have L={length} but grid {h}x{w} needs {h * w}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"XOmniProjector: codes must be in [0, {self.codebook_size}), "
                f"got [{int(codes.min())}, {int(codes.max())}]"
            )
        rows = self.quantize["embedding"](codes)  # [n, L, cd], raw codebook rows
        x = rows.view(n, h, w, -1).permute(0, 3, 1, 2).contiguous()  # [n, cd, h, w]
        x = self.post_quant_conv(x)  # [n, z, h, w]
        for block in self.post_conv:
            x = block(x, None)  # [n, z, h, w]
        return x.reshape(n, self.z_channels, h * w).transpose(1, 2)  # [n, L, z]

    @classmethod
    def from_file(cls, path: str | Path, config: str | Path | dict | None = None) -> XOmniProjector:
        """Load the projector weights (`.safetensors`, or X-Omni's torch-saved `.pt`/`.bin`), strictly.

        The sizes are read off the weights; `config` (a projector_config.json path, or X-Omni's
        `vision_config.encoder` dict), when given, must agree with them.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: X-Omni projector weights not found")
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            z, cd = state["post_quant_conv.weight"].shape[:2]
            size = state["quantize.embedding.weight"].shape[0]
        except KeyError as err:
            raise ValueError(f"{path}: not an X-Omni projector state dict (no {err}); keys: {sorted(state)[:8]}...")
        layers = len({m.group(1) for k in state if (m := re.match(r"post_conv\.(\d+)\.", k))})
        if config is not None:
            cfg = json.loads(Path(config).read_text()) if not isinstance(config, dict) else config
            found = {"z_channels": z, "codebook_size": size, "codebook_dim": cd, "conv_layers": layers}
            wrong = {k: (cfg[k], v) for k, v in found.items() if k in cfg and cfg[k] != v}
            if wrong:
                raise ValueError(f"{path}: weights disagree with config {config} (config, weights): {wrong}")
        model = cls(int(z), int(size), int(cd), layers)
        model.load_state_dict(state, strict=True)
        return model.eval().requires_grad_(False)
