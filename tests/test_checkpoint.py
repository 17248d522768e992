"""Checkpoints: atomic, verified on resume, corrupt ones skipped, only the newest K kept, exact restore.

Two processes, a slow disk and a kill mid-write are rehearsed in tests/test_sharded_checkpoints.py.
"""

import json

import pytest
import torch
from omegaconf import OmegaConf

from grpo_image.training.checkpoint import (
    SIZES_ONLY, WEIGHTS, CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint,
)
from grpo_image.training.saved_weights import load_stages
from grpo_image.training.weights import FullWeights, LoraWeights
from grpo_image.policies.tiny import tiny_policy

CONFIG = OmegaConf.create({"seed": 0})


def trained(mode: str, seed: int = 0):
    policy = tiny_policy(num_codes=8, grid=(2, 2), hidden_size=16, num_layers=1, seed=seed)
    weights = LoraWeights(policy, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]) if mode == "lora" else FullWeights(policy, False)
    params = weights.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(2):  # two steps so that optimizer moments and the schedule are not at their start values
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return weights, optimizer, scheduler


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_save_then_load_restores_weights_optimizer_scheduler_and_rng(tmp_path, mode):
    weights, optimizer, scheduler = trained(mode)
    torch.manual_seed(123)
    folder = save_checkpoint(tmp_path, 2, weights, optimizer, scheduler, CONFIG, keep=0)
    expected_draw = torch.rand(3)
    fresh_weights, fresh_opt, fresh_sched = trained(mode, seed=1)  # different init: everything must be overwritten
    torch.manual_seed(999)
    assert load_checkpoint(folder, fresh_weights, fresh_opt, fresh_sched) == (2, None, {})
    for ours, theirs in zip(weights.trainable_parameters(), fresh_weights.trainable_parameters()):
        assert torch.equal(ours, theirs)
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr() == [0.1 / 3]  # lambda(2) = 1/3
    state, fresh_state = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(state[k]["exp_avg"], fresh_state[k]["exp_avg"]) for k in state)
    assert torch.equal(torch.rand(3), expected_draw)  # the global RNG continues where it was saved


