"""Run health warnings: each check on hand-built step sequences, then on real CLI runs built to trigger it.

The unit tests feed `HealthMonitor` metrics and scores whose outcome follows from the thresholds by hand; the runs
are the tiny colour recipe at test size with a reward (or a threshold) that makes one failure happen, and the
same recipe left alone, which must stay silent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from grpo_image.app.cli import main
from grpo_image.training.health import HealthMonitor, HealthSettings
from grpo_image.base.logging import RunLogger, read_metrics
from grpo_image.core.types import RewardOutput

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")
SMALL = [  # the colour demo at test size: N = 2 * 4 rollouts of 2 x 2 codes, a 1-layer model, in-process rewards
    f"data.prompts={REPO / 'prompts' / 'tiny_colors.jsonl'}", "data.batch_size=2", "data.group_size=4",
    "policy.hidden_size=32", "policy.num_layers=1", "policy.grid=[2,2]", "save_every=100", "sample_every=0",
    "logging.tensorboard=false",
]


class Constant:
    """Scores every image alike: no group ever has any spread."""

    def __init__(self, value: float = 0.5):
        self.value = value

    def __call__(self, images, prompts, metadata):
        return RewardOutput(np.full(len(prompts), self.value, dtype=np.float32))


class AlwaysNaN:
    """Not applicable to any sample, as a reward whose metadata key no prompt has."""

    def __call__(self, images, prompts, metadata):
        return RewardOutput(np.full(len(prompts), np.nan, dtype=np.float32))


class LessRed:
    """1 - the mean red channel: falls exactly as fast as the mean red channel rises."""

    def __call__(self, images, prompts, metadata):
        return RewardOutput((1.0 - images[..., 0].mean(axis=(1, 2)) / 255.0).astype(np.float32))


def reward(name: str, component: str, weight: float = 1.0, **args) -> str:
    extra = "".join(f", {key}: {value}" for key, value in args.items())
    return f"{{name: {name}, weight: {weight}, scorer: {{_component_: {component}{extra}}}}}"


HEALTHY = {"train/grad_norm": 0.5, "train/kl": 0.01, "train/clip_frac": 0.02}


def varied(b: int = 2, g: int = 4, k: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(b * g, k)).astype(np.float32)  # [N, K], spread in every group


def steps(monitor: HealthMonitor, rows: list[tuple[dict, np.ndarray]], first: int = 1) -> list:
    return [w for i, (metrics, scores) in enumerate(rows, start=first) for w in monitor.observe(i, metrics, scores)]


# ---------------------------------------------------------------- the checks, by hand


def test_zero_spread_warns_once_at_patience_naming_only_the_flat_reward():
    monitor = HealthMonitor({"patience": 5}, ["ocr", "hps"], group_size=4)
    flat = varied(k=2)
    flat[:4, 0], flat[4:, 0] = 0.0, 1.0  # 'ocr': every group alike (0s, then 1s); 'hps' varies
    warnings = steps(monitor, [(HEALTHY, flat)] * 7)
    assert [(w.step, w.check, w.metric, w.flag) for w in warnings] == [(5, "zero_spread", "reward/ocr",
                                                                         "health/zero_spread")]
    assert "'ocr'" in warnings[0].message and "'hps'" not in warnings[0].message
    assert "steps 1-5" in warnings[0].message
    # One step with spread clears it; five flat steps in a row make it warn again, at step 8 + 5 = 13.
    again = steps(monitor, [(HEALTHY, varied(k=2))] + [(HEALTHY, flat)] * 5, first=8)
    assert [w.step for w in again] == [13]


def test_zero_spread_needs_the_share_of_groups_it_is_given():
    half = varied(k=1)
    half[:4, 0] = 0.3  # group 0 flat, group 1 not: 50 % of the groups
    assert steps(HealthMonitor({"patience": 2}, ["r"], 4), [(HEALTHY, half)] * 3) == []  # default: every group
    fired = steps(HealthMonitor({"patience": 2, "zero_spread_frac": 0.5}, ["r"], 4), [(HEALTHY, half)] * 3)
    assert [(w.step, w.check) for w in fired] == [(2, "zero_spread")]
    assert "at least 50% of the groups" in fired[0].message


def test_all_nan_reward_warns_as_nan_not_as_zero_spread():
    scores = varied(k=2)
    scores[:, 1] = np.nan
    scores[2, 0] = np.nan  # a NaN here and there is "not applicable", not a fault
    warnings = steps(HealthMonitor({"patience": 3}, ["color", "judge"], 4), [(HEALTHY, scores)] * 4)
    assert [(w.step, w.check, w.metric) for w in warnings] == [(3, "nan_reward", "reward/judge")]


@pytest.mark.parametrize("key, value, check", [
    ("train/grad_norm", 0.0, "zero_grad"),  # exactly 0 <= grad_norm_min 0.0
    ("train/kl", 5.5, "kl_runaway"),  # > kl_max 5.0
    ("train/clip_frac", 0.31, "clip_runaway"),  # > clip_frac_max 0.3
    ("decoder/grad_norm", 0.0, "decoder_zero_grad"),  # decoder GRPO's adapters, the same floor
    ("decoder/clip_frac", 0.31, "decoder_clip_runaway"),  # and the same ceiling
])
def test_training_metrics_past_their_threshold_warn(key, value, check):
    monitor = HealthMonitor({}, ["r"], 4)  # the defaults: patience 5
    sick = {**HEALTHY, key: value}
    warnings = steps(monitor, [(sick, varied())] * 4 + [(HEALTHY, varied())] + [(sick, varied())] * 6)
    # Steps 1-4 sick, 5 healthy (the streak restarts), 6-11 sick: five in a row at step 10.
    assert [(w.step, w.check, w.metric) for w in warnings] == [(10, check, key)]
    assert "steps 6-10" in warnings[0].message


def test_thresholds_are_inclusive_or_exclusive_as_documented():
    at_limits = {"train/grad_norm": 1e-9, "train/kl": 5.0, "train/clip_frac": 0.3}  # none crosses its threshold
    assert steps(HealthMonitor({"patience": 1}, ["r"], 4), [(at_limits, varied())] * 3) == []
    floor = steps(HealthMonitor({"patience": 1, "grad_norm_min": 1e-6}, ["r"], 4), [(at_limits, varied())])
    assert [w.check for w in floor] == ["zero_grad"]  # 1e-9 <= 1e-6


def test_weights_that_barely_move_under_a_gradient_warn_once():
    monitor = HealthMonitor({}, ["r"], 4)  # the defaults: patience 5, update_ratio_min 1e-5
    moving = {**HEALTHY, "train/update_ratio": 4e-5}  # LoRA at a learning lr on a 7B-sized layer (defaults.yaml)
    stalled = {**HEALTHY, "train/update_ratio": 4e-6}  # the same at lr 1e-6
    warnings = steps(monitor, [(moving, varied())] * 2 + [(stalled, varied())] * 7)
    assert [(w.step, w.check, w.metric, w.flag) for w in warnings] == [(7, "small_update", "train/update_ratio",
                                                                        "health/small_update")]
    assert "moved by 4e-06 of their norm per step" in warnings[0].message and "steps 3-7" in warnings[0].message
    # A step that moves nothing because nothing pulls (zero gradient) is zero_grad's warning, not this one.
    no_gradient = {**stalled, "train/grad_norm": 0.0}
    assert [w.check for w in steps(HealthMonitor({}, ["r"], 4), [(no_gradient, varied())] * 5)] == ["zero_grad"]
    at_limit = {**HEALTHY, "train/update_ratio": 1e-5}  # strictly below the threshold warns, at it does not
    assert steps(HealthMonitor({"patience": 1}, ["r"], 4), [(at_limit, varied())]) == []
    with pytest.raises(ValueError, match="health.update_ratio_min"):
        HealthSettings(update_ratio_min=-1.0)


def trend_scores(n_steps: int, slopes: list[float], noise: float = 0.02, seed: int = 0) -> list[np.ndarray]:
    """Per step, scores [8, K] around 0.5 + slope_k * step with a per-sample spread of about 0.1."""
    rng = np.random.default_rng(seed)
    return [(0.5 + np.array(slopes) * t + rng.normal(0, 0.1, (8, len(slopes))) + rng.normal(0, noise, len(slopes)))
            .astype(np.float32) for t in range(n_steps)]


def test_one_reward_rising_while_another_falls_warns_once():
    monitor = HealthMonitor({"trend_window": 10}, ["ocr", "hps"], 4)
    # Over 10 steps: ocr +0.03 / step (a change of 0.27, about 2.7 of its spread of 0.1), hps -0.03 / step.
    warnings = steps(monitor, [(HEALTHY, s) for s in trend_scores(14, [0.03, -0.03])])
    assert [(w.step, w.check, w.metric) for w in warnings] == [(10, "reward_tradeoff", "reward/hps")]
    assert "'ocr' rose" in warnings[0].message and "'hps' fell" in warnings[0].message


@pytest.mark.parametrize("slopes", [[0.03, 0.03], [0.03, 0.0], [0.0, 0.0], [0.002, -0.002]])
def test_no_tradeoff_without_opposite_steady_trends(slopes):
    monitor = HealthMonitor({"trend_window": 10}, ["ocr", "hps"], 4)
    assert steps(monitor, [(HEALTHY, s) for s in trend_scores(14, slopes)]) == []


def agreement_rows(n_steps: int, agreement_slope: float, slopes: list[float]) -> list[tuple[dict, np.ndarray]]:
    """Steps whose other-prompt code agreement climbs from 1/16 (a random policy over 16 codes) by a slope a step,
    with noiseless scores [8, K]: each reward's mean 0.5 + slope_k * step, its per-sample spread 0.1."""
    spread = np.tile([[-0.1], [0.1]], (4, len(slopes)))  # [8, K], standard deviation 0.1 around the mean
    return [({**HEALTHY, "sampling/agreement/other_prompts": 1 / 16 + agreement_slope * t},
             (0.5 + np.array(slopes) * t + spread).astype(np.float32)) for t in range(n_steps)]


