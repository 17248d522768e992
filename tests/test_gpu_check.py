"""The GPU check script runs end to end in its CPU smoke mode (the code paths a GPU machine will run)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_gpu_check_smoke_passes(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["passed"] and result["collectives"]["backend"] == "gloo"
    for mode in ("lora", "full"):
        steps = result[f"train_{mode}"]["steps"]
        assert all(s["train/skipped_updates"] == 0 and s["train/grad_norm"] > 0 for s in steps)
    assert result["sampler"]["compiled_codes_equal"]
    # per view bucket: every decode step timed, eager and compiled (L = 16 codes after a short prompt: one bucket)
    buckets = result["sampler"]["buckets"]
    assert [b["view"] for b in buckets] == [256] and buckets[0]["steps"] == 15
    assert buckets[0]["eager_ms"] > 0 and buckets[0]["compiled_ms"] > 0
    # the real-run figures it records: the log-prob mismatch of each sampler path, the checkpoint read back equal
    assert set(result["sampler"]["mismatch"]) == {"eager", "compiled", "eager, bf16 head"}
    assert all(0 <= m["logprob_diff/p99"] <= m["logprob_diff/max"] < 1 for m in result["sampler"]["mismatch"].values())
    checkpoint = result["train_full"]["checkpoint"]
    assert checkpoint["weights_equal"] and checkpoint["bytes"] > 0 and checkpoint["read_s"] > 0
