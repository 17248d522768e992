"""Decoding and reward scoring, behind one pool interface.

`RewardWorker` is a plain class built from configuration alone (the decoder and reward component nodes), so that
the same object can live in the trainer's process or in another process: only codes, prompts, metadata and seeds
go in, and only scores and a few small thumbnails come out. When the decoder itself is trained (decoder GRPO,
grpo_image/training/decoder_grpo.py) the trainer decodes, and the images it made go in instead of the codes. `InProcessRewardPool` runs it in the trainer's process;
it has the `submit` / `gather` shape of an asynchronous pool so that the trainer can do other work in between.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from grpo_image.base.config import instantiate
from grpo_image.decoders import decode_images
from grpo_image.scoring.score import score_images
from grpo_image.core.types import Rollout, ScoredBatch

THUMBNAIL_PX = 128  # longest side of a logged thumbnail: enough for a caption grid, small to ship between processes


@dataclass
class RewardJob:
    """Everything a worker needs to decode and score a batch: no tensors, no model; images only when the trainer
    decoded them (decoder GRPO), and then the worker does not decode."""

    codes: np.ndarray  # int64 [n, L]
    grid: tuple[int, int]
    prompts: list[str]
    metadata: list[dict[str, Any]]
    decode_seeds: np.ndarray  # int64 [n]
    first_row: int  # index of this job's first sample in the whole batch, for error messages
    thumbnail_rows: list[int]  # indices local to this job
    images: np.ndarray | None = None  # uint8 [n, H, W, 3], decoded by the trainer (decoder GRPO)


@dataclass
class ChunkResult:
    """What a worker sends back for one job: small arrays and counts, never full-size images."""

    scores: np.ndarray  # float32 [n, K]
    thumbnails: np.ndarray  # uint8 [T, h, w, 3]
    info: dict[str, float]  # "reward/<name>/<key>" -> summed count from RewardOutput.info
    seconds: float  # decode + score wall time inside the worker


class RewardWorker:
    """Builds the decoder and the rewards from config, decodes codes to images and scores them. With no decoder
    config (decoder GRPO: the trainer decodes) it scores the images its jobs bring."""

    def __init__(self, decoder_cfg: dict | None, reward_specs: list[dict]) -> None:
        self.decoder = instantiate(decoder_cfg) if decoder_cfg is not None else None
        self.specs = reward_specs
        self.rewards = [instantiate(spec["scorer"]) for spec in reward_specs]

    def score(self, job: RewardJob) -> ChunkResult:
        started = time.perf_counter()
        images = job.images if job.images is not None else \
            decode_images(self.decoder, job.codes, job.grid, job.decode_seeds, job.prompts)  # uint8 [n, H, W, 3]
        scores, info = score_images(self.specs, self.rewards, images, job.prompts, job.metadata, job.first_row)
        thumbs = thumbnails(images, job.thumbnail_rows)
        return ChunkResult(scores, thumbs, info, time.perf_counter() - started)


def thumbnails(images: np.ndarray, rows: list[int]) -> np.ndarray:
    """Nearest-neighbour downscale of the chosen images to at most THUMBNAIL_PX on the longer side."""
    picked = images[rows]  # [T, H, W, 3]
    step = max(1, math.ceil(max(images.shape[1:3]) / THUMBNAIL_PX))
    return np.ascontiguousarray(picked[:, ::step, ::step])  # [T, H/step, W/step, 3]


def make_job(rollout: Rollout, thumbnail_rows: list[int], start: int = 0, stop: int | None = None,
             images: np.ndarray | None = None) -> RewardJob:
    """The job for rows start..stop-1 of a rollout batch (and of its images, when the trainer decoded them)."""
    stop = len(rollout.records) if stop is None else stop
    return RewardJob(
        codes=rollout.codes[start:stop].cpu().numpy(),
        grid=rollout.grid,
        prompts=rollout.prompts[start:stop],
        metadata=rollout.metadata[start:stop],
        decode_seeds=rollout.decode_seeds[start:stop].cpu().numpy(),
        first_row=start,
        thumbnail_rows=[row - start for row in thumbnail_rows if start <= row < stop],
        images=None if images is None else images[start:stop],
    )


def merge_results(jobs: list[RewardJob], results: list[ChunkResult], names: list[str]) -> ScoredBatch:
    """Put chunk results back in sample order: each chunk's rows start at its job's first_row."""
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].first_row)
    scores = np.concatenate([results[i].scores for i in order])  # [N, K]
    thumbs = [results[i].thumbnails for i in order if len(results[i].thumbnails)]
    rows = [jobs[i].first_row + row for i in order for row in jobs[i].thumbnail_rows]
    info: dict[str, float] = {}
    for result in results:
        for key, value in result.info.items():
            info[key] = info.get(key, 0.0) + value
    return ScoredBatch(
        scores=scores,
        reward_names=names,
        thumbnails=np.concatenate(thumbs) if thumbs else np.zeros((0, 1, 1, 3), np.uint8),
        thumbnail_rows=rows,
        info=info,
        worker_seconds=max(r.seconds for r in results),
    )


class InProcessRewardPool:
    """Scores in the trainer's process; `submit` only records the job, so its work happens inside `gather`."""

    def __init__(self, decoder_cfg: dict | None, reward_specs: list[dict]) -> None:
        self.worker = RewardWorker(decoder_cfg, reward_specs)
        self.names = [spec["name"] for spec in reward_specs]

    def submit(self, rollout: Rollout, thumbnail_rows: list[int], images: np.ndarray | None = None) -> RewardJob:
        return make_job(rollout, thumbnail_rows, images=images)

    def gather(self, job: RewardJob) -> ScoredBatch:
        return merge_results([job], [self.worker.score(job)], self.names)

    def close(self) -> None:
        """Nothing to release in-process."""
