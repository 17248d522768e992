"""Decoder GRPO on several processes, rehearsed on gloo with the tiny bf16 GLM-Image of tests/test_decoder_grpo.py:
what a real 8-GPU run relies on. Each rank decodes its own prompts' code samples and trains the decoder's adapters
on them; the adapters' gradients are averaged over ranks and the scores gathered before the nested advantages, so
the ranks must hold the same adapters after every step and the run must be the single-process run; a checkpoint
(rank 0 writes decoder/) must resume anywhere; a step's windows, conditioning and images must be released after it
(at real size they are gigabytes a step); and with Ray workers the images the trainer made are what gets scored."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from grpo_image.app.cli import main
from grpo_image.base.logging import read_metrics
from tests import helpers_decoder_distributed as helpers
from tests.test_cli_train import comparable
from tests.test_decoder_grpo import write_recipe
from tests.test_distributed import on_two_ranks

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: see conftest.py; the spawned ranks use one too

ADAPTERS = ("policy/adapter_model.safetensors", "decoder/adapter_model.safetensors")
# The recipe (B = 2 prompts: one a rank) with every forward shaped as each rank shapes it, so that one process and
# two compute the same numbers:
# - sampling.batch_size 2 and train.micro_batch_size 1: one process would otherwise sample (and train on) both
#   prompts in one call, left-padding the shorter; bf16 attention over padded rows rounds differently from unpadded
#   rows (measured: log-probs 0.05 apart, and the codes diverge after about 20 draws);
# - decoder_train.window 1: each rank's decoder gradient is then one backward's, g0 on rank 0 and g1 on rank 1, and the
#   all-reduce adds g0 + g1 as one process accumulates them (fp32 addition is commutative; the halving after the sum
#   and the shares 1/2 against 1 in the losses are exact powers of two). With window 2 one process adds
#   ((g0a + g0b) + g1a) + g1b and two (g0a + g0b) + (g1a + g1b), an ulp apart; AdamW's first step moves a weight by
#   lr * g / (|g| + eps), which turns an ulp of a gradient near eps (the keys' adapters here, gradients about 1e-8)
#   into up to lr * ulp / eps (3.5e-7 measured); step 2's bf16 forward rounds such weights differently, a pixel
#   flips and the JPEG reward moves discontinuously: the runs then agree only to about 1e-4.
SAME_NUMBERS = ["sampling.batch_size=2", "train.micro_batch_size=1", "decoder_train.window=1"]
RUN = ["steps=2", "save_every=1", "keep_checkpoints=0", "sample_every=0", *SAME_NUMBERS]
# Per-rank quantiles averaged over ranks (docs/algorithm.md) are not the whole batch's quantiles: not compared.
PER_RANK_QUANTILES = ("train/logprob_diff/",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread) -> dict:
    """The recipe on one process; on two (each rank's decoder adapters after each step recorded); and two's step-1
    checkpoint resumed on one process for step 2."""
    folder = tmp_path_factory.mktemp("decoder_distributed")
    recipe = write_recipe(folder)
    one, two, resumed = folder / "one", folder / "two", folder / "resumed"
    assert main(["train", str(recipe), f"output_dir={one}", *RUN]) == 0
    ranks = on_two_ranks(functools.partial(helpers.adapters_each_step_on_rank, recipe=str(recipe),
                                           overrides=[f"output_dir={two}", *RUN]), folder)  # fmt: skip
    after_1 = two / "checkpoints" / "step_000001"
    assert main(["train", str(recipe), f"output_dir={resumed}", f"resume={after_1}", *RUN]) == 0
    return {"one": one, "two": two, "resumed": resumed, "ranks": ranks}


def saved_adapters(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    return {part: load_file(run / "checkpoints" / f"step_{step:06d}" / part) for part in ADAPTERS}


def assert_same_adapters(ours: dict, theirs: dict) -> None:
    for part in ADAPTERS:
        assert ours[part].keys() == theirs[part].keys(), part
        for name in ours[part]:  # the same fp32 operations in the same order (above): bit for bit
            torch.testing.assert_close(theirs[part][name], ours[part][name], rtol=0, atol=0, msg=f"{part}: {name}")


def assert_same_metrics(ours: list[dict], theirs: list[dict]) -> None:
    assert [row["step"] for row in theirs] == [row["step"] for row in ours]
    for mine, other in zip(comparable(ours), comparable(theirs)):
        keys = [key for key in mine if not key.startswith(PER_RANK_QUANTILES)]
        assert set(keys) <= set(other)
        # The same scores and weights; a metric that is a mean over ranks of means over each rank's rows is the
        # mean over all rows summed in another order: a few float64 ulps of float32 values (measured: 1e-16
        # relative). rtol 1e-9 admits that and no difference of the numbers themselves (float32: 1e-7 apart at least)
        for key in keys:
            assert other[key] == pytest.approx(mine[key], rel=1e-9, abs=1e-15), f"step {mine['step']}: {key}"


def test_ranks_hold_the_same_decoder_adapters_after_every_step(runs):
    """Replicas that drifted apart by one bit would decode different images for the same codes from then on."""
    zero, one = (rank["adapters"] for rank in runs["ranks"])
    assert len(zero) == len(one) == 2
    for step, (mine, theirs) in enumerate(zip(zero, one), start=1):
        assert mine.keys() == theirs.keys()
        for name in mine:
            torch.testing.assert_close(theirs[name], mine[name], rtol=0, atol=0, msg=f"step {step}: {name}")
    moved = [name for name, value in zero[1].items() if "lora_B" in name and value.abs().max() > 1e-3]
    assert moved, "the decoder's adapters did not move: equal replicas would prove nothing"
    written = saved_adapters(runs["two"], 2)["decoder/adapter_model.safetensors"]  # rank 0 writes decoder/
    assert written.keys() == zero[1].keys() and all(torch.equal(written[k], zero[1][k]) for k in written)


def test_two_processes_train_the_decoder_and_the_policy_like_one(runs):
    one, two = runs["one"], runs["two"]
    assert_same_adapters(saved_adapters(one, 2), saved_adapters(two, 2))
    assert_same_metrics(read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl"))
    assert (two / "metrics.jsonl").read_text().count("\n") == 2  # rank 0 alone logs
    assert json.loads((two / "summary.json").read_text())["processes"] == 2


def test_a_two_process_checkpoint_resumes_on_one_process_like_the_single_process_run(runs):
    one, resumed = runs["one"], runs["resumed"]
    assert_same_adapters(saved_adapters(one, 2), saved_adapters(resumed, 2))
    rows = read_metrics(resumed / "metrics.jsonl")
    assert [row["step"] for row in rows] == [2]
    assert comparable(rows) == comparable(read_metrics(one / "metrics.jsonl"))[1:]  # one process each: exactly


MEMORY_STEPS = 6


@pytest.mark.parametrize("keep", [False, True], ids=["released", "kept (a leak, to show it is seen)"])
def test_resident_memory_after_each_phase_does_not_grow_with_the_steps(tmp_path, keep):
    """Six steps of train.target both on two ranks; each rank's resident memory (the C allocator's free pages
    returned first) after each phase of steps 2..6. At real size a step's decodes hold gigabytes: a trainer that kept
    them past the step would run out of memory after a few steps.

    Bound: a step's decodes hold S bytes on a rank (its images, its windows' latents and log-probs, its decoder
    batches' conditioning: measured, about 590 KB here with 12 decodes per code sample). If each of steps 3..6 kept
    them, memory after a phase would grow by at least 4 S from step 2 to step 6; what a run keeps on purpose
    (metrics, the health checks' histories) grows by about 70 KB a step (measured: 290 KB over the four). Growth
    below S, a quarter of S a step, is a run that releases its decodes; the run that keeps them must exceed 3 S.
    All steps draw prompts of one length, so no step makes new kernel shapes (the kernels' caches grow by a few MB
    the first time a shape is seen, which is not a step's data)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": 'a sign that reads "WARM"', "metadata": {"color": color}}) + "\n"
                               for color in ("#AA5A5A", "#5A5AAA")))  # fmt: skip
    recipe = write_recipe(tmp_path)
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.prompts={prompts}", f"steps={MEMORY_STEPS}",
                 "decoder_train.group_size=12", "save_every=100", "sample_every=0"]
    ranks = on_two_ranks(functools.partial(helpers.memory_on_rank, recipe=str(recipe), overrides=overrides,
                                           keep=keep), tmp_path)  # fmt: skip
    for rank, measured in enumerate(ranks):
        step_bytes = measured["step_bytes"]
        assert len(step_bytes) == MEMORY_STEPS and all(part == step_bytes[0] for part in step_bytes)
        assert step_bytes[0]["windows"] > 0 and step_bytes[0]["conditioning"] > 0
        held_kib = sum(step_bytes[0].values()) / 1024  # S
        for phase in ("decode", "update", "decoder_update", "step"):
            after = measured["phases"][phase]  # KiB after the phase, steps 1..6
            assert len(after) == MEMORY_STEPS, phase
            growth = after[-1] - after[1]
            if keep:
                assert growth > 3 * held_kib, f"rank {rank}, {phase}: {growth} KiB, a step holds {held_kib:.0f}"
            else:
                assert growth < held_kib, f"rank {rank}, {phase}: grew {growth} KiB from step 2 to step " \
                                          f"{MEMORY_STEPS}; a step's decodes hold {held_kib:.0f} KiB"


