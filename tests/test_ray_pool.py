"""The Ray reward pool: same scores as in-process, in order; workers built long before the first gather, and
workers that cannot be built; dead and stuck workers; overlap; a CLI run."""

import json
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from grpo_image.app.cli import main
from grpo_image.base.logging import read_metrics
from grpo_image.scoring.ray_pool import RayRewardPool, chunk_bounds
from grpo_image.core.types import PromptRecord, Rollout
from grpo_image.scoring.score import RewardFailure
from grpo_image.scoring.workers import InProcessRewardPool
from tests.test_cli_train import RECIPE, SMALL, comparable

PALETTE = {"_component_": "grpo_image.decoders.palette.PaletteDecoder", "patch_size": 2}
COLOR = {"name": "color", "weight": 1.0, "required": True,
         "scorer": {"_component_": "rewards.color.ColorAdherence", "tolerance": 10.0}}


def reward(name, component, required=True, **kwargs):
    return {"name": name, "weight": 1.0, "required": required, "scorer": {"_component_": component, **kwargs}}


def batch(n=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, 4), generator=generator)  # [N, L], 2 x 2 grids of the 16 web colours
    colors = ["#FF0000", "#0000FF", "#FFFFFF"]
    records = [PromptRecord(f"p{i}", {"color": colors[i % 3]}) for i in range(n)]
    return Rollout(codes, torch.zeros(n, 4), torch.arange(n), records, (2, 2))


def test_chunk_bounds_are_contiguous_and_cover_every_row():
    assert chunk_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert chunk_bounds(2, 5) == [(0, 1), (1, 2)]  # never an empty chunk
    assert chunk_bounds(7, 1) == [(0, 7)]


def test_pool_scores_equal_in_process_scores_in_order_for_several_chunkings(ray_session):
    specs = [COLOR, reward("red", "tests.helpers_rewards.MeanRed")]
    rollout = batch()
    expected = InProcessRewardPool(PALETTE, specs)
    want = expected.gather(expected.submit(rollout, [0, 4, 9]))
    assert len(np.unique(want.scores[:, 0])) > 1  # the batch is not uniform, so misordering would show
    pool = RayRewardPool(PALETTE, specs, num_workers=2, num_cpus=0)
    try:
        for chunks in (1, 2, 3, 7):
            pool.chunks = chunks
            got = pool.gather(pool.submit(rollout, [0, 4, 9]))
            np.testing.assert_array_equal(got.scores, want.scores, err_msg=f"{chunks} chunks")
            assert got.thumbnail_rows == [0, 4, 9]
            np.testing.assert_array_equal(got.thumbnails, want.thumbnails)
    finally:
        pool.close()


def test_killing_a_worker_mid_batch_gives_the_same_scores(ray_session):
    specs = [reward("slow_red", "tests.helpers_rewards.Sleepy", seconds=1.0), COLOR]
    rollout = batch()
    expected = InProcessRewardPool(PALETTE, specs)
    want = expected.gather(expected.submit(rollout, []))
    pool = RayRewardPool(PALETTE, specs, num_workers=2, num_cpus=0, chunks=2)
    try:
        ray_session.get([actor.__ray_ready__.remote() for actor in pool.actors])  # both built
        pending = pool.submit(rollout, [])
        ray_session.kill(pool.actors[1], no_restart=False)  # its chunk is sleeping inside the reward
        got = pool.gather(pending)
    finally:
        pool.close()
    np.testing.assert_array_equal(got.scores, want.scores)
    assert pending.chunks[1].attempts == 1 and pending.chunks[0].attempts == 0


def test_a_stuck_chunk_times_out_and_is_resubmitted(ray_session, tmp_path):
    specs = [reward("red", "tests.helpers_rewards.HangsOnce", marker=str(tmp_path / "hung"))]
    pool = RayRewardPool(PALETTE, specs, num_workers=1, num_cpus=0, timeout_s=3.0, max_retries=1)
    try:
        pending = pool.submit(batch(4), [])
        got = pool.gather(pending)  # the first attempt hangs for 20 s; the retry answers at once
    finally:
        pool.close()
    assert pending.chunks[0].attempts == 1
    direct = InProcessRewardPool(PALETTE, [reward("red", "tests.helpers_rewards.MeanRed")])
    np.testing.assert_array_equal(got.scores, direct.gather(direct.submit(batch(4), [])).scores)


