"""A reward that takes a fixed time, for bench/pipeline.py.

It lives in its own package folder so that the Ray pool can ship it to its workers (`workers.py_modules`), and so
that the trainer's own process imports it as `bench_rewards` when a benchmark runs as `python bench/pipeline.py`
(the script's folder is first on sys.path).
"""

from __future__ import annotations

import time

import numpy as np

from grpo_image.core.types import RewardOutput


class FixedTimeReward:
    """Scores each image by its mean red channel in [0, 1], after taking `seconds` per call.

    `busy=False` sleeps (a reward computed elsewhere: a GPU, a judge server), `busy=True` spins on this CPU for the
    same wall time (a reward that competes with the trainer for the cores).
    """

    def __init__(self, seconds: float = 1.0, busy: bool = False) -> None:
        self.seconds = float(seconds)
        self.busy = bool(busy)

    def __call__(self, images, prompts, metadata) -> RewardOutput:
        deadline = time.perf_counter() + self.seconds
        if self.busy:
            x = np.random.default_rng(0).random(4096)
            while time.perf_counter() < deadline:
                x = np.sqrt(x * x + 1.0) - 0.5
        else:
            time.sleep(self.seconds)
        return RewardOutput(np.asarray(images, dtype=np.float32)[..., 0].mean(axis=(1, 2)) / 255.0)