def test_prompts_converging_on_one_output_while_a_reward_stays_flat_warn_once():
    monitor = HealthMonitor({"trend_window": 10}, ["color", "jpeg"], 4)
    # Over 10 steps the agreement rises by 9 x 0.08 = 0.72 (> collapse_rise 0.1); jpeg +0.03 a step (2.7 of its
    # spread 0.1, past trend_change 0.5), color flat (a change of 0).
    warnings = steps(monitor, agreement_rows(14, 0.08, [0.0, 0.03]))
    expected = [(10, "prompt_collapse", "sampling/agreement/other_prompts")]
    assert [(w.step, w.check, w.metric) for w in warnings] == expected
    assert "reward 'color' stayed flat" in warnings[0].message and "'jpeg'" not in warnings[0].message
    assert "rose by 0.72 to 0.78" in warnings[0].message  # 1/16 + 9 x 0.08 = 0.7825 at step 10


@pytest.mark.parametrize("agreement_slope, slopes", [
    (0.08, [0.03, 0.03]),  # a policy that sharpens on what every prompt asks: every reward rises with the agreement
    (0.0, [0.0, 0.03]),  # outputs that stay apart: a flat reward alone is no collapse
    (0.005, [0.0, 0.03]),  # agreement up by 0.045 over the window: under collapse_rise
])
def test_no_collapse_warning_without_converging_outputs_and_a_flat_reward(agreement_slope, slopes):
    monitor = HealthMonitor({"trend_window": 10}, ["color", "jpeg"], 4)
    assert steps(monitor, agreement_rows(14, agreement_slope, slopes)) == []