def test_retries_are_bounded(ray_session, tmp_path):
    specs = [reward("red", "tests.helpers_rewards.HangsOnce", marker=str(tmp_path / "hung"))]
    pool = RayRewardPool(PALETTE, specs, num_workers=1, num_cpus=0, timeout_s=2.0, max_retries=0)
    try:
        with pytest.raises(RuntimeError, match=r"reward chunk of samples 0..3 failed 1 times; last: no result after 2 s"):
            pool.gather(pool.submit(batch(4), []))
    finally:
        pool.close()


def test_a_required_reward_failure_in_a_worker_names_reward_and_sample(ray_session):
    specs = [reward("ocr", "tests.helpers_rewards.FailsOnPrompt", prompt="p6")]
    pool = RayRewardPool(PALETTE, specs, num_workers=2, num_cpus=0, chunks=2)
    try:
        with pytest.raises(RewardFailure, match=r"required reward 'ocr' failed on sample 6 \(prompt 'p6'\)"):
            pool.gather(pool.submit(batch(), []))
    finally:
        pool.close()


def wait_past_the_build_allowance(ray, pool):
    """Every worker built (asked through ready signals of the test's own), then the allowance passed twice over: a
    real run's first gather comes after minutes of sampling, long after its workers were built."""
    start = time.monotonic()
    ray.get([actor.__ray_ready__.remote() for actor in pool.actors])
    time.sleep(max(0.0, start + 2 * pool.build_timeout_s - time.monotonic()))


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_built_before_a_late_first_gather_score_normally(ray_session, workers):
    """The chunks are queued while the workers build; the first gather comes after the build allowance. Every ready
    signal that has arrived is read before any worker is judged (the old bookkeeping read one a pass and judged the
    unread ones by the pool's age: "reward worker 1 was not built within 1 s")."""
    rollout = batch()
    expected = InProcessRewardPool(PALETTE, [COLOR])
    want = expected.gather(expected.submit(rollout, []))
    pool = RayRewardPool(PALETTE, [COLOR], num_workers=workers, num_cpus=0, build_timeout_s=1.0)
    try:
        pending = pool.submit(rollout, [])
        wait_past_the_build_allowance(ray_session, pool)
        got = pool.gather(pending)
    finally:
        pool.close()
    np.testing.assert_array_equal(got.scores, want.scores)
    assert [chunk.attempts for chunk in pending.chunks] == [0] * workers


def test_workers_built_before_a_late_first_submit_score_normally(ray_session):
    """The rollout comes after the allowance too: the chunks' clocks start at their launch, on built workers."""
    rollout = batch()
    expected = InProcessRewardPool(PALETTE, [COLOR])
    pool = RayRewardPool(PALETTE, [COLOR], num_workers=2, num_cpus=0, build_timeout_s=1.0)
    try:
        wait_past_the_build_allowance(ray_session, pool)
        pending = pool.submit(rollout, [])
        got = pool.gather(pending)
    finally:
        pool.close()
    np.testing.assert_array_equal(got.scores, expected.gather(expected.submit(rollout, [])).scores)
    assert all(chunk.launched >= pool._ready_at[chunk.actor] for chunk in pending.chunks)


@pytest.mark.parametrize("hangs", ["decoder", "reward"])
def test_only_the_worker_whose_build_hangs_is_reported(ray_session, tmp_path, hangs):
    """Two workers, one stuck in its decoder's (or reward's) constructor: once the other is built, the stuck one is
    named when its own build passes the allowance; the built one is not judged."""
    marker = str(tmp_path / "hung")
    decoder = {"_component_": "tests.helpers_rewards.palette_decoder_hanging_once", "marker": marker, "patch_size": 2}
    specs = [reward("red", "tests.helpers_rewards.HangsWhileBuilding", marker=marker) if hangs == "reward" else COLOR]
    pool = RayRewardPool(decoder if hangs == "decoder" else PALETTE, specs, num_workers=2, num_cpus=0,
                         build_timeout_s=1.0)
    try:
        pending = pool.submit(batch(), [])
        signals = [actor.__ray_ready__.remote() for actor in pool.actors]
        built, _ = ray_session.wait(signals, num_returns=1)  # the other one never answers
        stuck = 1 - signals.index(built[0])
        with pytest.raises(RewardFailure, match=rf"^reward worker {stuck} was not built within 1 s "
                                                r"\(workers.build_timeout_s\): its decoder and rewards were still loading"):
            pool.gather(pending)
    finally:
        pool.close()


