"""Small rewards used by the worker tests: named by dotted path in configs, like a user's own reward file."""

import numpy as np

from grpo_image.types import RewardOutput


class MeanRed:
    """Mean red channel in [0, 1]: an easy number to derive by hand from palette images."""

    def __call__(self, images, prompts, metadata):
        return RewardOutput(images[..., 0].mean(axis=(1, 2)) / 255.0)


class Broken:
    def __init__(self, message: str = "model server unreachable"):
        self.message = message

    def __call__(self, images, prompts, metadata):
        raise RuntimeError(self.message)


class WrongShape:
    def __call__(self, images, prompts, metadata):
        return RewardOutput(np.zeros(len(prompts) + 1))
