"""The decoder demo learns: recipes/tiny_decoder_cpu.yaml as shipped (bf16 aside: the tiny models are fp32, as the
colour demo's), cut to its first 50 steps, over three seeds run side by side in their own processes.

Margins, measured with exactly these runs on two shared cores (steps 41-50 mean minus steps 1-10 mean of the colour
reward): seed 0 +0.095, seed 1 +0.258, seed 2 +0.134; the whole 120 steps end at 0.69-0.84 from 0.20. The
assertion asks for 0.04, under half the smallest rise; a step's mean over its 32 images wobbles by about 0.005, so a
10-step mean by about 0.002.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from grpo_image.base.logging import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS, SEEDS, MARGIN = 50, (0, 1, 2), 0.04


def test_the_decoder_demo_learns_its_colour_over_seeds(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # three runs on two cores: one thread each
    runs = {seed: tmp_path / f"seed_{seed}" for seed in SEEDS}
    started = [
        subprocess.Popen([sys.executable, "-m", "grpo_image", "train", str(REPO / "recipes" / "tiny_decoder_cpu.yaml"),
                          f"seed={seed}", f"steps={STEPS}", f"save_every={STEPS}", "sample_every=0",
                          "logging.tensorboard=false", f"output_dir={run}"],
                         cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for seed, run in runs.items()
    ]  # fmt: skip
    for process in started:
        _, err = process.communicate(timeout=1800)
        assert process.returncode == 0, err[-2000:]
    for seed, run in runs.items():
        colour = np.array([row["reward/color/mean"] for row in read_metrics(run / "metrics.jsonl")])  # [steps]
        assert len(colour) == STEPS and np.isfinite(colour).all()
        rise = colour[-10:].mean() - colour[:10].mean()
        assert rise >= MARGIN, (seed, colour.round(3).tolist())
        assert json.loads((run / "summary.json").read_text())["warnings"] == []  # no health check fires
