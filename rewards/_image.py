"""Image conversions shared by reward plugins: the only place they live.

Every boundary passes images as uint8 RGB numpy [n, H, W, 3]; rewards validate that here, once, with a clear
message, instead of each plugin guessing at float ranges or channel orders.
"""

from __future__ import annotations

import base64
import io
import numbers
import re
from typing import Any

import numpy as np
from PIL import Image

_HEX = re.compile(r"#[0-9A-Fa-f]{6}")


def as_uint8_images(images: Any) -> np.ndarray:
    """Return `images` as a uint8 RGB array [n, H, W, 3]; raise ValueError on any other dtype or shape.

    Nothing is rescaled or cast: a float image here is a bug upstream, and guessing its range would hide it.
    """
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8 RGB [n, H, W, 3], got dtype {array.dtype}")
    if array.ndim != 4 or array.shape[-1] != 3 or 0 in array.shape[1:3]:
        raise ValueError(f"images must be uint8 RGB [n, H, W, 3] with H, W >= 1, got shape {array.shape}")
    return array


def to_pil(images: Any) -> list[Image.Image]:
    """uint8 RGB [n, H, W, 3] -> n PIL RGB images (for encoders and models that take PIL)."""
    return [Image.fromarray(image) for image in as_uint8_images(images)]


def parse_rgb(value: Any) -> tuple[int, int, int]:
    """Parse "#RRGGBB" or a sequence of 3 ints in 0..255 into an (r, g, b) tuple; ValueError otherwise."""
    if isinstance(value, str):
        if not _HEX.fullmatch(value):
            raise ValueError(f"colour string must be '#RRGGBB', got {value!r}")
        return tuple(int(value[k : k + 2], 16) for k in (1, 3, 5))  # type: ignore[return-value]
    if (
        isinstance(value, (list, tuple, np.ndarray))
        and len(value) == 3
        and all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)
    ):
        return tuple(int(c) for c in value)  # type: ignore[return-value]
    raise ValueError(f"colour must be '#RRGGBB' or 3 ints in 0..255, got {value!r}")


def to_data_url(
    image: np.ndarray, image_format: str = "png", quality: int = 95, size: tuple[int, int] | None = None
) -> str:
    """One uint8 RGB image [H, W, 3] -> a `data:image/...;base64,...` URL, the form chat-completions servers take.

    PNG is lossless (a judge sees exactly the pixels that were scored); JPEG at `quality` is what some reference
    clients send (UnifiedReward-2.0's: quality 95). `size` (W, H) first resizes with PIL's bicubic filter, the
    default of `Image.resize` that flow_grpo's UnifiedReward client relies on (512x512); None keeps the image as is.
    """
    fmt = image_format.lower()
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    pil = to_pil(np.asarray(image)[None])[0]
    if size is not None:
        pil = pil.resize((int(size[0]), int(size[1])), Image.BICUBIC)
    buffer = io.BytesIO()
    if fmt == "jpeg":
        pil.save(buffer, format="JPEG", quality=int(quality))
    else:
        pil.save(buffer, format="PNG")
    return f"data:image/{fmt};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def validate_batch(name: str, images: Any, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray:
    """Check a reward's inputs once: uint8 RGB images [n, H, W, 3] and n prompts and n metadata dicts."""
    array = as_uint8_images(images)  # uint8 [n, H, W, 3]
    if len(prompts) != len(array) or len(metadata) != len(array):
        raise ValueError(
            f"{name}: {len(array)} images but {len(prompts)} prompts and {len(metadata)} metadata entries"
        )
    return array
