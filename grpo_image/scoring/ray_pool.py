"""Reward workers as Ray actors: decoding and scoring run beside the trainer, on this machine or a Ray cluster.

`submit` splits a rollout batch into contiguous chunks and hands them to the actors without blocking; the trainer
computes reference log-probs (and, with `workers.prefetch`, samples the next batch) before `gather` waits. Each
actor builds its own decoder and rewards from configuration (`RewardWorker`), so only codes, prompts, metadata and
seeds travel in and only scores and thumbnails travel back.

Building: each actor loads its decoder and reward models before it answers (minutes for FLUX-sized weights read
from disk). Every actor's ready signal is asked for at creation; every signal that has arrived is read (at submit and
on every pass of `gather`) before anyone is judged, and a worker still building is judged by how long its own build
has taken, against `build_timeout_s`; never by when the trainer first looks, which is after a whole rollout. A
worker whose constructor raises is reported with the cause.

Faults: a chunk whose actor dies is resubmitted once the actor has restarted; a chunk that runs past its timeout
(`timeout_s` plus `timeout_per_image_s` for each of its images, so that a large chunk of slow diffusion decodes is
not cut short) gets its actor killed (and restarted) and is resubmitted. The clock starts when the actor is ready, not
when the chunk was queued: a worker that is still importing its libraries or loading its reward models has not
begun the work, and a timeout spent on that would kill every fresh worker; after `max_retries` resubmissions of one chunk
the step fails with a message naming the samples. Results are placed by each chunk's first row, never by arrival
order, so scores cannot come back misaligned with their samples.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grpo_image.core.types import Rollout, ScoredBatch
from grpo_image.scoring.score import RewardFailure
from grpo_image.scoring.workers import ChunkResult, RewardJob, RewardWorker, make_job, merge_results


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the task names in its error messages


@dataclass
class _Build:
    """An actor's first build in progress: its ready signal, and when the actor was created (a restart is waited for
    in `_wait_until_alive`, with the same allowance)."""

    ref: object
    asked: float


@dataclass
class _Chunk:
    job: RewardJob
    actor: int
    ref: object = None
    launched: float = 0.0
    attempts: int = 0


@dataclass
class PendingBatch:
    """The chunks of one submitted batch; `gather` fills in their results."""

    chunks: list[_Chunk]
    results: dict[int, ChunkResult] = field(default_factory=dict)


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """Split rows 0..n-1 into at most `chunks` contiguous, nearly equal ranges."""
    chunks = max(1, min(chunks, n))
    edges = [round(i * n / chunks) for i in range(chunks + 1)]
    return [(edges[i], edges[i + 1]) for i in range(chunks)]


class RayRewardPool:
    """A pool of `num_workers` Ray actors, each a RewardWorker with its own CPU / GPU budget."""

    def __init__(
        self,
        decoder_cfg: dict | None,
        reward_specs: list[dict],
        num_workers: int = 2,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        chunks: int = 0,
        timeout_s: float = 300.0,
        timeout_per_image_s: float = 0.0,
        max_retries: int = 2,
        build_timeout_s: float = 1800.0,
        address: str | None = None,
        py_modules: list[str] = (),
    ) -> None:
        import ray

        self.ray = ray
        self.names = [spec["name"] for spec in reward_specs]
        self.chunks = chunks or num_workers
        self.timeout_s = timeout_s
        self.timeout_per_image_s = timeout_per_image_s
        self.max_retries = max_retries
        self.build_timeout_s = build_timeout_s
        self.resources = f"num_cpus={num_cpus:g}, num_gpus={num_gpus:g} each"
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            ray.init(
                address=address or os.environ.get("RAY_ADDRESS"),
                runtime_env=_runtime_env(py_modules),
                include_dashboard=False,
                log_to_driver=True,
            )
        actor = ray.remote(RewardWorker).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0
        )
        self.actors = [actor.remote(decoder_cfg, reward_specs) for _ in range(num_workers)]
        # Asked before any work is queued, so each answers as soon as its actor is built, never behind a chunk.
        asked = time.monotonic()
        self._building = {i: _Build(a.__ray_ready__.remote(), asked) for i, a in enumerate(self.actors)}
        self._ready_at: dict[int, float] = {}  # actor -> when its build was seen finished
        self._unbuildable: dict[int, str] = {}  # actor -> why its constructor failed

    def submit(self, rollout: Rollout, thumbnail_rows: list[int], images: np.ndarray | None = None) -> PendingBatch:
        """Hand every chunk to an actor (round-robin) and return at once; `images` (uint8 [N, H, W, 3]): the
        trainer decoded them, the workers only score."""
        self._read_ready_signals()  # a worker built by now starts its chunk's clock at the launch
        bounds = chunk_bounds(len(rollout.records), self.chunks)
        chunks = [
            _Chunk(make_job(rollout, thumbnail_rows, start, stop, images), actor=i % len(self.actors))
            for i, (start, stop) in enumerate(bounds)
        ]
        for chunk in chunks:
            self._launch(chunk)
        return PendingBatch(chunks)

    def gather(self, pending: PendingBatch) -> ScoredBatch:
        """Wait for every chunk, resubmitting those whose actor died or that ran past the timeout."""
        ray = self.ray
        while len(pending.results) < len(pending.chunks):
            waiting = [i for i in range(len(pending.chunks)) if i not in pending.results]
            refs = [pending.chunks[i].ref for i in waiting] + [build.ref for build in self._building.values()]
            ray.wait(refs, num_returns=1, timeout=self._seconds_to_next_deadline(pending, waiting))
            self._read_ready_signals()  # every build that has finished, before any worker or chunk is judged
            launched = {pending.chunks[i].ref: i for i in waiting}
            finished, _ = ray.wait(list(launched), num_returns=len(launched), timeout=0)
            for ref in finished:
                self._collect(pending, launched[ref])
            for index in waiting:
                chunk = pending.chunks[index]
                if index not in pending.results and self._overdue(chunk):
                    ray.kill(self.actors[chunk.actor], no_restart=False)
                    self._retry(chunk, f"no result after {self._timeout(chunk):g} s "
                                       "(workers.timeout_s + workers.timeout_per_image_s per image)")
        jobs = [chunk.job for chunk in pending.chunks]
        return merge_results(jobs, [pending.results[i] for i in range(len(jobs))], self.names)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.owns_ray:
            self.ray.shutdown()

    def _launch(self, chunk: _Chunk) -> None:
        chunk.ref = self.actors[chunk.actor].score.remote(chunk.job)
        chunk.launched = time.monotonic()

    def _read_ready_signals(self) -> None:
        """Take note of every actor whose build has finished (or failed) by now; waits for none."""
        if not self._building:
            return
        building = {build.ref: actor for actor, build in self._building.items()}
        arrived, _ = self.ray.wait(list(building), num_returns=len(building), timeout=0, fetch_local=False)
        for ref in arrived:
            self._mark_ready(building[ref])

    def _mark_ready(self, index: int) -> None:
        """The actor's build finished, or failed: a constructor that raised is kept to be reported with its cause."""
        ray, build = self.ray, self._building.pop(index)
        try:
            ray.get(build.ref)
        except ray.exceptions.RayActorError as err:
            if err.actor_init_failed:
                self._unbuildable[index] = _cause(err)
                return
            # it died while building (a crash, the OOM killer) and is restarting: its chunk fails and is
            # resubmitted like any other, once the new actor is built (`_retry`)
        self._ready_at[index] = time.monotonic()

    def _started(self, chunk: _Chunk) -> float | None:
        """When the chunk's clock started: its launch, or its actor's readiness if that came later (None: building)."""
        if chunk.actor not in self._ready_at:
            return None
        return max(chunk.launched, self._ready_at[chunk.actor])

    def _overdue(self, chunk: _Chunk) -> bool:
        """Whether the chunk ran past its timeout; a worker that cannot be built fails the step instead."""
        if chunk.actor in self._unbuildable:
            raise RewardFailure(f"reward worker {chunk.actor} could not be built: {self._unbuildable[chunk.actor]}")
        now, build = time.monotonic(), self._building.get(chunk.actor)
        if build is not None:  # still building: bounded by the build allowance, not by timeout_s
            if now - build.asked > self.build_timeout_s:
                raise RewardFailure(
                    f"reward worker {chunk.actor} was not built within {self.build_timeout_s:g} s "
                    f"(workers.build_timeout_s): its decoder and rewards were still loading, or the cluster had no "
                    f"free resources for it ({self.resources})"
                )
            return False
        return now - self._started(chunk) > self._timeout(chunk)

    def _timeout(self, chunk: _Chunk) -> float:
        """Seconds a chunk may run once started: a fixed allowance plus its share of per-image work."""
        return self.timeout_s + self.timeout_per_image_s * len(chunk.job.prompts)

    def _collect(self, pending: PendingBatch, index: int) -> None:
        ray, chunk = self.ray, pending.chunks[index]
        try:
            pending.results[index] = ray.get(chunk.ref)
        except ray.exceptions.RayActorError as err:  # ActorUnavailableError included
            if err.actor_init_failed:
                raise RewardFailure(f"reward worker {chunk.actor} could not be built: {_cause(err)}") from None
            self._retry(chunk, f"its worker died ({type(err).__name__})")
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, RewardFailure):
                raise RewardFailure(str(err.cause)) from None
            raise

    def _retry(self, chunk: _Chunk, why: str) -> None:
        job = chunk.job
        rows = f"samples {job.first_row}..{job.first_row + len(job.prompts) - 1}"
        if chunk.attempts >= self.max_retries:
            raise RewardFailure(f"reward chunk of {rows} failed {chunk.attempts + 1} times; last: {why}")
        chunk.attempts += 1
        self._wait_until_alive(chunk.actor)
        self._launch(chunk)

    def _wait_until_alive(self, index: int) -> None:
        """A restarting actor refuses calls at once; wait until the new one has rebuilt its decoder and rewards."""
        ray, deadline = self.ray, time.monotonic() + self.build_timeout_s
        while True:
            try:
                ray.get(self.actors[index].__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
                self._building.pop(index, None)
                self._ready_at[index] = time.monotonic()
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                if getattr(err, "actor_init_failed", False):
                    raise RewardFailure(f"reward worker {index} could not be rebuilt: {_cause(err)}") from None
                if time.monotonic() > deadline:
                    raise RewardFailure(
                        f"reward worker {index} did not come back within {self.build_timeout_s:g} s "
                        "(workers.build_timeout_s)"
                    ) from None
                time.sleep(0.2)

    def _seconds_to_next_deadline(self, pending: PendingBatch, waiting: list[int]) -> float:
        """Until the first chunk runs past its timeout or the first building worker past the build allowance."""
        now, deadlines = time.monotonic(), []
        for index in waiting:
            chunk = pending.chunks[index]
            build = self._building.get(chunk.actor)
            if build is not None:
                deadlines.append(build.asked + self.build_timeout_s - now)
            elif chunk.actor in self._ready_at:
                deadlines.append(self._started(chunk) + self._timeout(chunk) - now)
            else:  # its constructor failed: report it now
                deadlines.append(0.0)
        return max(0.01, min(deadlines))


def _cause(err: Exception) -> str:
    """The last line of a Ray error's traceback: the exception the actor's constructor raised, e.g.
    `FileNotFoundError: no such file: /models/hps.pt`."""
    lines = [line.strip() for line in ANSI_ESCAPE.sub("", str(err)).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _runtime_env(py_modules: list[str]) -> dict:
    """Ship `rewards/` and the user's reward packages (folders) to every worker, wherever the cluster runs them.

    The folder of `rewards` is found without importing it: the library never imports reward code itself.
    """
    spec = importlib.util.find_spec("rewards")
    shipped = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    for module in py_modules:
        path = Path(module).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"workers.py_modules: {module} is not a folder (ship reward files inside a package folder)")
        shipped.append(str(path))
    return {"py_modules": shipped}