def test_disabled_monitor_is_silent_and_bad_settings_fail():
    flat = np.zeros((8, 1), np.float32)
    assert steps(HealthMonitor({"enabled": False, "patience": 1}, ["r"], 4), [({"train/grad_norm": 0.0}, flat)]) == []
    with pytest.raises(ValueError, match="health.patience"):
        HealthSettings(patience=0)
    with pytest.raises(ValueError, match="zero_spread_frac"):
        HealthSettings(zero_spread_frac=0.0)
    with pytest.raises(ValueError, match="collapse_rise"):
        HealthSettings(collapse_rise=0.0)
    with pytest.raises(ValueError, match=r"scores must be \[N, K=1\]"):
        HealthMonitor({}, ["r"], 4).observe(1, HEALTHY, np.zeros((6, 1)))


# ---------------------------------------------------------------- the logger's sinks


def test_warnings_reach_the_row_the_file_and_the_summary_and_survive_a_resume(tmp_path, capsys):
    with RunLogger(tmp_path, total_steps=4, tensorboard=False) as log:
        for step in (1, 2, 3):
            if step in (2, 3):
                log.warn(step, "train/kl", f"kl high at {step}", "health/kl_runaway")
            log.log_metrics(step, {"reward/total/mean": 0.5})
    assert "warning: step 2: train/kl: kl high at 2" in capsys.readouterr().err
    assert [row.get("health/kl_runaway") for row in read_metrics(tmp_path / "metrics.jsonl")] == [None, 1.0, 1.0]
    # Resumed from step 2: step 3's metrics and warning are dropped (the step is run again), step 2's are kept.
    with RunLogger(tmp_path, total_steps=4, start_step=2, tensorboard=False) as log:
        log.log_metrics(3, {"reward/total/mean": 0.5})
        log.warn(4, "reward/ocr", "flat", None)  # no flag: nothing added to the row
        log.log_metrics(4, {"reward/total/mean": 0.5})
        summary = log.finish(1.0)
    assert summary["warnings"] == [{"step": 2, "metric": "train/kl", "message": "kl high at 2"},
                                   {"step": 4, "metric": "reward/ocr", "message": "flat"}]
    assert [sorted(row) for row in read_metrics(tmp_path / "metrics.jsonl")][2:] == [["reward/total/mean", "step"]] * 2
    assert "warning: step 4: reward/ocr: flat" in capsys.readouterr().out  # and again in the printed summary


