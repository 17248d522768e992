"""Nothing lost, nothing let in: refused input, numeric faults, failing rewards, kills, a soak run."""

import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import grpo_image.training.policy_update as policy_update
from grpo_image.app.cli import main
from grpo_image.base.logging import read_metrics
from tests.helpers_checkpoint import saved_weights
from tests.test_cli_train import RECIPE, REPO, SMALL, comparable

PROMPTS = REPO / "prompts" / "tiny_colors.jsonl"


def bad_jsonl(tmp: Path) -> Path:
    path = tmp / "bad.jsonl"
    path.write_text('{"prompt": "a red square", "metadata": {"color": "#FF0000"}}\n{"prompt": "oops", \n')
    return path


def no_colour(tmp: Path) -> Path:
    path = tmp / "plain.jsonl"
    path.write_text('{"prompt": "a red square", "metadata": {"color": "#FF0000"}}\n{"prompt": "a cat"}\n')
    return path


def empty(tmp: Path) -> Path:
    path = tmp / "empty.txt"
    path.write_text("\n\n")
    return path


def malformed_recipe(tmp: Path) -> Path:
    path = tmp / "broken.yaml"
    path.write_text("steps: [1, 2\n")
    return path


CASES = [  # (id, recipe or None for the demo's, overrides(tmp), message)
    ("malformed_yaml", malformed_recipe, lambda t: [], "not valid YAML"),
    ("unknown_key", None, lambda t: ["train.lrr=1"], "unknown key 'train.lrr'; valid keys here are: adam_betas"),
    ("wrong_type", None, lambda t: ["steps=many"], "'steps' must be an integer, got 'many'"),
    ("missing_prompts", None, lambda t: [f"data.prompts={t / 'nope.jsonl'}"], "nope.jsonl"),
    ("missing_policy_folder", None, lambda t: [f"policy.path={t / 'no_model'}"], "'policy.path': no such file or folder"),
    ("empty_prompt_set", None, lambda t: [f"data.prompts={empty(t)}"], "empty.txt"),
    ("invalid_jsonl_line", None, lambda t: [f"data.prompts={bad_jsonl(t)}"], "bad.jsonl:2:"),
    ("prompt_lacks_what_a_reward_needs", None, lambda t: [f"data.prompts={no_colour(t)}"],
     "prompt 2 ('a cat'): required reward 'color' cannot score it: its metadata has no 'color'"),
    ("batch_does_not_divide", None, lambda t: ["data.batch_size=3", "train.minibatches=5"],
     "train.minibatches (5) must divide N = B * G = 12"),
    ("resume_is_not_a_checkpoint", None, lambda t: [f"resume={t}"], "no complete checkpoint found"),
    ("negative_learning_rate", None, lambda t: ["train.lr=-1"], "'train.lr' must be > 0, got -1"),
    ("output_dir_is_a_file", None, lambda t: [f"output_dir={a_file(t)}"], "exists and is not a folder"),
    ("one_rollout_per_group", None, lambda t: ["data.group_size=1"], "'data.group_size' must be >= 2"),
    ("top_p_zero", None, lambda t: ["sampling.top_p=0"], "'sampling.top_p' must be in (0, 1], got 0"),
    ("one_adam_beta", None, lambda t: ["train.adam_betas=[0.9]"], "'train.adam_betas' must be two numbers"),
    ("unknown_scheduler", None, lambda t: ["train.scheduler=nope"], "'train.scheduler' must be one of linear"),
    ("module_is_a_file", None, lambda t: [f"workers.py_modules=[{a_file(t)}]"], "is not a folder"),
    ("negative_timeout", None, lambda t: ["workers.timeout_s=-5"], "'workers.timeout_s' must be > 0, got -5"),
    ("infinite_reward_weight", None, lambda t: ["rewards.0.weight=.inf"], "'rewards.0.weight' must be a finite"),
    ("sampler_batch_below_one_prompt", None, lambda t: ["sampling.cfg_scale=2.0", "sampling.batch_size=1"],
     "sampling.batch_size must be 0 (all rows at once) or at least 2"),
]


