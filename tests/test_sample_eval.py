"""`grpo-image sample` and `grpo-image eval` on the tiny model: seeded images, checkpoints, scores and reports."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from grpo_image.base.config import load_recipe
from grpo_image.evaluation.generate import load_policy
from tests.helpers_checkpoint import saved_weights
from tests.helpers_eval import COLORS, RECIPE, SMALL, Images, cli, train_tiny, write_jsonl


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two-step tiny runs in LoRA and full mode."""
    root = tmp_path_factory.mktemp("runs")
    return {mode: train_tiny(root / mode, mode) for mode in ("lora", "full")}


@pytest.fixture
def prompts(tmp_path) -> Path:
    return write_jsonl(tmp_path / "colors.jsonl", COLORS)


def pixels(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_sample_is_seeded_and_independent_of_the_batch(tmp_path, prompts):
    args = ["sample", RECIPE, *SMALL, "--prompts", prompts, "--n", "3"]
    assert cli(*args, "--out", tmp_path / "a") == 0
    assert cli(*args, "--out", tmp_path / "b", "--batch-size", "1") == 0
    assert cli(*args, "--out", tmp_path / "c", "--seed", "1") == 0
    a = pixels(tmp_path / "a")
    assert list(a) == [f"{i:04d}_{k}.png" for i in range(3) for k in (1, 2, 3)]
    assert pixels(tmp_path / "b") == a  # each image has its own seeded stream: batching changes nothing
    assert pixels(tmp_path / "c") != a
    rows = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and rows[4]["prompt"] == "a blue picture" and rows[4]["k"] == 2
    assert len({row["sample_seed"] for row in rows}) == 9 and all(row["seed"] == 0 for row in rows)
    # Image k of a prompt does not depend on how many images are drawn: the first two of n=3 are those of n=2.
    assert cli(*args[:-2], "--n", "2", "--out", tmp_path / "d") == 0
    assert pixels(tmp_path / "d") == {name: data for name, data in a.items() if not name.endswith("_3.png")}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_checkpoint_loads_its_trained_weights(runs, mode):
    cfg = load_recipe(RECIPE, SMALL)
    folder = runs[mode] / "checkpoints" / "step_000002"
    for where in (runs[mode], folder, folder / "policy"):  # a run, a checkpoint, the weights folder itself
        policy = load_policy(cfg, where)
        if mode == "full":
            saved = saved_weights(folder)
            state = policy.model.state_dict()
            assert all(torch.equal(state[name], value) for name, value in saved.items())
        else:
            from peft import get_peft_model_state_dict

            saved = saved_weights(folder)
            state = get_peft_model_state_dict(policy.model, adapter_name="stage_1")  # the run's only stage
            assert saved.keys() == state.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
            assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained, not the init
    base = load_policy(cfg).model.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in load_policy(cfg, runs["full"]).model.state_dict().items())


def test_sample_from_a_checkpoint_differs_from_the_base(tmp_path, runs, prompts):
    args = ["sample", RECIPE, *SMALL, "--prompts", prompts, "--n", "4"]
    assert cli(*args, "--out", tmp_path / "base") == 0
    assert cli(*args, "--out", tmp_path / "full", "--checkpoint", runs["full"]) == 0
    assert pixels(tmp_path / "full") != pixels(tmp_path / "base")
    first = json.loads((tmp_path / "full" / "samples.jsonl").read_text().splitlines()[0])
    assert first["checkpoint"] == str(runs["full"])


