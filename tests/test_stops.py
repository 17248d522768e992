"""Honest stops: a failure never leaves a checkpoint that claims a half-applied step, and resume is then exact."""

import pytest
import torch

import grpo_image.training.policy_update as policy_update
import grpo_image.training.train as train_module
from grpo_image.app.cli import main
from grpo_image.base.logging import read_metrics
from grpo_image.scoring.score import RewardFailure
from tests.helpers_checkpoint import saved_weights
from tests.test_cli_train import RECIPE, SMALL, comparable

# SMALL: 2 minibatches a step, a checkpoint every 2 steps


def train(out, *overrides: str) -> int:
    return main(["train", RECIPE, *SMALL, f"output_dir={out}", *overrides])


def same_run(straight, resumed) -> None:
    assert comparable(read_metrics(resumed / "metrics.jsonl")) == comparable(read_metrics(straight / "metrics.jsonl"))
    a = saved_weights(straight / "checkpoints" / "step_000004")
    b = saved_weights(resumed / "checkpoints" / "step_000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoints(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.fixture(scope="module", params=["false", "true"], ids=["plain", "prefetch"])
def straight(request, tmp_path_factory):
    """An uninterrupted 4-step run to compare with, with and without prefetched rollouts."""
    out = tmp_path_factory.mktemp(f"straight_{request.param}")
    assert train(out, "steps=4", f"workers.prefetch={request.param}") == 0
    return out, request.param


def test_out_of_memory_inside_an_update_saves_nothing_and_resume_is_exact(straight, tmp_path, monkeypatch, capsys):
    reference, prefetch = straight
    real_loss, calls = policy_update.grpo_loss, {"n": 0}

    def out_of_memory_in_step_3_after_its_first_minibatch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # two minibatches a step: call 6 is step 3's second, after step 3's first update
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(policy_update, "grpo_loss", out_of_memory_in_step_3_after_its_first_minibatch)
    out = tmp_path / "run"
    assert train(out, "steps=4", f"workers.prefetch={prefetch}") == 1
    err = capsys.readouterr().err
    assert "step 3 ran out of memory in phase 'update': CUDA out of memory" in err
    assert "train.micro_batch_size" in err and "train.gradient_checkpointing" in err
    assert "the update of step 3 had begun, so nothing was saved" in err
    assert f"continues from {out / 'checkpoints' / 'step_000002'}" in err
    assert checkpoints(out) == ["step_000002"]  # nothing claims step 3, whose update half ran
    monkeypatch.setattr(policy_update, "grpo_loss", real_loss)
    assert train(out, "steps=4", f"workers.prefetch={prefetch}", f"resume={out}") == 0
    same_run(reference, out)


def test_a_reward_failure_before_the_update_checkpoints_the_step_before(straight, tmp_path, monkeypatch, capsys):
    """Step 4's rewards fail: nothing of step 4 ran, so the state after step 3 is saved (with step 4's prefetched
    rollouts, which were sampled before step 3's update and must be scored, not sampled again, on resume)."""
    reference, prefetch = straight
    real_gather, calls = train_module._gather_or_fail, {"n": 0}

    def fails_on_the_fourth_gather(trainer, pending):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RewardFailure("required reward 'color' failed on sample 0: server gone")
        return real_gather(trainer, pending)

    monkeypatch.setattr(train_module, "_gather_or_fail", fails_on_the_fourth_gather)
    out = tmp_path / "run"
    assert train(out, "steps=4", f"workers.prefetch={prefetch}") == 1
    assert "step 4 failed: required reward 'color' failed on sample 0" in capsys.readouterr().err
    assert checkpoints(out) == ["step_000002", "step_000003"]
    saved_prefetch = (out / "checkpoints" / "step_000003" / "prefetched_rollout.safetensors").is_file()
    assert saved_prefetch == (prefetch == "true")
    monkeypatch.setattr(train_module, "_gather_or_fail", real_gather)
    assert train(out, "steps=4", f"workers.prefetch={prefetch}", f"resume={out}") == 0
    same_run(reference, out)


def test_out_of_memory_while_sampling_names_the_phase_and_its_key(tmp_path, monkeypatch, capsys):
    real_sample, calls = train_module.sample_codes_with_mass, {"n": 0}

    def out_of_memory_on_the_second_rollout(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(train_module, "sample_codes_with_mass", out_of_memory_on_the_second_rollout)
    assert train(tmp_path, "steps=4", "save_every=10") == 1
    err = capsys.readouterr().err
    assert "step 2 ran out of memory in phase 'rollout'" in err and "lower sampling.batch_size" in err
    assert checkpoints(tmp_path) == ["step_000001"]  # nothing of step 2 had run: the state after step 1 is kept


def test_any_other_crash_is_raised_with_a_note_on_where_to_resume(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(train_module, "reward_metrics", broken)
    with pytest.raises(KeyError) as raised:
        train(tmp_path, "steps=3")
    note = " ".join(raised.value.__notes__)
    assert "step 1 failed in phase 'between phases'" in note
    assert "the update of step 1 had begun, so nothing was saved" in note
    assert "no checkpoint is on disk" in note