# ---------------------------------------------------------------- real runs


def train(out: Path, *overrides: str) -> dict:
    assert main(["train", RECIPE, *SMALL, f"output_dir={out}", *overrides]) == 0
    return json.loads((out / "summary.json").read_text())


def test_a_constant_reward_warns_of_zero_spread_and_a_zero_gradient(tmp_path, capsys):
    summary = train(tmp_path, "steps=6", "train.beta=0", f"rewards=[{reward('const', 'tests.test_health.Constant')}]")
    warnings = [(w["step"], w["metric"]) for w in summary["warnings"]]
    assert warnings == [(5, "reward/const"), (5, "train/grad_norm")]  # the default patience: 5 steps in a row
    err = capsys.readouterr().err
    assert "warning: step 5: reward/const: reward 'const' scored all rollouts of a prompt alike" in err
    assert "warning: step 5: train/grad_norm: the gradient norm was 0" in err
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row.get("health/zero_spread") for row in rows] == [None, None, None, None, 1.0, None]
    assert [row.get("health/zero_grad") for row in rows] == [None, None, None, None, 1.0, None]
    logged = [json.loads(line) for line in (tmp_path / "warnings.jsonl").read_text().splitlines()]
    assert logged == summary["warnings"]


def test_an_always_nan_reward_is_named(tmp_path):
    judge = reward("judge", "tests.test_health.AlwaysNaN")
    color = reward("color", "rewards.color.ColorAdherence", 1.0, tolerance=60.0)
    summary = train(tmp_path, "steps=5", "health.patience=3", f"rewards=[{color}, {judge}]")
    assert [(w["step"], w["metric"]) for w in summary["warnings"]] == [(3, "reward/judge")]
    assert "reward 'judge' was NaN (not applicable) for every sample in steps 1-3" in summary["warnings"][0]["message"]


def test_kl_and_clip_fraction_past_their_thresholds_warn(tmp_path):
    summary = train(tmp_path, "steps=4", "train.lr=5e-2", "train.minibatches=2", "health.patience=2",
                    "health.kl_max=1e-6", "health.clip_frac_max=0.0")
    fired = {w["metric"]: w["step"] for w in summary["warnings"]}
    # Step 1's first minibatch is on-policy and its KL 0, but its second one has moved: both are > 0 every step.
    assert fired == {"train/kl": 2, "train/clip_frac": 2}


