"""Decoding and reward scoring, behind one pool interface.

`RewardWorker` is a plain class built from configuration alone (the decoder and reward component nodes), so that
the same object can live in the trainer's process or in another process: only codes, prompts, metadata and seeds
go in, and only scores and a few small thumbnails come out. `InProcessRewardPool` runs it in the trainer's process;
it has the `submit` / `gather` shape of an asynchronous pool so that the trainer can do other work in between.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from grpo_image.config import instantiate
from grpo_image.types import RewardOutput, Rollout, ScoredBatch

THUMBNAIL_PX = 128  # longest side of a logged thumbnail: enough for a caption grid, small to ship between processes


class RewardFailure(RuntimeError):
    """A required reward failed: the message names the reward and the samples."""


@dataclass
class RewardJob:
    """Everything a worker needs to decode and score a batch: no tensors, no images, no model."""

    codes: np.ndarray  # int64 [n, L]
    grid: tuple[int, int]
    prompts: list[str]
    metadata: list[dict[str, Any]]
    decode_seeds: np.ndarray  # int64 [n]
    first_row: int  # index of this job's first sample in the whole batch, for error messages
    thumbnail_rows: list[int]  # indices local to this job


class RewardWorker:
    """Builds the decoder and the rewards from config, decodes codes to images and scores them."""

    def __init__(self, decoder_cfg: dict, reward_specs: list[dict]) -> None:
        self.decoder = instantiate(decoder_cfg)
        self.specs = reward_specs
        self.rewards = [instantiate(spec["scorer"]) for spec in reward_specs]

    def score(self, job: RewardJob) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """Returns scores float32 [n, K], thumbnails uint8 [T, h, w, 3] and NaN counts per reward."""
        images = self.decoder(job.codes, job.grid, job.decode_seeds)  # uint8 [n, H, W, 3]
        n = len(job.prompts)
        scores = np.full((n, len(self.rewards)), np.nan, dtype=np.float32)  # [n, K]
        for k, (spec, reward) in enumerate(zip(self.specs, self.rewards)):
            scores[:, k] = self._run_one(spec, reward, images, job)
        nan_counts = {spec["name"]: int(np.isnan(scores[:, k]).sum()) for k, spec in enumerate(self.specs)}
        return scores, thumbnails(images, job.thumbnail_rows), nan_counts

    @staticmethod
    def _run_one(spec: dict, reward, images: np.ndarray, job: RewardJob) -> np.ndarray:
        rows = f"samples {job.first_row}..{job.first_row + len(job.prompts) - 1}"
        try:
            output = reward(images, job.prompts, job.metadata)
        except Exception as err:
            if spec["required"]:
                raise RewardFailure(f"required reward '{spec['name']}' failed on {rows}: {err}") from err
            return np.full(len(job.prompts), np.nan, dtype=np.float32)
        if not isinstance(output, RewardOutput) or output.scores.shape != (len(job.prompts),):
            raise RewardFailure(
                f"reward '{spec['name']}' returned {type(output).__name__} with a wrong shape on {rows}; "
                f"expected RewardOutput with scores of shape ({len(job.prompts)},)"
            )
        return output.scores


def thumbnails(images: np.ndarray, rows: list[int]) -> np.ndarray:
    """Nearest-neighbour downscale of the chosen images to at most THUMBNAIL_PX on the longer side."""
    picked = images[rows]  # [T, H, W, 3]
    step = max(1, math.ceil(max(images.shape[1:3]) / THUMBNAIL_PX))
    return np.ascontiguousarray(picked[:, ::step, ::step])  # [T, H/step, W/step, 3]


def make_job(rollout: Rollout, thumbnail_rows: list[int], start: int = 0, stop: int | None = None) -> RewardJob:
    """The job for rows start..stop-1 of a rollout batch."""
    stop = len(rollout.records) if stop is None else stop
    return RewardJob(
        codes=rollout.codes[start:stop].cpu().numpy(),
        grid=rollout.grid,
        prompts=rollout.prompts[start:stop],
        metadata=rollout.metadata[start:stop],
        decode_seeds=rollout.decode_seeds[start:stop].cpu().numpy(),
        first_row=start,
        thumbnail_rows=[row - start for row in thumbnail_rows if start <= row < stop],
    )


class InProcessRewardPool:
    """Scores in the trainer's process; `submit` only records the job, so its work happens inside `gather`."""

    def __init__(self, decoder_cfg: dict, reward_specs: list[dict]) -> None:
        self.worker = RewardWorker(decoder_cfg, reward_specs)
        self.names = [spec["name"] for spec in reward_specs]

    def submit(self, rollout: Rollout, thumbnail_rows: list[int]) -> RewardJob:
        return make_job(rollout, thumbnail_rows)

    def gather(self, job: RewardJob) -> ScoredBatch:
        scores, thumbs, nan_counts = self.worker.score(job)
        return ScoredBatch(scores, self.names, thumbs, list(job.thumbnail_rows), nan_counts)

    def close(self) -> None:
        """Nothing to release in-process."""
