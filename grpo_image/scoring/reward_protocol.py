"""The reward server's wire format: a `POST /score` body into a reward's inputs, its output into the reply.

JSON only, never pickle (a body from the network must not be able to run code). Images travel as data URLs of 8-bit
RGB PNGs: lossless, so the server scores exactly the pixels the trainer decoded, and readable by any language.
Scores are JSON numbers, NaN ("not applicable") is `null` since JSON has no NaN. docs/rewards-server.md states these
rules for anyone who writes a server or a client elsewhere; a body that breaks one is refused with the HTTP status
and the reason raised here, before anything is scored.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from grpo_image.core.types import RewardOutput

PROTOCOL = 1  # GET /health reports it; a change that old clients cannot read raises it
PNG_DATA_URL = "data:image/png;base64,"
FIELDS = ("reward", "images", "prompts", "metadata")


class RequestRefused(Exception):
    """A request the server does not score: the HTTP status to answer and the reason the reply carries."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class ScoreRequest:
    """A well-formed `POST /score` body, its images decoded."""

    reward: str | None  # None: the server's only reward
    images: np.ndarray  # uint8 [n, H, W, 3]
    prompts: list[str]
    metadata: list[dict[str, Any]]


def parse_score_request(raw: bytes, max_image_pixels: int) -> ScoreRequest:
    """The body's fields checked and its images decoded; RequestRefused (400, or 413 for an image too large)."""
    try:
        body = json.loads(raw)
    except ValueError as err:  # UnicodeDecodeError is a ValueError too
        raise RequestRefused(400, f"the body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestRefused(400, f"the body must be a JSON object with fields {list(FIELDS)}")
    unknown = sorted(set(body) - set(FIELDS))
    missing = [key for key in FIELDS[1:] if key not in body]
    if unknown or missing:
        wrong = ", ".join(f"{what} fields {keys}" for what, keys in (("unknown", unknown), ("missing", missing)) if keys)
        raise RequestRefused(400, f"{wrong}; the fields are {list(FIELDS)} ('reward' may be left out)")
    reward, images, prompts, metadata = (body.get(key) for key in FIELDS)
    if reward is not None and not isinstance(reward, str):
        raise RequestRefused(400, "'reward' must be a string (a reward's name) or null")
    _check_list("images", images, str, "strings (PNG data URLs)")
    _check_list("prompts", prompts, str, "strings")
    _check_list("metadata", metadata, dict, "objects")
    if not images:
        raise RequestRefused(400, "'images' is empty: a request scores at least one image")
    if not len(images) == len(prompts) == len(metadata):
        raise RequestRefused(
            400, f"{len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata objects: one each per sample"
        )
    decoded = [decode_png(item, index, max_image_pixels) for index, item in enumerate(images)]
    sizes = sorted({image.shape[:2] for image in decoded})
    if len(sizes) > 1:
        raise RequestRefused(400, f"the images of one request must share one size (height, width), got {sizes}")
    return ScoreRequest(reward, np.stack(decoded), prompts, metadata)  # images uint8 [n, H, W, 3]


def decode_png(item: str, index: int, max_image_pixels: int) -> np.ndarray:
    """One `data:image/png;base64,...` string -> uint8 [H, W, 3]; RequestRefused naming `images[index]` otherwise."""
    where = f"images[{index}]"
    if not item.startswith(PNG_DATA_URL):
        raise RequestRefused(400, f"{where} is not a PNG data URL ({PNG_DATA_URL}...)")
    try:
        data = base64.b64decode(item[len(PNG_DATA_URL):], validate=True)
    except binascii.Error as err:
        raise RequestRefused(400, f"{where}: invalid base64: {err}") from None
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.width * image.height > max_image_pixels:  # read from the header, before any pixel is decoded
                raise RequestRefused(
                    413, f"{where} is {image.width}x{image.height} px, more than the server's {max_image_pixels} pixels"
                )
            if image.mode != "RGB":
                raise RequestRefused(400, f"{where} is a PNG of mode {image.mode}; the protocol takes 8-bit RGB")
            return np.asarray(image)  # uint8 [H, W, 3]
    except RequestRefused:
        raise
    except (OSError, SyntaxError, ValueError) as err:  # what Pillow raises for a file it cannot read
        raise RequestRefused(400, f"{where} does not decode as a PNG: {err}") from None


def score_reply(name: str, output: Any, n: int) -> bytes:
    """The 200 reply for a reward's output on n samples; RequestRefused(422) for an output that breaks the contract.

    An infinite score is a fault of the reward (core/types.py: only NaN has a meaning), and JSON could not carry it.
    """
    if not isinstance(output, RewardOutput) or output.scores.shape != (n,):
        shape = getattr(getattr(output, "scores", None), "shape", None)
        raise RequestRefused(
            422, f"reward '{name}' returned {type(output).__name__} with scores of shape {shape}, not RewardOutput ({n},)"
        )
    infinite = np.flatnonzero(np.isinf(output.scores))
    if infinite.size:
        raise RequestRefused(422, f"reward '{name}' returned an infinite score for images[{int(infinite[0])}]")
    info = {str(key): float(value) for key, value in output.info.items()}
    if not all(math.isfinite(value) for value in info.values()):
        raise RequestRefused(422, f"reward '{name}' returned a non-finite info value: {info}")
    scores = [None if math.isnan(score) else score for score in output.scores.tolist()]  # float32 -> exact doubles
    return json.dumps({"reward": name, "scores": scores, "info": info}, allow_nan=False).encode()


def _check_list(key: str, value: Any, kind: type, what: str) -> None:
    if not isinstance(value, list) or not all(isinstance(item, kind) for item in value):
        raise RequestRefused(400, f"'{key}' must be a list of {what}")
