"""Run logging: metrics JSONL (always), TensorBoard, W&B (when asked), sample grids, progress, warnings, summary.

metrics.jsonl is the source of truth: one flushed line per step, so a killed run loses at most the line
being written and every other sink (TensorBoard, W&B, the reward curve) can be rebuilt from it. Health
warnings (a run that cannot learn, see grpo_image/training/health.py) go to the console above the progress bar,
to warnings.jsonl (flushed, like the metrics), as a `health/<check>` flag in their step's metrics row and
into the summary, so that a run that looks healthy but is not says so wherever the user looks.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from grpo_image.base.grids import make_grid

REWARD_KEY = "reward/total/mean"  # the live reward shown by the progress bar and the summary
LOSS_KEY = "train/loss"  # shown in the plain status line when the step logged it
def _json_value(key: str, value: Any) -> int | float | None:
    """A JSON-valid number: ints stay ints, NaN/inf become null (JSON has no token for them)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}") from e
    return number if math.isfinite(number) else None


def _parse_jsonl(path: Path) -> list[dict]:
    """Rows of a metrics file; an unparsable *last* line is dropped because that is a killed write."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({e.msg}): {line[:80]!r}") from e
    return rows


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl, in file order; metrics logged as NaN/inf come back as None."""
    return _parse_jsonl(Path(path))