def test_ray_workers_score_the_trainers_images_without_a_decoder(ray_session, tmp_path, monkeypatch):
    """train.target decoder through Ray workers (num_cpus 0: the session's two CPUs stay with the trainer) scores what
    the in-process pool scores, image for image and exactly: the same images, shipped to another process intact, by
    the same rewards; and the workers hold no decoder (they could not decode codes if the images were missing)."""
    from grpo_image.scoring.ray_pool import RayRewardPool
    from grpo_image.training import train as train_module

    recipe = write_recipe(tmp_path, train={"target": "decoder"})
    gathered, workers_decoders = {"inprocess": [], "ray": []}, []
    gather_scored = train_module.gather_scored
    backend = "inprocess"

    def recorded(world, scored):
        whole = gather_scored(world, scored)
        gathered[backend].append(whole.scores.copy())  # [B*K*G, 2]
        return whole

    class AskedPool(RayRewardPool):
        def gather(self, pending):
            asked = [actor.__ray_call__.remote(lambda worker: worker.decoder) for actor in self.actors]
            workers_decoders.extend(self.ray.get(asked))
            return super().gather(pending)

    monkeypatch.setattr(train_module, "gather_scored", recorded)
    monkeypatch.setattr(train_module, "RayRewardPool", AskedPool)
    assert main(["train", str(recipe), "steps=2", f"output_dir={tmp_path / backend}"]) == 0
    backend = "ray"
    ray = ["workers.backend=ray", "workers.num_workers=2", "workers.num_cpus=0"]
    assert main(["train", str(recipe), "steps=2", f"output_dir={tmp_path / backend}", *ray]) == 0
    assert len(gathered["ray"]) == len(gathered["inprocess"]) == 2
    for step, (want, got) in enumerate(zip(gathered["inprocess"], gathered["ray"]), start=1):
        assert want.shape == (2 * 2 * 3, 2)
        assert len(np.unique(want[:, 1])) > 1, "uniform scores would hide misordered images"
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
    assert workers_decoders and all(decoder is None for decoder in workers_decoders)
    want = comparable(read_metrics(tmp_path / "inprocess" / "metrics.jsonl"))
    assert comparable(read_metrics(tmp_path / "ray" / "metrics.jsonl")) == want  # and so the same updates
