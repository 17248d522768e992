"""Mixed precision that learns: bf16 compute over fp32 master weights (full) or fp32 adapters (LoRA)."""

import copy

import pytest
import torch
from torch import nn

from grpo_image.base.config import load_recipe
from grpo_image.core.logprobs import teacher_forced_logprobs
from grpo_image.core.sampling import SamplingSettings, sample_codes
from grpo_image.training.weights import FullWeights, LoraWeights, keep_fp32_masters
from grpo_image.policies.tiny import tiny_policy
from grpo_image.training.train import build_trainer, grpo_step
from tests.helpers_sampling import assert_on_policy_ratio_within_the_logged_mismatch
from tests.test_cli_train import RECIPE, SMALL

BF16_FULL = [*SMALL, "policy.dtype=bfloat16", "train.mode=full", "train.lr=1e-6", "train.minibatches=1", "steps=1"]


def test_bf16_full_fine_tuning_moves_every_master_weight_that_has_a_gradient(tmp_path):
    trainer = build_trainer(load_recipe(RECIPE, [*BF16_FULL, f"output_dir={tmp_path}"]))
    params = dict(trainer.policy.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32} and trainer.weights.compute_dtype == torch.bfloat16
    before = {name: p.detach().clone() for name, p in params.items()}
    metrics, _ = grpo_step(trainer, 1)  # one minibatch: the gradients left behind are the ones applied
    assert metrics["train/skipped_updates"] == 0
    assert_on_policy_ratio_within_the_logged_mismatch(metrics)
    with_grad = moved = kept_by_bf16 = 0
    for name, param in params.items():
        stepped = param.grad is not None and param.grad != 0  # AdamW moves exactly these (weight decay is 0)
        with_grad += int(stepped.sum())
        moved += int((stepped & (param.detach() != before[name])).sum())
        as_bf16 = param.detach().to(torch.bfloat16) != before[name].to(torch.bfloat16)  # what bf16 storage keeps
        kept_by_bf16 += int((stepped & as_bf16).sum())
        state = trainer.optimizer.state[param]
        assert not state or all(v.dtype == torch.float32 for k, v in state.items() if k != "step")
    assert with_grad > 10_000
    assert moved == with_grad  # every master weight with a gradient moved by its lr-1e-6 update
    assert kept_by_bf16 < 0.2 * with_grad  # bf16 parameters would have rounded most of that update away


def test_lora_on_a_bf16_base_keeps_its_adapters_and_their_optimizer_state_in_fp32(tmp_path):
    trainer = build_trainer(load_recipe(RECIPE, [*SMALL, "policy.dtype=bfloat16", "train.mode=lora",
                                                 "train.lr=1e-3", "steps=1", f"output_dir={tmp_path}"]))
    trainable = trainer.weights.trainable_parameters()
    frozen = [p for p in trainer.policy.model.parameters() if not p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for p in frozen} == {torch.bfloat16} and trainer.weights.compute_dtype is None
    metrics, _ = grpo_step(trainer, 1)
    assert metrics["train/skipped_updates"] == 0
    assert_on_policy_ratio_within_the_logged_mismatch(metrics)
    for param in trainable:
        assert all(v.dtype == torch.float32 for k, v in trainer.optimizer.state[param].items() if k != "step")


def test_full_fine_tuning_in_fp16_is_refused():
    model = tiny_policy(hidden_size=16, num_layers=1, dtype="float16").model
    with pytest.raises(ValueError, match="float16 is not supported .* use dtype bfloat16"):
        keep_fp32_masters(model)


