"""Reward workers as Ray actors: decoding and scoring run beside the trainer, on this machine or a Ray cluster.

`submit` splits a rollout batch into contiguous chunks and hands them to the actors without blocking; the trainer
computes reference log-probs (and, with `workers.prefetch`, samples the next batch) before `gather` waits. Each
actor builds its own decoder and rewards from configuration (`RewardWorker`), so only codes, prompts, metadata and
seeds travel in and only scores and thumbnails travel back.

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
import time
from dataclasses import dataclass, field
from pathlib import Path

from grpo_image.core.types import Rollout, ScoredBatch
from grpo_image.scoring.score import RewardFailure
from grpo_image.scoring.workers import ChunkResult, RewardJob, RewardWorker, make_job, merge_results


RESTART_TIMEOUT_S = 300.0  # a restarted actor re-imports its libraries and reloads its models before it answers


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
        decoder_cfg: dict,
        reward_specs: list[dict],
        num_workers: int = 2,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        chunks: int = 0,
        timeout_s: float = 300.0,
        timeout_per_image_s: float = 0.0,
        max_retries: int = 2,
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
        self._ready_refs = {i: a.__ray_ready__.remote() for i, a in enumerate(self.actors)}
        self._ready_at: dict[int, float] = {}
        self._created = time.monotonic()

    def submit(self, rollout: Rollout, thumbnail_rows: list[int]) -> PendingBatch:
        """Hand every chunk to an actor (round-robin) and return at once."""
        bounds = chunk_bounds(len(rollout.records), self.chunks)
        chunks = [
            _Chunk(make_job(rollout, thumbnail_rows, start, stop), actor=i % len(self.actors))
            for i, (start, stop) in enumerate(bounds)
        ]
        for chunk in chunks:
            self._launch(chunk)
        return PendingBatch(chunks)

    def gather(self, pending: PendingBatch) -> ScoredBatch:
        """Wait for every chunk, resubmitting those whose actor died or that ran past the timeout."""
        ray = self.ray
        while len(pending.results) < len(pending.chunks):
            waiting = {id(c.ref): i for i, c in enumerate(pending.chunks) if i not in pending.results}
            building = {id(ref): actor for actor, ref in self._ready_refs.items()}
            refs = [pending.chunks[i].ref for i in waiting.values()] + list(self._ready_refs.values())
            ready, _ = ray.wait(refs, num_returns=1, timeout=self._seconds_to_next_deadline(pending, waiting))
            for ref in ready:
                if id(ref) in building:
                    self._mark_ready(building[id(ref)])
                else:
                    self._collect(pending, waiting[id(ref)])
            for index in waiting.values():
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

    def _mark_ready(self, index: int) -> None:
        """The actor's first build finished (or failed: a worker that cannot build says why here)."""
        ref = self._ready_refs.pop(index)
        try:
            self.ray.get(ref)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError):
            pass  # it died while building and is restarting: its chunk fails and is resubmitted like any other
        self._ready_at[index] = time.monotonic()

    def _started(self, chunk: _Chunk) -> float | None:
        """When the chunk's clock started: its launch, or its actor's readiness if that came later."""
        if chunk.actor not in self._ready_at:
            return None
        return max(chunk.launched, self._ready_at[chunk.actor])

    def _overdue(self, chunk: _Chunk) -> bool:
        now, started = time.monotonic(), self._started(chunk)
        if started is None:  # still building: bounded by the restart allowance, not by timeout_s
            if now - self._created > RESTART_TIMEOUT_S:
                raise RewardFailure(f"reward worker {chunk.actor} was not built within {RESTART_TIMEOUT_S:g} s")
            return False
        return now - started > self._timeout(chunk)

    def _timeout(self, chunk: _Chunk) -> float:
        """Seconds a chunk may run once started: a fixed allowance plus its share of per-image work."""
        return self.timeout_s + self.timeout_per_image_s * len(chunk.job.prompts)

    def _collect(self, pending: PendingBatch, index: int) -> None:
        ray, chunk = self.ray, pending.chunks[index]
        try:
            pending.results[index] = ray.get(chunk.ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
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
        ray, deadline = self.ray, time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                ray.get(self.actors[index].__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
                self._ready_refs.pop(index, None)
                self._ready_at[index] = time.monotonic()
                return
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise RewardFailure(f"reward worker {index} did not come back within {RESTART_TIMEOUT_S:g} s") from None
                time.sleep(0.2)

    def _seconds_to_next_deadline(self, pending: PendingBatch, waiting: dict[int, int]) -> float:
        now = time.monotonic()
        starts = [self._started(pending.chunks[i]) for i in waiting.values()]
        deadlines = [
            start + self._timeout(pending.chunks[i]) - now
            for i, start in zip(waiting.values(), starts) if start is not None
        ]
        if len(deadlines) < len(starts):  # a worker is still building: look again soon
            deadlines.append(1.0)
        return max(0.01, min(deadlines))


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
