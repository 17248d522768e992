"""Checkpoints at real size, rehearsed on two gloo processes: a slow writer, a kill mid-write, what a resume reads."""

import json

import pytest
import torch.multiprocessing as mp

from grpo_image.base.config import load_recipe
from grpo_image.base.logging import read_metrics
from grpo_image.planning.memory_plan import plan_recipe
from grpo_image.planning.resume_plan import resume_rows
from grpo_image.policies.tiny import tiny_policy
from grpo_image.training.checkpoint import find_checkpoint
from tests import helpers_distributed as helpers
from tests.test_distributed import REPO, free_port, on_two_ranks, train


def checkpoint_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.timeout(600)
def test_a_writer_slower_than_the_collective_timeout_lands_every_step_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the spawned ranks read recipes/ and prompts/ relative to the repository
    ranks = on_two_ranks(helpers.slow_writer_on_rank, tmp_path)
    # rank 0 flushed the first file of each checkpoint 5 s late, under a 2 s collective timeout, and no rank timed out
    assert ranks[0]["slowed"] == ["000001", "000002"] and ranks[1]["slowed"] == []
    assert [row["step"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_000001", "step_000002"]  # both landed, no temporary folder is left
    assert find_checkpoint(tmp_path / "run").name == "step_000002"  # whole: every file matches the manifest
    files = json.loads((tmp_path / "run" / "checkpoints" / "step_000002" / "manifest.json").read_text())["files"]
    for part in ("policy", "optimizer"):  # each rank wrote (and hashed) its own shard
        assert {f"{part}/__0_0.distcp", f"{part}/__1_0.distcp", f"{part}/.metadata"} <= set(files)


@pytest.mark.timeout(600)
def test_a_kill_while_writing_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(mp.ProcessExitedException, match="signal SIGKILL"):
        mp.start_processes(helpers.killed_while_writing_on_rank, args=(free_port(), str(tmp_path)), nprocs=2,
                           start_method="spawn")
    run = tmp_path / "run"
    assert (run / "checkpoints" / ".tmp-step_000002").is_dir()  # the half-written one, never renamed
    assert find_checkpoint(run).name == "step_000001"
    # the run continues from step 1 in one process
    train(run, 1, "steps=2", "train.mode=full", "train.minibatches=1", f"resume={run}")
    assert find_checkpoint(run).name == "step_000002"


@pytest.mark.timeout(600)
def test_on_resume_each_rank_reads_and_holds_about_its_shard_not_the_whole_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    ranks = on_two_ranks(helpers.resume_reads_on_rank, tmp_path)
    whole = checkpoint_bytes(tmp_path / "run" / "checkpoints" / "step_000001")
    model = tiny_policy(num_codes=16, grid=(2, 2), hidden_size=1024, num_layers=2).model
    layers = sum(p.numel() for p in model.model.layers.parameters())
    replicated = 1 - layers / sum(p.numel() for p in model.parameters())  # embeddings, final norm, head: 3%
    # Each rank's share of the weights and of both AdamW moments: half of the layers, all of the replicated rest.
    share = (1 + replicated) / 2  # 0.52 of the tensors' bytes
    cfg = load_recipe("recipes/tiny_cpu.yaml", [*helpers.RECIPE_OVERRIDES, *helpers.SHARDED, *helpers.RESUME_MODEL])
    plan = plan_recipe(cfg, gpus=2)  # `grpo-image plan`'s rows for this recipe on 2 processes
    on_disk, per_process, host, _ = [value for _, value, _ in resume_rows(plan.policy, plan.setup)]
    assert abs(on_disk - whole) <= 0.02 * whole  # DCP's per-tensor headers and the small files: 0.3% here
    assert per_process == pytest.approx(share * on_disk, rel=1e-6)  # one count two ways: float rounding only
    for rank in ranks:
        # + 0.05: DCP's metadata, the headers of the saved tensors and torch.load's look-ahead past each (about 40 KB
        # for each of about 120 tensors a rank reads: 2% here), the small files (scheduler, RNG, config)
        assert rank["verify"]["read"] <= (share + 0.05) * whole, (rank["verify"], whole)  # the files it wrote
        assert per_process <= rank["load"]["read"] <= per_process + 0.05 * whole, (rank["load"], per_process)
        # DCP holds one saved tensor at a time on its way into the rank's own, at most the largest as planned (an MLP
        # weight, 8 MiB, 3.6% of the checkpoint), where holding the rank's share would take 52%. The rank's own tensors
        # (weights, AdamW's moments) are made and touched before measuring: on a GPU they are not host memory, and
        # whether freshly made ones land in pages the allocator already holds would decide the figure otherwise.
        assert rank["load"]["peak_growth"] <= host, (rank["load"], host)
