"""A run that continues another (`train.init_from`) starts from exactly the model that run trained.

Three LoRA stages of a bf16 tiny policy: attached frozen under the new adapter, every earlier stage survives bit for
bit, and the new run's reference is the model it starts from. An update of 1e-5 of the weights (what a few hundred
RL steps at LoRA learning rates leave) survives an fp32 merge; merged into the bf16 base, as stages were before, it
rounds almost entirely away.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from grpo_image.policies.tiny import tiny_policy
from grpo_image.training.saved_weights import TRAINED_ADAPTER, load_stages, stage_folders
from grpo_image.training.weights import make_weights
from tests.helpers_stages import small_update

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: see conftest.py

VISIBLE, RL_SIZED = 1e-2, 1e-5  # ||scale * B A|| / ||W|| of a stage's adapter: one that moves bf16 logits, an RL one


def new_policy():
    return tiny_policy(num_codes=8, grid=(2, 2), hidden_size=32, num_layers=2, seed=0, dtype="bfloat16")


def train_cfg(init_from: Path | None, r: int):
    return OmegaConf.create({"mode": "lora", "init_from": str(init_from) if init_from else None, "beta": 0.01,
                             "fsdp": False, "lora": {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_regex": None,
                                                     "target_modules": ["q_proj", "v_proj", "up_proj"]}})


def run_stage(root: Path, init_from: Path | None, r: int, seed: int, relative: float = VISIBLE):
    """A stage as a run leaves it: make_weights from init_from, an update, a checkpoint with its config.yaml."""
    policy = new_policy()
    weights = make_weights(policy, train_cfg(init_from, r))
    small_update(weights, seed, relative)
    folder = root / "checkpoints" / "step_000001"
    weights.save(folder / "policy")
    OmegaConf.save(OmegaConf.create({"train": train_cfg(init_from, r)}), folder / "config.yaml")
    return weights, folder


def logits(policy, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return policy.model(input_ids=ids).logits.float()  # [1, T, vocab]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    first, first_ckpt = run_stage(root / "en", None, r=4, seed=1)
    second, second_ckpt = run_stage(root / "zh", first_ckpt, r=2, seed=2)
    return first, first_ckpt, second, second_ckpt


def test_a_stage_starts_from_exactly_the_model_the_last_one_trained_and_that_is_its_reference(stages):
    first, first_ckpt, second, _ = stages
    ids = torch.tensor([first.policy.encode(["a red square"])[0]])
    fresh = make_weights(new_policy(), train_cfg(first_ckpt, r=2))  # the second stage before its first update
    assert fresh.frozen == ["stage_1"]
    trainable = {name for name, p in fresh.policy.model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{TRAINED_ADAPTER}." in name for name in trainable)
    want = logits(first.policy, ids)
    assert torch.equal(logits(fresh.policy, ids), want)  # same bf16 base, same fp32 adapter, same kernels
    with fresh.reference() as reference:
        assert torch.equal(logits(reference, ids), want)
    assert {n for n, p in fresh.policy.model.named_parameters() if p.requires_grad} == trainable  # restored after
    with second.reference() as reference:  # the trained second stage: its reference is still the first's model
        assert torch.equal(logits(reference, ids), want)
    assert not torch.equal(logits(second.policy, ids), want)


def test_a_stage_checkpoint_holds_its_own_adapter_and_resumes(stages):
    _, first_ckpt, second, second_ckpt = stages
    assert sorted(p.name for p in (second_ckpt / "policy").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]  # the frozen stage_1 is not written again
    resumed = make_weights(new_policy(), train_cfg(first_ckpt, r=2))
    resumed.load(second_ckpt / "policy")
    ids = torch.tensor([second.policy.encode(["a blue circle"])[0]])
    assert torch.equal(logits(resumed.policy, ids), logits(second.policy, ids))


def test_three_stages_chain_through_each_checkpoints_config(stages, tmp_path):
    _, first_ckpt, second, second_ckpt = stages
    assert stage_folders(second_ckpt) == [(first_ckpt / "policy").resolve(), (second_ckpt / "policy").resolve()]
    third = make_weights(new_policy(), train_cfg(second_ckpt, r=4))
    assert third.frozen == ["stage_1", "stage_2"]
    ids = torch.tensor([second.policy.encode(["a green tree"])[0]])
    assert torch.equal(logits(third.policy, ids), logits(second.policy, ids))
    seen = new_policy()  # what sample and eval load for the second stage's checkpoint
    load_stages(seen, second_ckpt, merge=False)
    assert torch.equal(logits(seen, ids), logits(second.policy, ids))


def test_an_update_of_1e5_survives_in_fp32_and_rounds_away_merged_into_bf16(tmp_path):
    first, first_ckpt = run_stage(tmp_path / "en", None, r=4, seed=1, relative=RL_SIZED)
    second, second_ckpt = run_stage(tmp_path / "zh", first_ckpt, r=2, seed=2, relative=RL_SIZED)
    base = new_policy()
    name = "model.layers.0.self_attn.q_proj"
    w = base.model.get_submodule(name).weight.float()  # [out, in], the bf16 base exactly

    def delta(weights, adapter):
        module = weights.policy.model.base_model.model.get_submodule(name)
        return module.scaling[adapter] * module.lora_B[adapter].weight @ module.lora_A[adapter].weight  # [out, in]

    fp32_sum = w + delta(first, TRAINED_ADAPTER) + delta(second, TRAINED_ADAPTER)
    merged = new_policy()
    merged.model.float()  # full fine-tuning's fp32 masters of the bf16 base: the stages merged in fp32
    load_stages(merged, second_ckpt, merge=True)
    got = merged.model.get_submodule(name).weight
    update = (fp32_sum - w).norm()
    # fp32 rounding of W + d1 + d2: half an fp32 ULP of W per element, 6e-8 relative to W, is 6e-3 of a 1e-5 update
    assert (got - fp32_sum).norm() <= 1e-2 * update
    bf16_merge = (w + delta(first, TRAINED_ADAPTER)).to(torch.bfloat16).float()  # what stages did before
    kept = (bf16_merge - w).flatten() @ delta(first, TRAINED_ADAPTER).flatten() / delta(first, TRAINED_ADAPTER).norm() ** 2
    assert kept < 0.1, kept  # an update of 1e-5 against half a bf16 ULP (2e-3 relative): almost all of it is gone


def test_the_memory_plan_counts_the_earlier_stages_adapters(stages):
    from grpo_image.planning.memory_plan import stage_adapter_params

    first, first_ckpt, second, second_ckpt = stages
    adapter = lambda weights: sum(p.numel() for n, p in weights.policy.model.named_parameters()  # noqa: E731
                                  if f".{TRAINED_ADAPTER}." in n)
    assert stage_adapter_params(first_ckpt) == adapter(first)  # r 4 on q, v and up of 2 layers
    assert stage_adapter_params(second_ckpt) == adapter(first) + adapter(second)
    assert stage_adapter_params(None) == 0 and stage_adapter_params(first_ckpt.parent / "step_000009") is None