def test_a_reward_falling_while_another_rises_warns(tmp_path):
    red = reward("red", "tests.helpers_rewards.MeanRed")
    less = reward("less_red", "tests.test_health.LessRed", 0.0)  # weight 0: watched, not optimised
    # The policy paints red within about 6 steps; stop at 10, before its groups go flat (that would warn too).
    summary = train(tmp_path, "steps=10", "train.lr=3e-2", "train.beta=0", "health.trend_window=8",
                    f"rewards=[{red}, {less}]")
    assert [(w["metric"], w["step"]) for w in summary["warnings"]] == [("reward/less_red", 8)]
    assert "reward 'red' rose" in summary["warnings"][0]["message"]


def test_a_policy_rewarded_for_compressibility_alone_paints_every_prompt_alike_and_is_named(tmp_path):
    # JPEG compressibility does not read the prompt: the policy learns one flat image for all of them, whatever colour
    # they name. ColorAdherence, watched at weight 0, stays where a random policy had it while the agreement between
    # the rollouts of different prompts climbs from 1/16 (random over 16 codes) towards 1.
    color = reward("color", "rewards.color.ColorAdherence", 0.0, tolerance=60.0)
    jpeg = reward("jpeg", "rewards.jpeg.JPEGCompressibility", 1.0, quality=75, scale="fraction")  # the demo's setting
    summary = train(tmp_path, "steps=16", "train.lr=3e-2", "train.beta=0", "health.trend_window=8",
                    f"rewards=[{color}, {jpeg}]")
    collapse = [w for w in summary["warnings"] if w["metric"] == "sampling/agreement/other_prompts"]
    assert len(collapse) == 1 and "reward 'color' stayed flat" in collapse[0]["message"], summary["warnings"]
    agreement = [row["sampling/agreement/other_prompts"] for row in read_metrics(tmp_path / "metrics.jsonl")]
    assert agreement[-1] - agreement[0] >= 0.5, agreement  # from about 1/16 towards 1: at least half of the way


def test_lora_at_too_small_a_learning_rate_warns_and_at_a_learning_one_does_not(tmp_path):
    # The tiny policy's layers are 32 wide: lr 1e-7 moves its LoRA (r 16, alpha 32) by 3e-6 to 7e-6 of the adapted
    # weights per step, what a 7B-wide layer gets from LoRA at lr 1e-6 (defaults.yaml); lr 1e-4 moves it by 3e-3.
    stalled = train(tmp_path / "stalled", "steps=5", "train.mode=lora", "train.lr=1e-7")
    assert [(w["step"], w["metric"]) for w in stalled["warnings"]] == [(5, "train/update_ratio")]
    ratios = [row["train/update_ratio"] for row in read_metrics(tmp_path / "stalled" / "metrics.jsonl")]
    assert all(0 < r < 1e-5 for r in ratios), ratios
    assert train(tmp_path / "moving", "steps=5", "train.mode=lora", "train.lr=1e-4")["warnings"] == []


def test_the_colour_demo_stays_silent(tmp_path, capsys):
    summary = train(tmp_path, "steps=12")
    assert summary["warnings"] == []
    assert "warning:" not in capsys.readouterr().err


def test_a_resumed_run_warns_where_an_uninterrupted_one_does(tmp_path):
    """The streaks are checkpointed: stopped after step 2 and resumed, the constant reward still warns at step 5."""
    constant = f"rewards=[{reward('const', 'tests.test_health.Constant')}]"
    straight = train(tmp_path / "straight", "steps=6", "train.beta=0", constant)
    train(tmp_path / "split", "steps=2", "train.beta=0", constant)  # SMALL checkpoints every 2 steps
    resumed = train(tmp_path / "split", "steps=6", "train.beta=0", constant, f"resume={tmp_path / 'split'}")
    assert [w["step"] for w in straight["warnings"]] == [5, 5]
    assert resumed["warnings"] == straight["warnings"]
    assert read_metrics(tmp_path / "split" / "metrics.jsonl")[4]["health/zero_spread"] == 1.0