def test_lora_weights_load_into_a_bf16_base():
    policy = tiny_policy(hidden_size=16, num_layers=1, dtype="bfloat16")
    weights = LoraWeights(policy, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    assert {p.dtype for p in weights.trainable_parameters()} == {torch.float32}


def reference_scores_as_the_policy(weights: FullWeights, prompts: list[str], settings: SamplingSettings,
                                   rounded: nn.Module) -> float:
    """Sample codes for `prompts`, check that the reference's log-probs of them are the policy's bit for bit, and
    return how far (max |difference|) the policy's log-probs lie from those of the same policy on `rounded`, a copy
    of the reference with some weights rounded otherwise."""
    policy = weights.policy
    with torch.no_grad(), weights.rollout_weights():
        codes, _ = sample_codes(policy, prompts, torch.arange(len(prompts)), settings)
    with torch.no_grad(), weights.compute():
        logprobs = teacher_forced_logprobs(policy, prompts, codes, settings)  # [n, L]
        with weights.reference() as reference_policy:
            assert torch.equal(teacher_forced_logprobs(reference_policy, prompts, codes, settings), logprobs)
        on_rounded = copy.copy(policy)
        on_rounded.model = rounded
        return (teacher_forced_logprobs(on_rounded, prompts, codes, settings) - logprobs).abs().max().item()


def test_full_fine_tunings_reference_computes_the_policys_log_probs_bit_for_bit_at_half_the_memory(one_thread):
    """The reference copy of a bf16 policy's fp32 masters: Linear weights in bf16 (what autocast rounds the masters
    to for every matrix multiply), embeddings, norms and the image head (lm_head, read in fp32 by `fp32_head`) in
    fp32, so every op of its forward sees the operands the policy's does and the KL before the first update is
    exactly 0."""
    policy = tiny_policy(num_codes=16, grid=(4, 4), hidden_size=64, num_layers=2, seed=3, dtype="bfloat16")
    weights = FullWeights(policy, keep_reference=True)
    reference = weights.reference_policy.model
    linears = {name for name, module in reference.named_modules() if isinstance(module, nn.Linear)}
    for name, param in reference.named_parameters():
        module = name.rsplit(".", 1)[0]
        assert param.dtype == (torch.bfloat16 if module in linears and module != "lm_head" else torch.float32), name
    prompts = ["a red square", "two cats on a mat", "blue", "a green circle"]
    # Every weight in bf16 instead: the embedding's rows move by up to 2^-9 of themselves and the residual stream
    # becomes bf16 (8 bits of mantissa); the log-probs move by about 1e-3 (2.3e-3 measured), far above 1e-4.
    all_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    assert reference_scores_as_the_policy(weights, prompts, SamplingSettings(), all_bf16) > 1e-4
    # 91,712 Linear parameters, of which lm_head's 277 x 64 = 17,728 stay fp32 with the 18,048 others (embedding
    # 277 x 64, norms): 73,984 in bf16 and 35,776 in fp32, 66% of an fp32 copy
    assert sum(p.numel() * p.element_size() for p in reference.parameters()) == 2 * 73_984 + 4 * 35_776
    assert sum(p.numel() for p in policy.model.parameters()) == 91_712 + 18_048


def test_from_an_fp32_stage_the_reference_keeps_the_image_heads_rows_unrounded(one_thread, tmp_path):
    """X-Omni scores codes with mm_head's rows in fp32 (`fp32_head`), reading the fp32 masters unrounded. A previous
    stage's fp32 weights (train.init_from) lie off the bf16 grid, so a bf16 copy of mm_head would give the reference
    other logits than the policy before the first update; kept in fp32 it gives the same, bit for bit."""
    from grpo_image.policies.xomni import tiny_xomni_policy

    stage = tiny_xomni_policy(seed=5)
    with torch.no_grad():
        for param in stage.model.parameters():  # an fp32 stage: every weight moved off the bf16 grid
            param.add_(torch.randn_like(param) * 1e-3)
    stage.save_pretrained(tmp_path / "stage")
    policy = tiny_xomni_policy(seed=5, dtype="bfloat16")
    weights = FullWeights(policy, keep_reference=True, init_from=tmp_path / "stage")
    reference = weights.reference_policy.model
    assert reference.mm_head.weight.dtype == torch.float32 and reference.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(reference.mm_head.weight, stage.model.mm_head.weight)  # the stage's rows, not rounded
    # The head's rows rounded to bf16 instead (relative steps of 2^-9): the logits, hence the log-probs, move by
    # about 2^-9 of a logit's size, far above 0.
    head_bf16 = copy.deepcopy(reference)
    head_bf16.mm_head.weight.data = reference.mm_head.weight.data.bfloat16().float()
    settings = SamplingSettings(min_p=0.03)
    assert reference_scores_as_the_policy(weights, ["a red square", "blue"], settings, head_bf16) > 0


def test_the_reference_shares_the_frozen_weights_instead_of_copying_them(one_thread):
    from grpo_image.policies.glm_image import tiny_glm_image_policy

    policy = tiny_glm_image_policy(64, 64, num_codes=256, dtype="bfloat16")  # vision encoder and VQ model frozen
    weights = FullWeights(policy, keep_reference=True)
    mine = dict(policy.model.named_parameters())
    frozen = [name for name, p in mine.items() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for name, p in mine.items() if name in frozen)
    for name, param in weights.reference_policy.model.named_parameters():
        assert (param is mine[name]) == (name in frozen), name
