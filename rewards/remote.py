"""A reward scored by a reward server: `grpo-image serve-reward`, or any server that speaks docs/rewards-server.md.

A heavy scorer (a 7B judge, a GenEval detector in an environment of its own) runs on another node; the recipe names
this class in its place with the server's address, and the run's `name`, `weight` and `required` apply as to any
reward. The client behaves as the judge rewards' client (`_chat.py`) does: at most `max_concurrency` requests in
flight, a timeout per attempt, retries with exponential backoff on 408, 429, 5xx, refused or dropped connections and
read timeouts (urllib3's `Retry`, which honours `Retry-After`), a bearer token read from the environment at request
time and never stored. A request that still fails raises, naming the server, the samples and the server's reason,
so a required reward stops the step and an optional one scores NaN. A refusal (4xx: a malformed or oversized
request, a reward that failed on its input) is not retried: sent again, it would fail again.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._chat import post_answered, retrying_session
from rewards._image import to_data_url, validate_batch
from rewards._rebuild import RebuildOnUnpickle


class RemoteRewardError(RuntimeError):
    """A request failed after its retries, was refused, or was answered with something that is not a score reply."""


class RemoteReward(RebuildOnUnpickle):
    """POST the images (as PNG), prompts and metadata to `{base_url}/score`; the server's scores and info come back.

    base_url: the server's address, e.g. "http://scorer-node:8600". reward: the served reward's name (None: the
    server's only reward). timeout: seconds per attempt (connect and read; a reward on a slow model needs its time
    per batch). max_retries: extra attempts after the first. backoff: urllib3's exponential backoff factor in seconds
    (backoff * 2 ** (retry - 1), at most backoff_max). token_env: the name of the environment variable holding the
    server's bearer token (None: no token). max_concurrency: requests in flight at once from this instance.
    batch_size: images per request; a call's images are split into requests of at most this many (a server bounds
    the size of a request: 64 MiB by default, eight 1152 px PNGs with room to spare).
    """

    @staticmethod
    def gpu_parameters(**_: Any) -> int:
        """Nothing on the worker's GPU: the model lives on the server."""
        return 0

    def __init__(
        self,
        base_url: str,
        reward: str | None = None,
        timeout: float = 300.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        token_env: str | None = None,
        max_concurrency: int = 4,
        batch_size: int = 8,
    ) -> None:
        if not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward: base_url must start with http:// or https://, got {base_url!r}")
        if max_concurrency < 1 or batch_size < 1 or max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError(
                "RemoteReward: need max_concurrency >= 1, batch_size >= 1, max_retries >= 0, timeout > 0, backoff >= 0"
            )
        self._init_args = dict(
            base_url=base_url, reward=reward, timeout=timeout, max_retries=max_retries, backoff=backoff,
            backoff_max=backoff_max, token_env=token_env, max_concurrency=max_concurrency, batch_size=batch_size,
        )  # what a pickle holds: the token variable's name, never its value
        self.url = f"{str(base_url).rstrip('/')}/score"
        self.reward = reward
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.token_env = token_env
        self.max_concurrency = int(max_concurrency)
        self.batch_size = int(batch_size)

    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, reward={self.reward!r}, token_env={self.token_env!r})"

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        images = validate_batch("RemoteReward", images, prompts, metadata)  # uint8 [n, H, W, 3]
        starts = list(range(0, len(images), self.batch_size))
        if not starts:
            return RewardOutput(np.zeros(0, dtype=np.float32))
        headers = {"Content-Type": "application/json", **self._authorization()}
        with retrying_session(self.max_retries, self.backoff, self.backoff_max,
                              min(self.max_concurrency, len(starts))) as session:

            def one(start: int) -> tuple[np.ndarray, dict[str, float]]:
                stop = min(start + self.batch_size, len(images))
                body = {
                    "reward": self.reward,
                    "images": [to_data_url(image, "png") for image in images[start:stop]],
                    "prompts": list(prompts[start:stop]),
                    "metadata": list(metadata[start:stop]),
                }
                return self._post(session, headers, body, start, stop)

            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(starts))) as pool:
                parts = list(pool.map(one, starts))
        info: dict[str, float] = {}
        for _, part_info in parts:
            for key, value in part_info.items():
                info[key] = info.get(key, 0.0) + value  # counts per call, summed as the reward pool sums them
        return RewardOutput(np.concatenate([scores for scores, _ in parts]), info)  # float32 [n]

    def _post(self, session: Any, headers: dict, body: dict, start: int, stop: int) -> tuple[np.ndarray, dict]:
        where = f"samples {start}..{stop - 1}: {self.url}"
        try:
            data = json.dumps(body, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise RemoteRewardError(f"{where}: the metadata does not encode as JSON: {err}") from None
        response = post_answered(session, self.url, where=where, error=RemoteRewardError, timeout=self.timeout,
                                 max_retries=self.max_retries, reason=_reason, data=data, headers=headers)
        try:
            reply = response.json()
            scores = [np.nan if score is None else float(score) for score in reply["scores"]]
            info = {str(key): float(value) for key, value in reply.get("info", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise RemoteRewardError(f"{where} did not answer a score reply ({err!r}): {response.text[:300]!r}") from None
        if len(scores) != stop - start:
            raise RemoteRewardError(f"{where} answered {len(scores)} scores for {stop - start} images")
        return np.asarray(scores, dtype=np.float32), info  # float32 [stop - start]

    def _authorization(self) -> dict[str, str]:
        if self.token_env is None:
            return {}
        token = os.environ.get(self.token_env)
        if not token:
            raise RemoteRewardError(f"the environment variable {self.token_env!r} (token_env) is not set or empty")
        return {"Authorization": f"Bearer {token}"}


def _reason(response: Any) -> str:
    """The `error` of a JSON refusal, else the start of the body."""
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return repr(response.text[:300])