def test_eval_compares_two_checkpoints_seed_by_seed(tmp_path, runs, prompts):
    out = tmp_path / "eval"
    assert cli("eval", RECIPE, *SMALL, "--prompts", prompts, "--checkpoint", runs["full"], "--compare", "base",
               "--n", "2", "--seeds", "0", "1", "--out", out) == 0
    result = json.loads((out / "eval.json").read_text())
    assert list(result["models"]) == ["before", "after"]
    assert result["models"] == {"before": {"checkpoint": None}, "after": {"checkpoint": str(runs["full"])}}
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 3 * 2  # models x seeds x prompts x images
    # Each (model, seed) metric is the mean of its images' scores, NaN-free here (every prompt has a colour). The
    # report and this test sum the same float32 scores in float64, in other orders: pytest.approx's default
    # relative 1e-6 is far above that rounding (1e-16), far below any wrong mean or weight.
    mine = [r for r in rows if r["model"] == "after" and r["seed"] == 1]
    assert result["runs"]["after"]["1"]["reward/color"] == pytest.approx(np.mean([r["scores"]["color"] for r in mine]))
    for r in mine:  # the recipe's weights: 0.8 colour + 0.2 JPEG
        assert r["total"] == pytest.approx(0.8 * r["scores"]["color"] + 0.2 * r["scores"]["jpeg"])
    assert result["runs"]["after"]["1"]["reward/total"] == pytest.approx(np.mean([r["total"] for r in mine]))
    for key in ("reward/color", "reward/jpeg", "reward/total"):
        per_seed = [result["runs"]["after"][s][key] - result["runs"]["before"][s][key] for s in ("0", "1")]
        entry = result["comparison"][key]
        assert entry["per_seed_delta"] == pytest.approx(per_seed)
        assert entry["delta"] == pytest.approx(np.mean(per_seed))
        assert entry["delta_std"] == pytest.approx(statistics.stdev(per_seed))  # spread across seeds (ddof=1)
        values = [result["runs"]["after"][s][key] for s in ("0", "1")]
        assert result["summary"]["after"][key]["std"] == pytest.approx(statistics.stdev(values))
    assert any(result["comparison"][k]["delta"] != 0 for k in ("reward/color", "reward/jpeg"))
    markdown = (out / "eval.md").read_text()
    assert ("| metric | before (mean ± std over seeds) | after (mean ± std over seeds) | "
            "delta (after - before) ± std | per-seed deltas |") in markdown
    assert "| reward/color |" in markdown and "![colors, after](grids/colors_after.png)" in markdown
    assert (out / "grids" / "colors_before.png").is_file() and (out / "grids" / "colors_after.png").is_file()
    parser = Images()
    parser.feed((out / "report.html").read_text())
    assert len(parser.sources) == 2 * 3 * 2  # models x prompts x images of the first seed, side by side
    assert all((out / src).is_file() for src in parser.sources)


def test_eval_of_a_folder_scores_as_the_generated_images(tmp_path, prompts):
    generated = tmp_path / "gen"
    assert cli("eval", RECIPE, *SMALL, "--prompts", prompts, "--n", "2", "--out", generated) == 0
    folder = generated / "images" / "model" / "seed_0" / "colors"
    again = tmp_path / "again"
    assert cli("eval", RECIPE, *SMALL, "--prompts", prompts, "--images", folder, "--out", again) == 0
    first = json.loads((generated / "eval.json").read_text())["runs"]["model"]["0"]
    second = json.loads((again / "eval.json").read_text())["runs"]["images"]["0"]
    assert first == second  # PNG is lossless: a saved image scores as it did in memory


def test_eval_rewards_by_name_or_from_a_file(tmp_path, prompts):
    out = tmp_path / "one"
    assert cli("eval", RECIPE, *SMALL, "--prompts", prompts, "--n", "1", "--rewards", "jpeg", "--out", out) == 0
    assert sorted(json.loads((out / "eval.json").read_text())["runs"]["model"]["0"]) == [
        "reward/jpeg", "reward/jpeg/nan", "reward/total"]
    extra = tmp_path / "rewards.yaml"
    extra.write_text("rewards:\n  - name: strict_color\n"
                     "    scorer: {_component_: rewards.color.ColorAdherence, tolerance: 1.0}\n")
    out = tmp_path / "file"
    assert cli("eval", RECIPE, *SMALL, "--prompts", prompts, "--n", "1", "--rewards", extra, "--out", out) == 0
    assert "reward/strict_color" in json.loads((out / "eval.json").read_text())["runs"]["model"]["0"]


def test_eval_usage_errors_exit_2(tmp_path, prompts, runs, capsys):
    assert cli("eval", RECIPE, *SMALL, "--prompts", prompts, "--rewards", "hps", "--out", tmp_path / "x") == 2
    assert "['hps'] not in the recipe's rewards ['color', 'jpeg']" in capsys.readouterr().err
    assert cli("eval", RECIPE, *SMALL, "--prompts", prompts, "--checkpoint", tmp_path / "nowhere",
               "--out", tmp_path / "x") == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli("eval", RECIPE, *SMALL, "--out", tmp_path / "x") == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert cli("eval", "--prompts", prompts, "--out", tmp_path / "x") == 2
    assert "needs a recipe" in capsys.readouterr().err


def test_the_recipe_init_from_is_the_base_as_in_training(runs):
    # A recipe that starts from the full run's weights (train.init_from) samples from them without a checkpoint.
    saved = saved_weights(runs["full"] / "checkpoints" / "step_000002")
    cfg = load_recipe(RECIPE, [*SMALL, f"train.init_from={runs['full'] / 'checkpoints' / 'step_000002'}"])
    state = load_policy(cfg).model.state_dict()
    assert all(torch.equal(state[name], value) for name, value in saved.items())
