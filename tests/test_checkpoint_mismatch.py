"""A checkpoint that does not fit the recipe: refused in one line before any step; other training keys: a warning."""

import pytest

from grpo_image.app.cli import main
from grpo_image.base.logging import read_metrics
from tests.helpers_eval import COLORS, write_jsonl
from tests.test_cli_train import RECIPE, SMALL

ONE_STEP = [*SMALL, "steps=1", "sample_every=0", "logging.tensorboard=false"]


def train(out, *overrides: str) -> int:
    return main(["train", RECIPE, *ONE_STEP, f"output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One-step runs of the tiny policy at hidden size 32: full weights, and LoRA of rank 16."""
    root = tmp_path_factory.mktemp("saved")
    for mode in ("full", "lora"):
        assert train(root / mode, f"train.mode={mode}") == 0
    return root


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("mode, other, message", [
    # the first tensor whose shape differs, in the checkpoint's order: hidden 32 saved, 64 asked for
    ("full", ["policy.hidden_size=64"], "'model.embed_tokens.weight' is [277, 32] in the checkpoint and [277, 64] in "
                                        "the recipe's model"),
    ("lora", ["policy.hidden_size=64"], "is [16, 32] in the checkpoint and [16, 64] in the recipe's model"),
    ("lora", ["train.lora.r=8"], "lora_A.weight' is [16, 32] in the checkpoint and [8, 32] in the recipe's model"),
    ("full", ["train.mode=lora"], "holds full weights (train.mode full) and the recipe trains a LoRA adapter"),
    ("lora", ["train.mode=full"], "holds a LoRA adapter (train.mode lora) and the recipe trains full weights"),
])
def test_resume_into_another_model_is_refused_in_one_line_before_any_step(saved, tmp_path, capsys, mode, other,
                                                                          message):
    run = tmp_path / "run"
    code = train(run, f"train.mode={mode}", "steps=2", f"resume={saved / mode}", *other)
    line = one_error_line(capsys)
    assert code == 2 and line.startswith("grpo-image: error: ") and message in line, line
    assert str(saved / mode / "checkpoints" / "step_000001") in line
    assert not (run / "metrics.jsonl").exists()  # no step ran


def test_resume_with_other_training_keys_names_each_with_both_values_and_goes_on(saved, tmp_path):
    run = tmp_path / "run"
    with pytest.warns(UserWarning) as warned:
        assert train(run, "train.mode=full", "steps=2", f"resume={saved / 'full'}", "train.lr=0.5",
                     "sampling.temperature=0.7", "data.group_size=2", "train.micro_batch_size=2") == 0
    messages = [str(w.message) for w in warned if "resuming" in str(w.message)]
    assert len(messages) == 3, messages  # one a key
    for message, (key, theirs, ours) in zip(messages, (("data.group_size", "4", "2"), ("sampling.temperature",
                                                       "1.0", "0.7"), ("train.lr", "0.001", "0.5"))):
        assert f"'{key}' is {ours} in the recipe and was {theirs} in the checkpoint" in message, message
    # not train.micro_batch_size: how rows are split over forwards changes no number that is trained
    assert [row["step"] for row in read_metrics(run / "metrics.jsonl")] == [2]


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_refuse_a_checkpoint_of_another_size(saved, tmp_path, capsys, command):
    prompts = write_jsonl(tmp_path / "colors.jsonl", COLORS)
    code = main([command, RECIPE, *ONE_STEP, "policy.hidden_size=64", "--prompts", str(prompts), "--out",
                 str(tmp_path / "out"), "--checkpoint", str(saved / "full"), "--n", "1"])
    line = one_error_line(capsys)
    assert code == 2 and "is [277, 32] in the checkpoint and [277, 64] in the recipe's model" in line, line


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_init_from_a_checkpoint_of_another_size_is_refused(saved, tmp_path, capsys, mode):
    checkpoint = saved / mode / "checkpoints" / "step_000001"
    code = train(tmp_path / "run", "policy.hidden_size=64", f"train.init_from={checkpoint}")
    line = one_error_line(capsys)
    assert code == 2 and "in the checkpoint and" in line and "in the recipe's model" in line, line