def test_a_trained_parameter_that_never_had_a_gradient_resumes_without_state(tmp_path):
    """X-Omni's text head is trainable under train.mode full but image codes never reach it: AdamW holds no state
    for it, so the checkpoint has none, and a resumed optimizer must hold none either (before this, reading the
    checkpoint failed on the missing key, and zero moments would have cost memory an uninterrupted run never spends)."""
    def trained_but_the_head(seed: int):
        policy = tiny_policy(num_codes=8, grid=(2, 2), hidden_size=16, num_layers=1, seed=seed)
        weights = FullWeights(policy, False)
        head = policy.model.get_output_embeddings().weight
        optimizer = torch.optim.AdamW(weights.trainable_parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        for _ in range(2):
            sum(p.square().sum() for p in weights.trainable_parameters() if p is not head).backward()
            optimizer.step()
            optimizer.zero_grad()
        return weights, optimizer, scheduler, head

    weights, optimizer, scheduler, head = trained_but_the_head(0)
    assert head.requires_grad and head not in optimizer.state
    folder = save_checkpoint(tmp_path, 2, weights, optimizer, scheduler, CONFIG, keep=0)
    fresh, fresh_optimizer, fresh_scheduler, fresh_head = trained_but_the_head(1)
    load_checkpoint(folder, fresh, fresh_optimizer, fresh_scheduler)
    assert fresh_head not in fresh_optimizer.state and len(fresh_optimizer.state) == len(optimizer.state) > 0
    for ours, theirs in zip(weights.trainable_parameters(), fresh.trainable_parameters()):
        assert torch.equal(ours, theirs)
    for ours, theirs in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert torch.equal(ours["exp_avg_sq"], theirs["exp_avg_sq"])


def test_lora_checkpoint_is_a_standard_peft_adapter(tmp_path):
    weights, optimizer, scheduler = trained("lora")
    folder = save_checkpoint(tmp_path, 1, weights, optimizer, scheduler, CONFIG, keep=0)
    adapter = json.loads((folder / "policy" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert sorted(p.name for p in (folder / "policy").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_checkpoint_loads_into_the_recipes_policy(tmp_path, dtype):
    weights, optimizer, scheduler = trained("full")
    folder = save_checkpoint(tmp_path, 1, weights, optimizer, scheduler, CONFIG, keep=0)
    # one process's DCP folder: its metadata and the one file it wrote, of the weights and of AdamW's state
    for part in ("policy", "optimizer"):
        assert sorted(p.name for p in (folder / part).iterdir()) == [".metadata", "__0_0.distcp"]
    loaded = tiny_policy(num_codes=8, grid=(2, 2), hidden_size=16, num_layers=1, seed=1, dtype=dtype)
    load_stages(loaded, tmp_path, merge=False)  # as sample, eval and train.init_from do
    for name, value in weights.policy.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value.to(getattr(torch, dtype))), name  # rounded once


def test_newest_complete_checkpoint_is_found_and_a_corrupt_one_skipped(tmp_path):
    weights, optimizer, scheduler = trained("lora")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, weights, optimizer, scheduler, CONFIG, keep=0)
    assert find_checkpoint(tmp_path).name == "step_000003"
    with open(tmp_path / "checkpoints" / "step_000003" / "optimizer" / "__0_0.distcp", "r+b") as handle:
        handle.seek(10)
        handle.write(b"\x00corrupt")
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_000003.*optimizer/__0_0.distcp"):
        assert find_checkpoint(tmp_path).name == "step_000002"
    # sample and eval read the weights alone, which are whole; a look before a launch compares sizes only
    assert find_checkpoint(tmp_path, hashed=WEIGHTS).name == "step_000003"
    assert find_checkpoint(tmp_path, hashed=SIZES_ONLY).name == "step_000003"
    (tmp_path / "checkpoints" / "step_000003" / "scheduler.pt").write_bytes(b"")  # truncated
    with pytest.warns(UserWarning, match="scheduler.pt does not match its manifest entry \\(0 bytes"):
        assert find_checkpoint(tmp_path, hashed=SIZES_ONLY).name == "step_000002"
    (tmp_path / "checkpoints" / "step_000002" / "manifest.json").unlink()  # a half-written one
    with pytest.warns(UserWarning):
        assert find_checkpoint(tmp_path).name == "step_000001"


def test_a_leftover_temporary_folder_is_ignored_and_a_checkpoint_folder_is_accepted(tmp_path):
    weights, optimizer, scheduler = trained("full")
    folder = save_checkpoint(tmp_path, 4, weights, optimizer, scheduler, CONFIG, keep=0)
    (tmp_path / "checkpoints" / ".tmp-step_000005").mkdir()
    assert find_checkpoint(tmp_path) == folder
    assert find_checkpoint(folder) == folder


def test_only_the_newest_k_are_kept(tmp_path):
    weights, optimizer, scheduler = trained("lora")
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, weights, optimizer, scheduler, CONFIG, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000004", "step_000005"]


def test_a_folder_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_checkpoint(tmp_path)


def test_a_checkpoint_of_the_earlier_whole_format_is_not_resumed_but_its_weights_start_a_run(tmp_path):
    weights, optimizer, scheduler = trained("full")
    folder = tmp_path / "step_000001"
    weights.policy.save_pretrained(folder / "policy")  # what a checkpoint held before: a model folder, optimizer.pt
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    with pytest.raises(CheckpointError, match="earlier version .* train.init_from="):
        load_checkpoint(folder, *trained("full", seed=1))
    loaded = tiny_policy(num_codes=8, grid=(2, 2), hidden_size=16, num_layers=1, seed=1)
    load_stages(loaded, folder, merge=True)
    assert torch.equal(loaded.model.lm_head.weight, weights.policy.model.lm_head.weight)
