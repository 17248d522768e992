"""Decoders: image codes [n, L] on an (h, w) grid -> uint8 RGB images [n, H, W, 3].

`decode_images` is the one way the rest of the library calls a decoder (reward workers, `sample`, `eval`), so
that a decoder conditioned on text (X-Omni's English decoder) gets the prompts on every path.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np


def takes_prompts(decoder) -> bool:
    """Whether a decoder's images depend on the prompt: its `__call__` has a `prompts` parameter."""
    return "prompts" in inspect.signature(decoder.__call__).parameters


def decode_images(
    decoder, codes: np.ndarray, grid: tuple[int, int], seeds: np.ndarray, prompts: Sequence[str]
) -> np.ndarray:
    """codes int64 [n, L], seeds int64 [n], n prompts -> uint8 [n, H, W, 3]; prompts go to decoders that take them."""
    extra = {"prompts": list(prompts)} if takes_prompts(decoder) else {}
    return decoder(codes, grid, seeds, **extra)
