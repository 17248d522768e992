"""bench/decoder_step.py runs end to end in its smoke mode: the trainer's decoder rollout and update, and the plain
decode, on a one-layer GLM-Image DiT. Its figures are checked to be numbers, never against a clock."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_decoder_step_smoke_gives_finite_positive_figures(tmp_path):
    out = tmp_path / "decoder_step.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "decoder_step.py"), "--smoke", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["samples"]) == {"plain", "plain+lora", "rollout", "update", "vae+text"}
    for runs in result["samples"].values():
        assert runs and all(math.isfinite(s[clock]) and s[clock] > 0 for s in runs for clock in ("wall", "cpu"))
    assert result["all_finite_positive"]
    for clock in ("cpu", "wall"):
        for name, values in result["measured"][clock].items():
            assert values and all(math.isfinite(v) and v > 0 for v in values), (clock, name)
    # the pass count's prediction for the smoke sizes (N 4, w 1): update = 3 w / N of the plain decode
    assert result["expected"]["update/plain"] == pytest.approx(0.75)
    assert result["samples"]["rollout"][0]["extra"]["images_finite"]
    update = result["samples"]["update"][0]["extra"]
    assert update["decoder/skipped_updates"] == 0 and update["decoder/grad_norm"] > 0
    assert update["decoder/ratio_mean_first"] == pytest.approx(1.0, abs=1e-4)  # on-policy before the step
