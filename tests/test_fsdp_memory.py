"""FSDP's memory over a run, rehearsed on two gloo processes with the bf16 tiny policy, against the memory plan.

A real run holds memory across hundreds of steps: whatever a phase gathers must be freed when it ends, step after
step, and what a process holds between phases is what `grpo-image plan` budgets for. The ranks run full fine-tuning
with FSDP as the shipped full recipes do (fp32 master shards, bf16 compute, a bf16 reference, gradient
checkpointing) through rollout, reference and update passes for several steps; what they hold is read from the
tensors themselves (the local shards of parameters, gradients and AdamW moments; the all-gather outputs FSDP keeps
for gathered layers), and the start-up's peak from every allocation made while the weights are built.
"""

import pytest
import torch

from tests import helpers_fsdp_memory as helpers
from tests.test_distributed import on_two_ranks

TERMS = ("weights", "reference", "gradients", "optimizer")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return on_two_ranks(helpers.fsdp_memory_on_rank, tmp_path_factory.mktemp("fsdp_memory"))


def test_no_layer_of_the_policy_or_the_reference_is_left_gathered_after_any_phase(ranks):
    for rank in ranks:
        assert [(step, phase) for step, phase, _ in rank["after"]] == [
            (step, phase) for step in range(1, helpers.STEPS + 1) for phase in ("rollout", "reference", "update")
        ]
        for step, phase, held in rank["after"]:
            assert held["policy gathered"] == held["reference gathered"] == 0, (step, phase, held)
            assert held["policy layers not sharded"] == held["reference layers not sharded"] == 0, (step, phase)


def test_between_phases_each_rank_holds_exactly_the_planned_terms(ranks):
    """Exact: every sharded dimension of the tiny policy divides by 2, so no shard is padded."""
    for rank in ranks:
        planned, phases = rank["planned"]["held"], rank["planned"]["phases"]
        before = {**planned, "gradients": 0, "optimizer": 0}  # AdamW's moments and gradients come with the 1st update
        assert {term: rank["before_update"][term] for term in TERMS} == before
        for step, phase, held in rank["after"]:
            expected = before if step == 1 and phase != "update" else planned
            assert {term: held[term] for term in TERMS} == expected, (step, phase)
            assert sum(held[term] for term in TERMS) <= phases[phase]
        assert sum(planned.values()) == rank["planned"]["resident"]


def test_inside_each_phase_fsdp_gathers_what_the_plan_budgets(ranks):
    for rank in ranks:
        inside, planned = rank["inside"], rank["planned"]
        one_layer = planned["bytes"] * planned["layer"]  # a layer's weights in bf16, gathered
        assert inside["rollout"] == planned["gathered"]["rollout"]  # every policy layer, for the whole rollout
        assert inside["reference"] == one_layer  # one reference layer at a time, freed after its forward
        # a layer and the next one prefetched in the backward (the gradients in flight are not all-gather outputs)
        assert one_layer <= inside["update"] <= 2 * one_layer <= planned["gathered"]["layer"]


def test_the_start_up_peak_is_the_planned_one(ranks):
    """The plan's start-up: the weights and the reference, or the last layer in flight (whole in fp32 with its
    reference copy while both are sharded), whichever is more. The CPU measurement misses only what is free on a
    CPU (the host-to-device copy of each layer before it turns fp32), and adds the rotary buffers' copies (a few
    hundred bytes): 1% covers both."""
    for rank in ranks:
        planned = rank["planned"]["phases"]["start-up"]
        assert rank["startup"] == pytest.approx(planned, rel=0.01)


def test_the_bf16_reference_computes_the_policys_log_probs_before_the_first_update(ranks):
    for rank in ranks:
        assert rank["same_logprobs"]  # bit for bit: the KL before the first update is exactly 0
        assert all(m["train/skipped_updates"] == 0 for m in rank["metrics"])


def test_fsdp_in_bf16_computes_what_one_process_computes(ranks, one_thread):
    """Bit for bit before the first update: FSDP gathers each layer in bf16 (what autocast rounds the fp32 masters to
    without FSDP; the norms' weights are ones, exact in bf16) and leaves the layers' inputs in the residual stream's
    dtype (fp32 under autocast), as one process does."""
    from grpo_image.base.config import instantiate, load_recipe
    from grpo_image.core.logprobs import teacher_forced_logprobs
    from grpo_image.core.sampling import SamplingSettings
    from grpo_image.training.weights import FullWeights

    cfg = load_recipe(helpers.REPO / "recipes" / "tiny_cpu.yaml", helpers.OVERRIDES)
    policy = instantiate(cfg.policy)
    weights = FullWeights(policy, keep_reference=False)
    settings = SamplingSettings.from_config(cfg.sampling)
    for rank in ranks:
        prompts, codes, sharded = rank["rollout"]
        with torch.no_grad(), weights.compute():
            assert torch.equal(teacher_forced_logprobs(policy, prompts, codes, settings), sharded)