class RunLogger:
    """Every sink of a training run behind one object; use as `with RunLogger(...) as log:`.

    A resumed run (start_step > 0) keeps the metrics of steps <= start_step and continues the same file
    and TensorBoard run, so the curves of a killed-and-resumed run have no duplicated steps.
    """

    def __init__(self, run_dir: str | Path, total_steps: int, *, start_step: int = 0,
                 tensorboard: bool = True, wandb: dict | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.total_steps, self.start_step = total_steps, start_step
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.warnings_path = self.run_dir / "warnings.jsonl"
        self.samples_dir = self.run_dir / "samples"
        self.tensorboard_dir = self.run_dir / "tensorboard" if tensorboard else None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._keep_rows_up_to(self.metrics_path, start_step)
        self._keep_rows_up_to(self.warnings_path, start_step)
        self._file = self.metrics_path.open("a", encoding="utf-8")
        self._warnings_file = self.warnings_path.open("a", encoding="utf-8")
        self._warning_count = len(_parse_jsonl(self.warnings_path))  # a resumed run's earlier warnings count too
        self._flags: dict[int, dict[str, float]] = {}  # step -> health flags to add to that step's metrics row
        self._tb = None
        if self.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # imported here: pulls in tensorboard

            # purge_step hides events a killed run wrote after the checkpoint it resumes from
            self._tb = SummaryWriter(str(self.tensorboard_dir), purge_step=start_step + 1 if start_step else None)
        self._wandb = _init_wandb(wandb) if wandb is not None else None
        self._t0 = time.perf_counter()
        self._status_every = max(1, total_steps // 10)
        self._progress = self._task = None
        if sys.stdout.isatty():  # a live bar only on a terminal; CI logs and pipes get plain lines
            self._start_bar()
        self._closed = False

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @staticmethod
    def _keep_rows_up_to(path: Path, step: int) -> None:
        """Drop lines after `step` (all lines for a fresh run); temp file + os.replace so a crash here
        leaves either the old file or the new one, never half of one."""
        if not path.exists():
            return
        kept = [row for row in _parse_jsonl(path) if step > 0 and row["step"] <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row, allow_nan=False) + "\n" for row in kept), encoding="utf-8")
        os.replace(tmp, path)

    def _start_bar(self) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                  TextColumn("reward {task.fields[reward]}"), TextColumn("{task.fields[warnings]}"),
                                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        self._task = self._progress.add_task("train", total=self.total_steps, completed=self.start_step,
                                             reward="-", warnings=self._warnings_field())
        self._progress.start()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Append {"step": step, **metrics} to metrics.jsonl and every other sink.

        NaN and +-inf are written as null in the JSONL (JSON has no token for them; read_metrics returns
        None) and as the float itself to TensorBoard and W&B, which can display them. The flags of warnings
        raised for this step (`warn` before `log_metrics`) join the row.
        """
        metrics = {**metrics, **self._flags.pop(int(step), {})}
        row = {"step": int(step), **{key: _json_value(key, value) for key, value in metrics.items()}}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        floats = {key: float(value) for key, value in metrics.items()}
        if self._tb is not None:
            for key, value in floats.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(floats, step=step)
        self._show_progress(step, row)

    def _show_progress(self, step: int, row: dict) -> None:
        reward = "-" if row.get(REWARD_KEY) is None else f"{row[REWARD_KEY]:.3f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, reward=reward, warnings=self._warnings_field())
        elif step % self._status_every == 0 or step == self.total_steps:
            done = max(1, step - self.start_step)
            loss = f"  loss {row[LOSS_KEY]:.3f}" if row.get(LOSS_KEY) is not None else ""
            seconds = (time.perf_counter() - self._t0) / done
            warned = f"  {self._warnings_field()}" if self._warning_count else ""
            print(f"step {step}/{self.total_steps}  reward {reward}{loss}  {seconds:.1f} s/step{warned}", flush=True)

    def _warnings_field(self) -> str:
        count = self._warning_count
        return "" if not count else f"{count} warning{'s' if count > 1 else ''}"

    def warn(self, step: int, metric: str, message: str, flag: str | None = None) -> None:
        """Report a problem with the run: a console line, a line of warnings.jsonl, the summary's "warnings".

        `flag` (e.g. "health/zero_spread") is set to 1 in step `step`'s metrics row, so call this before that
        step's `log_metrics`. The console line is `warning: step S: METRIC: MESSAGE`, printed above a live
        bar, or on stderr when there is none.
        """
        record = {"step": int(step), "metric": str(metric), "message": str(message)}
        self._warnings_file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._warnings_file.flush()
        self._warning_count += 1
        if flag is not None:
            self._flags.setdefault(int(step), {})[flag] = 1.0
        line = f"warning: step {step}: {metric}: {message}"
        if self._progress is not None:
            self._progress.console.print(line, style="yellow", markup=False, highlight=False)
            self._progress.update(self._task, warnings=self._warnings_field())
        else:
            print(line, file=sys.stderr, flush=True)

    def log_images(self, step: int, images: np.ndarray, captions: list[str]) -> Path:
        """Save a captioned grid of uint8 [T, H, W, 3] images as samples/step_XXXXXX.png (and to TB/W&B)."""
        grid = make_grid(images, captions)
        self.samples_dir.mkdir(exist_ok=True)
        path = self.samples_dir / f"step_{step:06d}.png"
        grid.save(path)
        if self._tb is not None:
            self._tb.add_image("samples", np.asarray(grid), step, dataformats="HWC")  # uint8 [H, W, 3]
        if self._wandb is not None:
            self._wandb.log({"samples": self._wandb.Image(grid)}, step=step)
        return path

    def close(self) -> None:
        """Stop the bar and close every sink; idempotent, so __exit__ after finish() is harmless."""
        if self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.stop()
        self._file.close()
        self._warnings_file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def finish(self, wall_time_s: float) -> dict:
        """Close the sinks, plot the reward curve, print and return a summary of the whole run.

        The summary reads metrics.jsonl back, so a resumed run reports its reward since step 1; start and
        end are means of reward/total/mean over the first and last min(5, n) steps (None where no finite
        reward was logged). `warnings` lists every warning of the run ({step, metric, message}, read back
        from warnings.jsonl, so a resumed run keeps those before the resume). Paths are strings so the dict
        can be dumped as JSON.
        """
        self.close()
        rows = read_metrics(self.metrics_path)
        curve = self.run_dir / "reward_curve.png"
        plot_reward_curve(rows, curve, title=f"Reward: {self.run_dir.name}")
        rewards = [row.get(REWARD_KEY) for row in rows]
        n = min(5, len(rows))
        summary = {
            "reward_start": _mean(rewards[:n]), "reward_end": _mean(rewards[len(rows) - n:]),
            "steps": len(rows), "wall_time_s": float(wall_time_s), "run_dir": str(self.run_dir),
            "metrics": str(self.metrics_path), "reward_curve": str(curve),
            "samples": str(self.samples_dir) if self.samples_dir.is_dir() else None,
            "tensorboard": str(self.tensorboard_dir) if self.tensorboard_dir is not None else None,
            "warnings": _parse_jsonl(self.warnings_path),
        }
        _print_summary(summary)
        return summary


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def _init_wandb(config: dict):
    try:
        import wandb
    except ImportError as e:
        raise ImportError("W&B logging was requested (a wandb config was given) but wandb is not installed: "
                          "pip install wandb, or drop the wandb settings from the recipe") from e
    wandb.init(**config)
    return wandb


def plot_reward_curve(rows: list[dict], path: Path, title: str = "Reward") -> Path:
    """Every reward/<name>/mean over steps, the total thicker; a Figure without pyplot keeps global
    matplotlib state (backend, open figures) untouched."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = sorted({key for row in rows for key in row if key.startswith("reward/") and key.endswith("/mean")})
    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot()
    for name in names:
        points = [(row["step"], row[name]) for row in rows if row.get(name) is not None]
        if points:
            steps, values = zip(*points)
            total = name == REWARD_KEY
            ax.plot(steps, values, label=name.split("/")[1], linewidth=2.8 if total else 1.2,
                    color="black" if total else None, zorder=3 if total else 2)
    if not names:
        ax.text(0.5, 0.5, "no reward/<name>/mean metrics logged", ha="center", va="center",
                transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.savefig(path)
    return path


def _print_summary(summary: dict) -> None:
    from rich.console import Console

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    console = Console()
    console.print(f"[bold]Run finished[/bold]: {summary['steps']} steps in {summary['wall_time_s']:.1f} s")
    console.print(f"  reward {fmt(summary['reward_start'])} (first steps) -> {fmt(summary['reward_end'])} (last steps)")
    for key in ("run_dir", "metrics", "reward_curve", "samples", "tensorboard"):
        if summary[key] is not None:
            console.print(f"  {key:<12} {summary[key]}", highlight=False)
    for warning in summary["warnings"]:
        console.print(f"  warning: step {warning['step']}: {warning['metric']}: {warning['message']}",
                      style="yellow", markup=False, highlight=False)


class SilentLogger:
    """RunLogger's stand-in on training ranks other than 0: they compute the same metrics and write nothing."""

    def __enter__(self) -> "SilentLogger":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def log_metrics(self, step: int, metrics: dict) -> None:
        return None

    def log_images(self, *args) -> None:
        return None

    def warn(self, step: int, metric: str, message: str, flag: str | None = None) -> None:
        return None

    def finish(self, seconds: float) -> dict:
        return {}
