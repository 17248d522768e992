"""Checkpoints: atomic, verified on resume, corrupt ones skipped, only the newest K kept, exact restore."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from grpo_image.training.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
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


def test_lora_checkpoint_is_a_standard_peft_adapter(tmp_path):
    weights, optimizer, scheduler = trained("lora")
    folder = save_checkpoint(tmp_path, 1, weights, optimizer, scheduler, CONFIG, keep=0)
    adapter = json.loads((folder / "policy" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert (folder / "policy" / "adapter_model.safetensors").is_file()


def test_full_checkpoint_loads_as_a_policy(tmp_path):
    weights, optimizer, scheduler = trained("full")
    folder = save_checkpoint(tmp_path, 1, weights, optimizer, scheduler, CONFIG, keep=0)
    loaded = tiny_policy(path=str(folder / "policy"))
    assert torch.equal(loaded.model.lm_head.weight, weights.policy.model.lm_head.weight)
    assert (loaded.image_token_offset, loaded.num_codes) == (weights.policy.image_token_offset, 8)


def test_newest_complete_checkpoint_is_found_and_a_corrupt_one_skipped(tmp_path):
    weights, optimizer, scheduler = trained("lora")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, weights, optimizer, scheduler, CONFIG, keep=0)
    assert find_checkpoint(tmp_path).name == "step_000003"
    with open(tmp_path / "checkpoints" / "step_000003" / "optimizer.pt", "r+b") as handle:
        handle.seek(10)
        handle.write(b"\x00corrupt")
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_000003.*optimizer.pt"):
        assert find_checkpoint(tmp_path).name == "step_000002"
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
