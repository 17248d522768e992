"""Run logging: JSONL, resume, TensorBoard, sample grids, reward curve and summary, all read back from disk."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from grpo_image.base.grids import make_grid
from grpo_image.base.logging import RunLogger, read_metrics

WHITE, RED, GRAY, BLUE = (255, 255, 255), (255, 0, 0), (128, 128, 128), (0, 0, 255)


def _strict_rows(path):
    """json.loads that refuses the NaN/Infinity tokens, which are not JSON."""

    def refuse(token):
        raise AssertionError(f"invalid JSON token {token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_metrics_jsonl_one_valid_line_per_step_nan_as_null(tmp_path):
    with RunLogger(tmp_path, total_steps=3, tensorboard=False) as log:
        log.log_metrics(1, {"reward/total/mean": 0.25, "loss": -0.5})
        log.log_metrics(2, {"reward/total/mean": float("nan"), "loss": float("inf")})
        log.log_metrics(3, {"reward/total/mean": np.float32(0.75), "count": 4})
    rows = _strict_rows(tmp_path / "metrics.jsonl")
    assert rows == [
        {"step": 1, "reward/total/mean": 0.25, "loss": -0.5},
        {"step": 2, "reward/total/mean": None, "loss": None},  # NaN and inf -> null
        {"step": 3, "reward/total/mean": 0.75, "count": 4},  # numpy float -> float, int stays int
    ]
    assert read_metrics(tmp_path / "metrics.jsonl") == rows


def test_non_number_metric_fails_naming_the_key(tmp_path):
    with RunLogger(tmp_path, total_steps=1, tensorboard=False) as log:
        with pytest.raises(TypeError, match="'note'"):
            log.log_metrics(1, {"note": "hello"})


def test_fresh_run_truncates_and_resume_keeps_steps_up_to_start(tmp_path):
    with RunLogger(tmp_path, total_steps=4, tensorboard=False) as log:
        for step in range(1, 5):
            log.log_metrics(step, {"x": float(step)})
    with RunLogger(tmp_path, total_steps=4, start_step=2, tensorboard=False) as log:
        log.log_metrics(3, {"x": 30.0})
    # steps 1..2 of the first run survive, its 3..4 are gone, the resumed step 3 is appended
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0},
                                                        {"step": 3, "x": 30.0}]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    with RunLogger(tmp_path, total_steps=4, tensorboard=False):
        pass
    assert read_metrics(tmp_path / "metrics.jsonl") == []  # start_step 0: a fresh run starts empty


def test_read_metrics_drops_only_a_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "x": null}\n{"step": 2, "x"')  # killed mid-write
    assert read_metrics(path) == [{"step": 1, "x": None}]
    path.write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        read_metrics(path)


def test_tensorboard_scalars_read_back_exactly(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path, total_steps=2) as log:
        log.log_metrics(1, {"reward/total/mean": 0.375})  # 0.375 and 0.8125 are exact in float32
        log.log_metrics(2, {"reward/total/mean": 0.8125})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = [(e.step, e.value) for e in events.Scalars("reward/total/mean")]
    assert scalars == [(1, 0.375), (2, 0.8125)]


def test_grid_geometry_and_cell_positions():
    images = np.full((5, 16, 8, 3), GRAY, dtype=np.uint8)  # [T=5, H=16, W=8, 3]
    images[4] = RED
    images[0, 1, 2] = BLUE  # one source pixel: row 1, column 2 of image 0
    grid = np.asarray(make_grid(images, ["a"] * 5, columns=3))  # uint8 [306, 216, 3]
    # scale s = ceil(128 / max(16, 8)) = 8 -> each image 128 tall, 64 wide
    # cell: 64 + 2*PAD(4) = 72 wide; 128 + 2*4 + 1 caption line * LINE_HEIGHT(17) = 153 tall
    # 5 images in 3 columns -> 2 rows: grid 3*72 = 216 wide, 2*153 = 306 tall
    assert grid.shape == (306, 216, 3)
    # image 4 -> column 4 % 3 = 1, row 4 // 3 = 1: cell origin (x 72, y 153), image at x 76..139, y 157..284
    assert (grid[157:285, 76:140] == RED).all()
    assert tuple(grid[157, 75]) == WHITE and tuple(grid[157, 140]) == WHITE  # padding left and right
    assert tuple(grid[156, 76]) == WHITE and tuple(grid[285, 76]) == WHITE  # padding above and below
    # image 0's pixel (1, 2) becomes the 8x8 block y 4+8..4+15, x 4+16..4+23; its neighbours stay gray
    assert (grid[12:20, 20:28] == BLUE).all()
    assert tuple(grid[11, 20]) == GRAY and tuple(grid[12, 28]) == GRAY
    # the caption band of image 0 (y 4+128+4 = 136 .. 152) holds dark text pixels, nothing else is dark
    band = grid[136:153, 0:72]
    assert (band.max(axis=-1) < 100).any()
    # the empty sixth cell (column 2, row 1) stays white
    assert (grid[153:, 144:] == WHITE).all()


def test_grid_caption_lines_and_upscale_limit():
    images = np.zeros((2, 200, 100, 3), dtype=np.uint8)  # already >= 128 px: scale 1
    grid = make_grid(images, ["one", "two\nthree\nfour"], columns=8)
    # cell: 100 + 8 = 108 wide; 200 + 8 + 3 lines (the most of any caption) * 17 = 259 tall; 2 columns
    assert grid.size == (2 * 108, 259)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        make_grid(images, ["only one"])
    with pytest.raises(ValueError, match="uint8"):
        make_grid(images.astype(np.float32), ["a", "b"])


def test_long_caption_wraps_within_the_cell():
    images = np.zeros((1, 16, 16, 3), dtype=np.uint8)  # scale 8 -> 128 px wide cell content
    grid = make_grid(images, ["word " * 60 + "\nhps 0.231"])
    # the long line is cut to 3 wrapped lines, plus the score line: 4 lines -> 128 + 8 + 4*17 = 204 tall
    assert grid.size == (136, 204)
    band = np.asarray(grid)[136 + 3 * 17:204]  # uint8 [17, 136, 3]: the score line's band
    assert (band.max(axis=-1) < 100).any()


def test_log_images_writes_step_png_and_tensorboard_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = np.full((2, 16, 16, 3), RED, dtype=np.uint8)
    with RunLogger(tmp_path, total_steps=10) as log:
        path = log.log_images(7, images, ["r 0.1", "r 0.2"])
    assert path == tmp_path / "samples" / "step_000007.png"
    assert Image.open(path).size == (2 * 136, 128 + 8 + 17)  # scale 8: cells 136 x 153
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    (image,) = events.Images("samples")
    assert (image.step, image.width, image.height) == (7, 272, 153)


def test_plain_status_lines_when_stdout_is_not_a_terminal(tmp_path, capsys):
    assert not sys.stdout.isatty()  # pytest captures stdout
    with RunLogger(tmp_path, total_steps=25, tensorboard=False) as log:
        for step in range(1, 26):
            log.log_metrics(step, {"reward/total/mean": step / 10, "train/loss": -step / 1000})
    lines = capsys.readouterr().out.splitlines()
    # every max(1, 25 // 10) = 2 steps -> 2, 4, ..., 24 (12 lines), plus the last step 25
    assert [line.split()[1] for line in lines] == [f"{s}/25" for s in range(2, 25, 2)] + ["25/25"]
    assert lines[1].startswith("step 4/25  reward 0.400  loss -0.004  ")
    assert lines[1].endswith(" s/step")


def test_finish_writes_curve_and_returns_hand_computed_summary(tmp_path, capsys):
    with RunLogger(tmp_path, total_steps=12) as log:
        for step in range(1, 13):
            total = float("nan") if step == 2 else step / 10
            log.log_metrics(step, {"reward/total/mean": total, "reward/hps/mean": 1 - step / 20,
                                   "reward/ocr/mean": 0.5, "reward/hps/std": 0.1})
        log.log_images(12, np.zeros((1, 8, 8, 3), dtype=np.uint8), ["x"])
        summary = log.finish(wall_time_s=42.5)
    # start: first 5 steps 0.1, NaN, 0.3, 0.4, 0.5 -> NaN skipped -> 1.3 / 4 = 0.325
    # end: last 5 steps 0.8, 0.9, 1.0, 1.1, 1.2 -> 5.0 / 5 = 1.0
    assert summary["reward_start"] == pytest.approx(0.325)  # float64 means of 4-5 numbers: approx's rel 1e-6 >> 1e-16
    assert summary["reward_end"] == pytest.approx(1.0)
    assert summary["steps"] == 12 and summary["wall_time_s"] == 42.5
    assert summary["run_dir"] == str(tmp_path)
    assert summary["metrics"] == str(tmp_path / "metrics.jsonl")
    assert summary["reward_curve"] == str(tmp_path / "reward_curve.png")
    assert summary["samples"] == str(tmp_path / "samples")
    assert summary["tensorboard"] == str(tmp_path / "tensorboard")
    curve = np.asarray(Image.open(tmp_path / "reward_curve.png").convert("RGB"))  # uint8 [500, 800, 3]
    assert curve.shape == (500, 800, 3)  # figsize 8x5 in at 100 dpi
    assert len(np.unique(curve.reshape(-1, 3), axis=0)) > 10  # lines, text and antialiasing: not blank
    out = capsys.readouterr().out
    assert "12 steps" in out and "0.3250" in out and "1.0000" in out


def test_finish_without_reward_reports_none(tmp_path):
    with RunLogger(tmp_path, total_steps=1, tensorboard=False) as log:
        log.log_metrics(1, {"loss": 0.0})
        summary = log.finish(wall_time_s=1.0)
    assert summary["reward_start"] is None and summary["reward_end"] is None
    assert summary["samples"] is None and summary["tensorboard"] is None
    assert (tmp_path / "reward_curve.png").exists()


def test_wandb_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        RunLogger(tmp_path, total_steps=1, tensorboard=False, wandb={"project": "p"})


def test_wandb_receives_init_config_and_metrics(tmp_path, monkeypatch):
    calls = []

    class FakeWandb:
        def init(self, **config):
            calls.append(("init", config))

        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    with RunLogger(tmp_path, total_steps=1, tensorboard=False, wandb={"project": "p", "mode": "offline"}) as log:
        log.log_metrics(1, {"reward/total/mean": 0.5})
    assert calls == [("init", {"project": "p", "mode": "offline"}), ("log", {"reward/total/mean": 0.5}, 1),
                     ("finish",)]
