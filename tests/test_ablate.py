"""`grpo-image ablate` on a 2 x 2 grid of tiny runs: one table, plots, every reward measured on every run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from grpo_image.base.logging import read_metrics
from tests.helpers_eval import RECIPE, SMALL, cli

GRID = """\
weights:            # 2 x 2: colour on or off, JPEG on or off
  color: [0.8, 0.0]
  jpeg: [0.2, 0.0]
overrides: [steps=2]
"""
RUNS = ["color0.8_jpeg0.2", "color0.8_jpeg0", "color0_jpeg0.2", "color0_jpeg0"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ablation")
    (root / "grid.yaml").write_text(GRID)
    assert cli("ablate", RECIPE, *SMALL, "--grid", root / "grid.yaml", "--out", root / "out") == 0
    return root


def test_runs_share_seed_and_steps_and_differ_in_weights(ablation):
    out = ablation / "out"
    result = json.loads((out / "ablation.json").read_text())
    assert [run["name"] for run in result["runs"]] == RUNS
    assert result["seed"] == 0 and result["steps"] == 2
    for run, (w_color, w_jpeg) in zip(result["runs"], [(0.8, 0.2), (0.8, 0.0), (0.0, 0.2), (0.0, 0.0)]):
        cfg = OmegaConf.load(out / run["name"] / "config.yaml")
        assert (cfg.seed, cfg.steps) == (0, 2)
        assert [(r.name, r.weight) for r in cfg.rewards] == [("color", w_color), ("jpeg", w_jpeg)]
        assert run["weights"] == {"color": w_color, "jpeg": w_jpeg}
    # Step 1 samples before any update from the same seeds: every run logs the same rewards there.
    first = [read_metrics(out / name / "metrics.jsonl")[0] for name in RUNS]
    assert len({(row["reward/color/mean"], row["reward/jpeg/mean"]) for row in first}) == 1


def test_every_reward_is_measured_on_every_run_and_tabled(ablation):
    out = ablation / "out"
    result = json.loads((out / "ablation.json").read_text())
    for run in result["runs"]:
        rows = read_metrics(out / run["name"] / "metrics.jsonl")
        for name in ("color", "jpeg"):  # weight 0 or not
            assert [step for step, value in run["curves"][name]] == [1, 2]
            assert [value for _, value in run["curves"][name]] == [row[f"reward/{name}/mean"] for row in rows]
            # the same two float64 numbers averaged in another order: approx's relative 1e-6 is far above rounding
            assert run["end"][name] == pytest.approx(sum(r[f"reward/{name}/mean"] for r in rows) / 2)
    table = (out / "ablation.md").read_text()
    assert "| run | w color | w jpeg | color start → end | jpeg start → end |" in table
    body = [line for line in table.splitlines() if line.startswith("| color")]
    assert [line.split(" | ")[0][2:] for line in body] == RUNS
    assert all(line.count("→") == 2 and " - →" not in line for line in body)
    for plot in ("color.png", "jpeg.png", "runs.png"):
        assert (out / "plots" / plot).stat().st_size > 10_000
        assert f"(plots/{plot})" in table


def test_a_second_ablation_reuses_finished_runs(ablation, capsys):
    before = {name: (ablation / "out" / name / "metrics.jsonl").stat().st_mtime_ns for name in RUNS}
    assert cli("ablate", RECIPE, *SMALL, "--grid", ablation / "grid.yaml", "--out", ablation / "out") == 0
    assert capsys.readouterr().out.count("(done)") == 4
    assert before == {name: (ablation / "out" / name / "metrics.jsonl").stat().st_mtime_ns for name in RUNS}


def test_grid_errors_exit_2_before_anything_trains(tmp_path, capsys):
    cases = {
        "weights: {hps: [1.0]}": "unknown reward 'hps'; the recipe's rewards are ['color', 'jpeg']",
        "runs: [{name: a, weights: {color: 1.0}, overrides: [seed=3]}]": "every run shares seed, steps",
        "weights: {color: [yes]}": "weight of 'color' must be a number",
        "steps: 3": "a grid is a mapping with 'weights' and/or 'runs'",
    }
    for text, message in cases.items():
        (tmp_path / "grid.yaml").write_text(text)
        assert cli("ablate", RECIPE, *SMALL, "--grid", tmp_path / "grid.yaml", "--out", tmp_path / "out") == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