def a_file(tmp: Path) -> Path:
    path = tmp / "a_file.txt"
    path.write_text("not a folder\n")
    return path


@pytest.mark.parametrize("recipe, overrides, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_one_line_and_no_run_folder(tmp_path, capsys, recipe, overrides, message):
    out = tmp_path / "run"
    path = str(recipe(tmp_path)) if recipe else RECIPE
    code = main(["train", path, *SMALL, f"data.prompts={PROMPTS}", f"output_dir={out}", *overrides(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("grpo-image: error: ") and "\n" not in err
    assert message in err, err
    assert not out.exists()


def test_every_documented_key_of_a_reward_entry_can_be_set_by_override():
    from grpo_image.base.config import load_recipe, reward_specs

    cfg = load_recipe(RECIPE, ["rewards.0.required=false", "rewards.1.weight=0.5"])
    specs = reward_specs(cfg)
    assert [spec["required"] for spec in specs] == [False, True] and specs[1]["weight"] == 0.5


def test_a_non_finite_loss_skips_the_update_and_the_run_goes_on(tmp_path, monkeypatch):
    real_loss = policy_update.grpo_loss
    calls = {"n": 0}

    def loss_nan_on_third_minibatch(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real_loss(*args, **kwargs)
        return (loss * float("nan"), stats) if calls["n"] == 3 else (loss, stats)

    monkeypatch.setattr(policy_update, "grpo_loss", loss_nan_on_third_minibatch)
    assert main(["train", RECIPE, *SMALL, "steps=3", f"output_dir={tmp_path}"]) == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    # two minibatches a step: call 3 is step 2's first minibatch
    assert [row["train/skipped_updates"] for row in rows] == [0, 1, 0]
    saved = saved_weights(tmp_path / "checkpoints" / "step_000003")
    assert all(torch.isfinite(value).all() for value in saved.values())


def test_repeated_non_finite_updates_stop_the_run_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    real_loss = policy_update.grpo_loss
    monkeypatch.setattr(policy_update, "grpo_loss", lambda *a, **k: (lambda l, s: (l * float("inf"), s))(*real_loss(*a, **k)))
    code = main(["train", RECIPE, *SMALL, "steps=6", "train.max_bad_steps=2", f"output_dir={tmp_path}"])
    assert code == 1
    assert "2 steps in a row had a non-finite loss or gradient (train.max_bad_steps)" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "step_000002").is_dir()  # the weights are untouched: all updates skipped
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2


FAULTY = "rewards=[{name: red, scorer: {_component_: tests.helpers_rewards.FaultOnCall, calls: [3], fault: %s}, required: %s}]"


def test_an_infinite_score_from_an_optional_reward_is_nan_and_counted(tmp_path):
    assert main(["train", RECIPE, *SMALL, "steps=4", FAULTY % ("inf", "false"), f"output_dir={tmp_path}"]) == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row.get("reward/red/nonfinite", 0) for row in rows] == [0, 0, 1, 0]
    assert [row["reward/red/nan"] for row in rows] == [0, 0, 1, 0]
    for row in rows:
        assert all(value is None or math.isfinite(value) for value in row.values())
        assert row["train/skipped_updates"] == 0


@pytest.mark.parametrize("fault, message", [
    ("inf", "required reward 'red' returned an infinite score for sample 1"),
    # a transient fault: retried one sample at a time to find the culprit, every sample succeeds alone
    ("raise", "required reward 'red' failed on samples 0..7 (together; each alone succeeds): reward server unreachable"),
])
def test_a_failing_required_reward_stops_the_run_cleanly_with_a_checkpoint(tmp_path, capsys, fault, message):
    code = main(["train", RECIPE, *SMALL, "steps=5", "save_every=10", FAULTY % (fault, "true"), f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "step 3 failed: " in err and message in err
    assert f"continue with resume={tmp_path}" in err
    assert (tmp_path / "checkpoints" / "step_000002" / "manifest.json").is_file()
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def cli(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "grpo_image", "train", RECIPE, *SMALL, f"output_dir={out}", *overrides]


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return sum(1 for line in open(path) if line.endswith("\n")) if path.exists() else 0


@pytest.mark.timeout(1200)  # five processes start and run; minutes on a busy machine
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_metrics(tmp_path):
    steps = ["steps=12", "save_every=1", "sample_every=0", "logging.tensorboard=false"]
    subprocess.run(cli(tmp_path / "straight", *steps), check=True, cwd=REPO, capture_output=True)
    run = tmp_path / "killed"
    rng = random.Random(0)
    for target in sorted(rng.sample(range(2, 12), 3)):  # kill three times, after these many steps were logged
        resume = [f"resume={run}"] if list((run / "checkpoints").glob("step_*")) else []
        proc = subprocess.Popen(cli(run, *steps, *resume), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while logged_steps(run) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15))  # somewhere inside the next step: sampling, update or checkpoint writing
        assert proc.poll() is None, f"the run ended before it could be killed at step {target}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finish = subprocess.run(cli(run, *steps, f"resume={run}"), cwd=REPO, capture_output=True, timeout=300)
    assert finish.returncode == 0, finish.stderr.decode()[-2000:]
    assert comparable(read_metrics(run / "metrics.jsonl")) == comparable(read_metrics(tmp_path / "straight" / "metrics.jsonl"))


@pytest.mark.timeout(1200)  # 200 steps in a subprocess
def test_soak_memory_stays_flat_and_metrics_finite(tmp_path):
    steps = 200
    proc = subprocess.Popen(cli(tmp_path, f"steps={steps}", "save_every=100", "sample_every=50", "keep_checkpoints=1"),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples = []  # (steps logged, resident MiB)
    metrics = tmp_path / "metrics.jsonl"
    while proc.poll() is None:
        time.sleep(1.0)
        try:
            rss = psutil.Process(proc.pid).memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            break
        done = sum(1 for _ in open(metrics)) if metrics.exists() else 0
        samples.append((done, rss))
    assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    rows = read_metrics(metrics)
    assert len(rows) == steps
    for row in rows:
        for key, value in row.items():
            if key.startswith(("reward/", "train/", "adv/")) and not key.endswith("/nan"):
                assert value is not None and math.isfinite(value), (row["step"], key)
    warm = [rss for done, rss in samples if 50 <= done <= 100]  # after warm-up
    late = [rss for done, rss in samples if done >= 160]
    assert warm and late, samples
    growth = max(late) - min(warm)
    assert growth < 40, f"resident memory grew {growth:.0f} MiB between steps 50-100 and 160-200: {samples}"


def test_a_required_ocr_reward_refuses_prompts_without_target_text(tmp_path, capsys):
    prompts = tmp_path / "signs.jsonl"
    prompts.write_text('{"prompt": "a sign that says \\"OPEN\\""}\n{"prompt": "a shop", "metadata": {"text": "SALE"}}\n'
                       '{"prompt": "a quiet street"}\n')
    ocr = "rewards=[{name: ocr, scorer: {_component_: rewards.ocr.OCR}}]"
    code = main(["train", RECIPE, *SMALL, f"data.prompts={prompts}", ocr, f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "prompt 3 ('a quiet street'): required reward 'ocr' cannot score it: it has no target text" in capsys.readouterr().err
    optional = "rewards=[{name: ocr, required: false, scorer: {_component_: rewards.ocr.OCR}}]"
    assert main(["validate", RECIPE, *SMALL, f"data.prompts={prompts}", optional]) == 0  # optional: scored NaN


def test_a_judge_server_that_is_down_is_retried_then_stops_the_run_cleanly(tmp_path, capsys):
    import socket

    with socket.socket() as probe:  # a port on this machine that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = ("rewards=[{name: judge, scorer: {_component_: rewards.unified_reward.UnifiedReward, "
             f"base_url: 'http://127.0.0.1:{port}/v1', max_retries: 2, backoff: 0.01, timeout: 2}}}}]")
    assert main(["train", RECIPE, *SMALL, "steps=2", judge, f"output_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "step 1 failed: required reward 'judge' failed on sample 0" in err
    assert "no checkpoint is on disk, so there is nothing to resume" in err