def test_a_worker_whose_constructor_raises_is_reported_with_the_cause(ray_session):
    specs = [COLOR, reward("hps", "tests.helpers_rewards.Unbuildable", checkpoint="/models/missing/hps.pt")]
    pool = RayRewardPool(PALETTE, specs, num_workers=1, num_cpus=0, build_timeout_s=600.0)
    try:  # reported as soon as the constructor raises, not after the allowance
        with pytest.raises(RewardFailure, match=r"^reward worker 0 could not be built: FileNotFoundError: no reward "
                                                r"checkpoint at /models/missing/hps.pt$"):
            pool.gather(pool.submit(batch(4), []))
    finally:
        pool.close()


RAY = ["workers.backend=ray", "workers.num_workers=2", "workers.num_cpus=0"]


def test_the_tiny_recipe_trains_through_the_ray_pool_with_the_same_metrics(ray_session, tmp_path):
    assert main(["train", RECIPE, *SMALL, "steps=3", f"output_dir={tmp_path / 'inprocess'}"]) == 0
    assert main(["train", RECIPE, *SMALL, "steps=3", f"output_dir={tmp_path / 'ray'}", *RAY]) == 0
    want = comparable(read_metrics(tmp_path / "inprocess" / "metrics.jsonl"))
    got = comparable(read_metrics(tmp_path / "ray" / "metrics.jsonl"))
    assert got == want  # same seeds, same rollouts, same scores, same updates
    assert (tmp_path / "ray" / "samples" / "step_000003.png").is_file()


PATIENCE_S = 60.0  # the longest either side of the handshake waits for the other: reached only when overlap fails


def record_trainer_phases(monkeypatch, folder, steps: int) -> dict[str, list[tuple[float, float]]]:
    """The span (time.monotonic) of each step's reference pass and update, from the trainer's own phase timer.

    The handshake with WaitsForTheTrainer makes the order independent of the machine's speed: before the
    reference pass of step n the trainer waits until chunk n has started, and before the update of step n until
    chunk n + 1 (prefetched) has; the chunk waits until the reference pass is done. A trainer that waited for the
    scores first would leave a chunk waiting out its patience, and the spans below would not nest.
    """
    from grpo_image.training.step_metrics import StepTimer

    phases: dict[str, list[tuple[float, float]]] = {"ref": [], "update": []}
    timed = StepTimer.__call__

    @contextmanager
    def recording(timer, name):
        step = len(phases.get(name, [])) + 1
        chunk = {"ref": step, "update": step + 1}.get(name)
        if chunk is not None and chunk <= steps:
            deadline = time.monotonic() + PATIENCE_S
            while not (folder / f"started_{chunk}").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        start = time.monotonic()
        with timed(timer, name):
            yield
        if name in phases:
            phases[name].append((start, time.monotonic()))
        if name == "ref":
            (folder / f"ref_done_{step}").touch()

    monkeypatch.setattr(StepTimer, "__call__", recording)
    return phases


def test_overlap_runs_the_trainer_work_while_the_chunks_are_scored(ray_session, tmp_path, monkeypatch):
    """With the Ray pool and prefetch, each step's reference pass runs while that step's chunk is being scored, and
    each update while the next step's chunk is: checked by the order of events, not by their durations (the time
    the overlap saves is measured in bench/pipeline.py)."""
    folder, steps = tmp_path / "events", 3
    folder.mkdir()
    phases = record_trainer_phases(monkeypatch, folder, steps)
    slow = [f"rewards=[{{name: slow, scorer: {{_component_: tests.helpers_rewards.WaitsForTheTrainer, "
            f"folder: '{folder}', patience: {PATIENCE_S}}}}}]",
            "workers.prefetch=true", f"steps={steps}", "sample_every=0"]
    ray = ["workers.backend=ray", "workers.num_workers=1", "workers.num_cpus=0", "workers.chunks=1"]
    assert main(["train", RECIPE, *SMALL, *slow, *ray, f"output_dir={tmp_path / 'run'}"]) == 0
    chunks = [json.loads(line) for line in (folder / "chunks.jsonl").read_text().splitlines()]
    assert [chunk["call"] for chunk in chunks] == list(range(1, steps + 1))
    assert len(phases["ref"]) == len(phases["update"]) == steps
    for step in range(1, steps + 1):
        chunk, (ref_start, ref_end) = chunks[step - 1], phases["ref"][step - 1]
        assert chunk["start"] < ref_start < ref_end < chunk["end"], f"step {step}: reference pass outside its chunk"
        if step < steps:  # the next step's rollouts were sampled and submitted before this step's scores came back
            upcoming, (update_start, update_end) = chunks[step], phases["update"][step - 1]
            assert upcoming["start"] < update_start < update_end < upcoming["end"], f"step {step}: update outside chunk {step + 1}"
