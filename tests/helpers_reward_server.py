"""Reward servers on 127.0.0.1 for the tests: the real `RewardServer` in a thread, and two that fail on purpose.

`DiesAfter` stops listening once it has answered a number of requests, as a scoring node that crashed: the next
request finds its port closed. `Flaky` answers HTTP 500 to its first requests, `Stalls` never answers its first one
(until the test ends); both then score normally, which is what a client's retries have to get through.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from grpo_image.base.config import instantiate, load_recipe, reward_specs
from grpo_image.decoders import decode_images
from grpo_image.scoring.reward_server import RewardServer

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def serving(server: RewardServer) -> Iterator[RewardServer]:
    """Run `server` in a daemon thread for the block; shut it down after (unless it already stopped itself)."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        if thread.is_alive():
            server.shutdown()
        thread.join()


class DiesAfter(RewardServer):
    """Answers `requests` score requests, then closes its listening socket before the last reply is sent."""

    def __init__(self, rewards: dict[str, Any], requests: int, **kwargs: Any) -> None:
        super().__init__(rewards, **kwargs)
        self.left = requests

    def score(self, raw: bytes) -> bytes:
        reply = super().score(raw)
        self.left -= 1
        if self.left == 0:  # from this handler's thread: serve_forever stops and the port closes before we answer
            self.shutdown()
        return reply


class Flaky(RewardServer):
    """Answers HTTP 500 (an internal error) to its first `failures` score requests, then scores; counts the hits."""

    def __init__(self, rewards: dict[str, Any], failures: int, **kwargs: Any) -> None:
        super().__init__(rewards, **kwargs)
        self.failures = failures
        self.hits = 0

    def score(self, raw: bytes) -> bytes:
        self.hits += 1
        if self.hits <= self.failures:
            raise RuntimeError(f"planted failure {self.hits}")
        return super().score(raw)


class Stalls(RewardServer):
    """Holds its first score request until `release` is set (after the test): the client's read times out."""

    def __init__(self, rewards: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(rewards, **kwargs)
        self.release = threading.Event()
        self.hits = 0

    def score(self, raw: bytes) -> bytes:
        self.hits += 1
        if self.hits == 1:
            self.release.wait()
        return super().score(raw)


def recipe_rewards(recipe: str) -> dict[str, Any]:
    """name -> reward, built from a shipped recipe as a reward worker builds them."""
    return {spec["name"]: instantiate(spec["scorer"]) for spec in reward_specs(load_recipe(REPO / "recipes" / recipe))}


def recipe_batch(recipe: str, codes: np.ndarray, prompt_rows: list[int]) -> tuple[np.ndarray, list[str], list[dict]]:
    """Images decoded by a shipped recipe's decoder from `codes` [n, L], with the prompts of its prompt set's rows."""
    cfg = load_recipe(REPO / "recipes" / recipe)
    records = [json.loads(line) for line in (REPO / cfg.data.prompts).read_text().splitlines()]
    chosen = [records[row] for row in prompt_rows]
    prompts = [record["prompt"] for record in chosen]
    seeds = np.arange(len(codes), dtype=np.int64)  # [n]
    images = decode_images(instantiate(cfg.decoder), codes, tuple(cfg.policy.grid), seeds, prompts)  # uint8 [n, H, W, 3]
    return images, prompts, [record["metadata"] for record in chosen]
