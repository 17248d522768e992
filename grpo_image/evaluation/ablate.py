"""`grpo-image ablate`: train one recipe under a grid of reward weights, then compare the runs.

The grid file (YAML) says which weights to try:

    weights:            # reward name -> weights to try; one run per combination (the cartesian product)
      color: [0.8, 0.0]
      jpeg: [0.2, 0.0]
    runs:               # and/or runs named one by one
      - {name: color_only, weights: {color: 1.0, jpeg: 0.0}, overrides: [train.lr=1e-2]}
    overrides: [steps=20]   # key=value applied to every run

A reward a run does not name keeps the recipe's weight; weight 0 turns a reward off for training while it is
still computed and logged. Every reward of the recipe is therefore measured on every run, and every run has the
recipe's seed and steps (a run's own overrides may not change seed, steps, output_dir, resume or rewards): the
runs differ in their weights and nothing else that is random.

Each run trains into `OUT/<run name>/` (all of train's outputs, reward_curve.png included). A run already complete
there is reused and an interrupted one resumes from its newest checkpoint, so a killed ablation continues where it
stopped; a folder holding a run of another config is refused. Then OUT gets ablation.json, ablation.md (one
table: each run's weights and every reward's mean over its first and last steps), plots/<reward>.png (that reward
over steps, a line a run) and plots/runs.png (each run's rewards, a panel a run).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

from omegaconf import OmegaConf

from grpo_image.base.config import load_recipe, reward_specs
from grpo_image.base.logging import read_metrics
from grpo_image.training.preflight import preflight

GRID_KEYS = {"weights", "runs", "overrides"}
RUN_KEYS = {"name", "weights", "overrides"}
SHARED = ("seed", "steps", "output_dir", "resume", "rewards")  # what a single run may not override
EDGE_STEPS = 5  # start / end of a run: means over its first and last min(5, steps) steps
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


class AblationError(ValueError):
    """A grid file that cannot run: the message names the file and the key."""


def read_grid(path: str | Path, reward_names: list[str]) -> list[dict]:
    """The runs of a grid file: [{"name", "weights": {reward: w}, "overrides": [...]}], global overrides included."""
    path = Path(path)
    if not path.is_file():
        raise AblationError(f"{path}: grid file not found")
    grid = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(grid, dict) or set(grid) - GRID_KEYS or not ({"weights", "runs"} & set(grid)):
        raise AblationError(f"{path}: a grid is a mapping with 'weights' and/or 'runs' (and 'overrides'); "
                            f"got keys {sorted(grid) if isinstance(grid, dict) else type(grid).__name__}")
    shared = _overrides(grid.get("overrides", []), f"{path}: overrides", allow_shared=True)
    runs = []
    axes = grid.get("weights") or {}
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise AblationError(f"{path}: 'weights' maps reward names to non-empty lists of weights")
    for combo in itertools.product(*axes.values()) if axes else []:
        weights = dict(zip(axes, combo))
        runs.append({"name": "_".join(f"{k}{v:g}" if _is_number(v) else f"{k}{v}" for k, v in weights.items()),
                     "weights": weights, "overrides": shared})
    for index, run in enumerate(grid.get("runs") or []):
        where = f"{path}: runs.{index}"
        if not isinstance(run, dict) or set(run) - RUN_KEYS or "name" not in run:
            raise AblationError(f"{where}: a run is {{name, weights, overrides}}")
        runs.append({"name": str(run["name"]), "weights": run.get("weights") or {},
                     "overrides": shared + _overrides(run.get("overrides", []), f"{where}.overrides", False)})
    names = [run["name"] for run in runs]
    for run in runs:
        if not _SAFE_NAME.match(run["name"]) or names.count(run["name"]) > 1:
            raise AblationError(f"{path}: run name {run['name']!r} must be unique and a plain folder name")
        for reward, weight in run["weights"].items():
            if reward not in reward_names:
                raise AblationError(f"{path}: run {run['name']!r}: unknown reward {reward!r}; "
                                    f"the recipe's rewards are {reward_names}")
            if not _is_number(weight):
                raise AblationError(
                    f"{path}: run {run['name']!r}: weight of {reward!r} must be a number, got {weight!r}")
    if not runs:
        raise AblationError(f"{path}: the grid has no runs")
    return runs


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _overrides(items, where: str, allow_shared: bool) -> list[str]:
    if not isinstance(items, list) or not all(isinstance(i, str) and "=" in i for i in items):
        raise AblationError(f"{where}: a list of key=value strings")
    for item in items:
        key = item.split("=", 1)[0].strip()
        if key.split(".")[0] in SHARED and not (allow_shared and key in ("seed", "steps")):
            raise AblationError(f"{where}: {item!r}: every run shares seed, steps, rewards and its folder layout")
    return list(items)


def run_configs(recipe: str, overrides: list[str], grid: str, out: str | Path):
    """(run, resolved recipe) for every run of the grid, each checked before anything trains."""
    base = load_recipe(recipe, overrides)
    names = [spec["name"] for spec in reward_specs(base)]
    configs = []
    for run in read_grid(grid, names):
        weights = [f"rewards.{names.index(r)}.weight={float(w)}" for r, w in run["weights"].items()]
        cfg = load_recipe(recipe, [*overrides, *run["overrides"], *weights, f"output_dir={Path(out) / run['name']}"])
        preflight(cfg)
        configs.append((run, cfg))
    return configs


def ablate(recipe: str, overrides: list[str], grid: str, out: str | Path) -> dict:
    """Train every run of the grid (reusing finished ones), then write the comparison table and plots."""
    from grpo_image.training.stops import TrainingStopped
    from grpo_image.training.train import train

    out = Path(out)
    configs = run_configs(recipe, overrides, grid, out)
    for index, (run, cfg) in enumerate(configs, start=1):
        run_dir = Path(cfg.output_dir)
        state = _state(run_dir, cfg)
        print(f"ablation run {index}/{len(configs)}: {run['name']} ({state})", flush=True)
        if state == "done":
            continue
        if state == "resume":
            cfg.resume = str(run_dir)
        try:
            train(cfg)
        except TrainingStopped as err:  # the other runs still go ahead; the table marks this one
            run["stopped"] = str(err)
            print(f"ablation run {run['name']} stopped: {err}", flush=True)
    return write_comparison(configs, out)


def _state(run_dir: Path, cfg) -> str:
    """'new', 'resume' (an interrupted run of this config) or 'done'; another config's run is an error."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return "new"
    ours, theirs = OmegaConf.to_container(cfg), OmegaConf.to_container(OmegaConf.load(saved))
    ours.pop("resume"), theirs.pop("resume", None)
    if ours != theirs:
        raise AblationError(f"{run_dir} holds a run of another config; give another --out or remove it")
    if (run_dir / "summary.json").is_file():
        return "done"
    return "resume" if list((run_dir / "checkpoints").glob("step_*")) else "new"


