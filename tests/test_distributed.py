"""Several processes on this machine (gloo): they must compute what one process computes at the same global batch."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from grpo_image.core.advantages import group_advantages
from grpo_image.app.cli import main
from grpo_image.base.logging import read_metrics
from grpo_image.policies.tiny import tiny_policy
from grpo_image.core.sampling import SamplingSettings, sample_codes
from grpo_image.core.seeding import minibatch_order
from tests import helpers_distributed as helpers
from tests.helpers_checkpoint import saved_weights

REPO = Path(__file__).resolve().parents[1]
SMALL = [  # the demo recipe at test size: N = 4 groups of 4 rollouts of 2 x 2 codes, two minibatches
    f"data.prompts={REPO / 'prompts' / 'tiny_colors.jsonl'}",
    "data.batch_size=4", "data.group_size=4", "train.minibatches=2",
    "policy.hidden_size=32", "policy.num_layers=2", "policy.grid=[2,2]",
    "save_every=1", "keep_checkpoints=0", "sample_every=0", "logging.tensorboard=false",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_two_ranks(function, tmp_path: Path) -> list[dict]:
    mp.start_processes(function, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def collectives(tmp_path_factory) -> list[dict]:
    return on_two_ranks(helpers.collectives_on_rank, tmp_path_factory.mktemp("collectives"))


def test_advantages_across_ranks_equal_the_single_process_values(collectives):
    # Hand-derived, scale "batch": the std is over all six raw scores [1,2,3,0,0,3]: mean 1.5, variance 9.5/6.
    std = np.sqrt(9.5 / 6)
    expected = torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]) / (std + 1e-6)
    single, _ = group_advantages(helpers.SCORES, [1.0], group_size=helpers.GROUP_SIZE, scale="batch", eps=1e-6)
    # float32 against the float64 derivation rounded once: the float32 defaults (rtol 1.3e-6, atol 1e-5) cover the
    # few float32 roundings of a mean, a std and a division
    torch.testing.assert_close(single, expected.float())
    ranks = [rank["advantages"] for rank in collectives]
    torch.testing.assert_close(torch.cat(ranks), single, rtol=0, atol=0)  # the same operations on the same scores
    # Rank 1 alone would divide by the std of [0, 0, 3] (sqrt 2): gathering the scores is what makes them equal.
    alone, _ = group_advantages(helpers.SCORES[3:], [1.0], group_size=helpers.GROUP_SIZE, scale="batch", eps=1e-6)
    assert not torch.allclose(alone, ranks[1])


def test_gradients_are_averaged_over_ranks_bucket_by_bucket(collectives):
    for rank in collectives:  # the mean of 1x and 2x arange is 1.5x, on both ranks, in every bucket
        for grad in rank["grads"]:
            torch.testing.assert_close(grad, 1.5 * torch.arange(float(grad.numel())), rtol=0, atol=0)


def test_fsdp_shards_the_layers_and_samples_with_the_whole_weights(tmp_path):
    ranks = on_two_ranks(helpers.sharded_policy_on_rank, tmp_path)
    policy = tiny_policy(num_codes=16, grid=(2, 2), hidden_size=32, num_layers=2, seed=0)
    codes, logprobs = sample_codes(policy, ["red", "blue"], torch.tensor([3, 4]), SamplingSettings(cfg_scale=2.0))
    for rank in ranks:
        assert rank["all_dtensor"] and rank["still_sharded"]
        assert rank["local"] == rank["whole"] // 2  # each rank keeps half of every layer (even row counts here)
        torch.testing.assert_close(rank["codes"], codes, rtol=0, atol=0)
        torch.testing.assert_close(rank["logprobs"], logprobs, rtol=1e-5, atol=1e-5)


def test_replicas_start_as_rank_0s_even_when_seeded_differently(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the spawned ranks read recipes/ and prompts/ relative to the repository
    stage = tiny_policy(num_codes=16, grid=(2, 2), hidden_size=32, num_layers=2, seed=7)  # fp32: a previous stage
    with torch.no_grad():  # trained away from its initial values, norms (ones) and biases (zeros) included
        for param in stage.model.parameters():
            param.add_(1e-3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    stage.save_pretrained(tmp_path / "stage")
    saved = stage.model.state_dict()
    ranks = on_two_ranks(helpers.replicas_on_rank, tmp_path)
    seed_1 = tiny_policy(num_codes=16, grid=(2, 2), hidden_size=32, num_layers=2, seed=1).model.state_dict()
    for part in ("lora", "fsdp", "fsdp reference", "stage", "stage reference"):
        zero, one = ranks[0][part], ranks[1][part]
        assert zero.keys() == one.keys()
        for name in zero:
            torch.testing.assert_close(one[name], zero[name], rtol=0, atol=0, msg=f"{part}: {name}")  # copies: bitwise
    differed = [n for n, v in seed_1.items() if n in ranks[0]["fsdp"] and not torch.equal(v, ranks[0]["fsdp"][n])]
    assert differed  # rank 1 was built from another seed: only the broadcast made it rank 0's
    # A bf16 run from the fp32 stage (rank 0 alone reads it) holds its fp32 weights unrounded as masters, on every
    # rank; its reference is the stage, each weight in the dtype the policy computes with it (bf16 inside the layers;
    # the image head, lm_head here, in fp32 as the policy reads it)
    masters, reference = ranks[1]["stage"], ranks[1]["stage reference"]
    assert masters.keys() == saved.keys() and all(torch.equal(masters[n], saved[n]) for n in saved)
    rounded = [n for n, v in saved.items() if not torch.equal(v.bfloat16().float(), v)]
    assert len(rounded) == len(saved)  # every saved tensor has values bf16 cannot hold: rounding would show
    for name, value in saved.items():
        in_layers = ".layers." in name
        assert reference[name].dtype == (torch.bfloat16 if in_layers else torch.float32)
        assert torch.equal(reference[name], value.to(reference[name].dtype)), name


def test_bf16_fsdp_moves_every_sharded_master_weight_that_has_a_gradient(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    for rank in on_two_ranks(helpers.bf16_fsdp_step_on_rank, tmp_path):
        assert rank["dtypes"] == ["torch.float32"]  # fp32 shards and replicated fp32 masters
        assert rank["with_grad"] > 1000 and rank["moved"] == rank["with_grad"]
        assert rank["metrics"]["train/skipped_updates"] == 0
        assert abs(rank["metrics"]["train/ratio_mean_first"] - 1) < 1e-3


def test_a_collective_refuses_a_tensor_off_the_process_groups_device():
    world = helpers.World(0, 2, torch.device("cuda", 0))  # what a GPU rank holds: NCCL takes CUDA tensors only
    with pytest.raises(RuntimeError, match="tensor on cpu but the process group's device is cuda:0"):
        world.collective_tensor(torch.zeros(1))


def test_the_world_trains_on_the_local_gpu_when_there_is_one(monkeypatch):
    from grpo_image.training import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.join_world().device == torch.device("cuda", 3)


def train(out: Path, processes: int, *overrides: str) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(free_port())] if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "grpo_image", "train", str(REPO / "recipes" / "tiny_cpu.yaml"), *SMALL,
               f"output_dir={out}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": helpers.LOOPBACK}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def weights_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    return saved_weights(run / "checkpoints" / f"step_{step:06d}")


def assert_same_run(one: Path, two: Path, steps: int, first: int = 1) -> None:
    """The weights after `steps` and the metrics of steps first..steps (two's log begins at first) are one's."""
    a, b = weights_at(one, steps), weights_at(two, steps)
    start = tiny_policy(num_codes=16, grid=(2, 2), hidden_size=32, num_layers=2, seed=0).model.state_dict()
    assert set(a) == set(b)
    # Two processes sum each gradient over ranks in another order than one process does (fp32: a few ulps of the
    # terms, 1e-7 relative). AdamW moves a weight by about lr (1e-3 or 1e-2 here) a step whatever its gradient, and
    # a 1e-7 relative change of the gradient moves that step by about lr * 1e-7 <= 1e-9 (by up to lr only where a
    # gradient is within rounding of 0, which none is in these runs); 2e-5 admits the first, and the steps moved the
    # weights by more than 1e-3 (checked below), so a different run cannot pass.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-5)
        if key in start or "lora_B" in key:  # the steps moved the weights far more than the tolerance (B starts at 0)
            assert (a[key] - start.get(key, 0)).abs().max() > 1e-3, key
    rows_one = read_metrics(one / "metrics.jsonl")[first - 1 : steps]
    rows_two = read_metrics(two / "metrics.jsonl")[: steps - first + 1]
    assert [r["step"] for r in rows_two] == list(range(first, steps + 1))
    # The same weights (above) give the same rollouts and scores; the metrics carry the weights' 1e-9 differences and
    # the gathered means' summation order (1e-7 relative): rtol 1e-4, atol 1e-6 for the KL, which starts at 0
    for key in ("reward/total/mean", "train/loss", "train/kl", "train/grad_norm", "adv/abs_mean"):
        np.testing.assert_allclose([r[key] for r in rows_two], [r[key] for r in rows_one], rtol=1e-4, atol=1e-6)


@pytest.mark.timeout(900)
def test_two_processes_with_lora_train_like_one(tmp_path):
    train(tmp_path / "one", 1, "steps=2", "train.mode=lora", "train.lr=1e-2")
    train(tmp_path / "two", 2, "steps=2", "train.mode=lora", "train.lr=1e-2")
    assert_same_run(tmp_path / "one", tmp_path / "two", 2)
    assert (tmp_path / "two" / "metrics.jsonl").read_text().count("\n") == 2  # one line a step: rank 0 alone logs
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2


@pytest.mark.timeout(900)
def test_fsdp_full_fine_tuning_trains_like_one_process_and_resumes_on_one(tmp_path):
    train(tmp_path / "one", 1, "steps=3", "train.mode=full")
    # with activation checkpointing and micro-batches on the two processes, none of which changes the numbers
    train(tmp_path / "two", 2, "steps=2", "train.mode=full", "train.fsdp=true", "train.gradient_checkpointing=true",
          "train.micro_batch_size=2")
    assert_same_run(tmp_path / "one", tmp_path / "two", 2)
    # The two-process checkpoint (each rank's shards, optimizer state by name) continues in a single process ...
    train(tmp_path / "two", 1, "steps=3", "train.mode=full", f"resume={tmp_path / 'two'}")
    assert_same_run(tmp_path / "one", tmp_path / "two", 3)
    # ... and the single process's checkpoint after step 2 on two FSDP processes: DCP reshards both ways
    back, after_2 = tmp_path / "back", tmp_path / "one" / "checkpoints" / "step_000002"
    train(back, 2, "steps=3", "train.mode=full", "train.fsdp=true", f"resume={after_2}")
    assert_same_run(tmp_path / "one", back, 3, first=3)


@pytest.mark.parametrize("group_size, minibatches, count", [(4, 2, 16), (3, 2, 12), (4, 4, 32)])
def test_each_rank_holds_an_equal_share_of_every_single_process_minibatch(group_size, minibatches, count):
    whole = minibatch_order(seed=0, step=3, epoch=1, group_size=group_size, minibatches=minibatches, first_row=0, count=count).split(count // minibatches)
    assert sorted(torch.cat(whole).tolist()) == list(range(count))
    half = count // 2
    ranks = [minibatch_order(seed=0, step=3, epoch=1, group_size=group_size, minibatches=minibatches, first_row=first, count=half) + first for first in (0, half)]
    for j, minibatch in enumerate(whole):
        joined = torch.cat([rows.split(half // minibatches)[j] for rows in ranks])
        assert sorted(joined.tolist()) == sorted(minibatch.tolist())
    block = math.lcm(group_size, minibatches)  # every block of whole groups gives each minibatch block / M rows
    for minibatch in whole:
        assert (np.bincount(minibatch.numpy() // block) == block // minibatches).all()


@pytest.mark.parametrize("world_size, overrides, message", [
    ("3", [], "data.batch_size (4) must be divisible by the 3 processes"),
    ("4", ["train.minibatches=8"], "train.minibatches (8) must divide the 4 rollouts of each of the 4 processes"),
    ("2", ["train.mode=lora", "train.fsdp=true"], "train.fsdp shards full fine-tuning over several processes"),
    ("1", ["train.mode=full", "train.fsdp=true"], "a launch with 2 or more processes (got 1)"),
])
def test_validate_refuses_what_does_not_split_over_the_processes(monkeypatch, capsys, world_size, overrides, message):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    assert main(["validate", str(REPO / "recipes" / "tiny_cpu.yaml"), *SMALL, *overrides]) == 2
    assert message in capsys.readouterr().err