def write_comparison(configs, out: Path) -> dict:
    names = [spec["name"] for spec in reward_specs(configs[0][1])]
    runs = []
    for run, cfg in configs:
        rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
        curves = {name: [(r["step"], r.get(f"reward/{name}/mean")) for r in rows] for name in names}
        edges = {name: (_edge(curve[:EDGE_STEPS]), _edge(curve[-EDGE_STEPS:])) for name, curve in curves.items()}
        runs.append({"name": run["name"], "run_dir": str(cfg.output_dir), "steps": len(rows),
                     "stopped": run.get("stopped"),
                     "weights": {s["name"]: s["weight"] for s in reward_specs(cfg)},
                     "start": {n: e[0] for n, e in edges.items()}, "end": {n: e[1] for n, e in edges.items()},
                     "curves": curves})
    seed, steps = configs[0][1].seed, configs[0][1].steps
    result = {"rewards": names, "seed": seed, "steps": steps, "runs": runs,
              "table": str(out / "ablation.md"), "plots": [str(p) for p in plot_runs(runs, names, out)]}
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    (out / "ablation.md").write_text(_markdown(runs, names, seed, steps, result["plots"], out), encoding="utf-8")
    return result


def _edge(points) -> float | None:
    values = [v for _, v in points if v is not None]
    return sum(values) / len(values) if values else None


def _markdown(runs, names, seed, steps, plots, out: Path) -> str:
    header = ["run", *[f"w {n}" for n in names], *[f"{n} start → end" for n in names]]
    lines = [f"# Reward ablation: {len(runs)} runs, seed {seed}, {steps} steps each", "",
             f"Every reward is measured on every run (weight 0: logged, not trained on). Start and end: means of "
             f"reward/<name>/mean over the first and last {EDGE_STEPS} steps.", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for run in runs:
        name = run["name"] + (f" (stopped after {run['steps']} steps)" if run["stopped"] else "")
        cells = [name, *[f"{run['weights'][n]:g}" for n in names],
                 *[f"{fmt(run['start'][n])} → {fmt(run['end'][n])}" for n in names]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *[f"![{Path(p).stem}]({Path(p).relative_to(out).as_posix()})" for p in plots], ""]
    return "\n".join(lines)


def plot_runs(runs, names, out: Path) -> list[Path]:
    """plots/<reward>.png (a line a run) and plots/runs.png (a panel a run, a line a reward)."""
    from matplotlib.figure import Figure

    (out / "plots").mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        fig = Figure(figsize=(7, 4.5), dpi=100)
        ax = fig.add_subplot()
        for run in runs:
            _line(ax, run["curves"][name], run["name"])
        _decorate(ax, f"reward/{name}/mean by run (seed and steps shared)")
        paths.append(out / "plots" / f"{name}.png")
        fig.savefig(paths[-1])
    cols = min(3, len(runs))
    rows = -(-len(runs) // cols)
    fig = Figure(figsize=(4.5 * cols, 3.5 * rows), dpi=100)
    for index, run in enumerate(runs, start=1):
        ax = fig.add_subplot(rows, cols, index)
        for name in names:
            _line(ax, run["curves"][name], f"{name} (w {run['weights'][name]:g})")
        _decorate(ax, run["name"])
    fig.tight_layout()
    paths.append(out / "plots" / "runs.png")
    fig.savefig(paths[-1])
    return paths


def _line(ax, curve, label: str) -> None:
    points = [(s, v) for s, v in curve if v is not None]
    if points:
        ax.plot(*zip(*points), label=label, marker="o" if len(points) < 12 else None)


def _decorate(ax, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
