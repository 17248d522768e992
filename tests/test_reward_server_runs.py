"""Rewards served over HTTP inside real runs: the OCR reward of recipes/tiny_text_en.yaml (rapidocr, offline), and a
server of tiny_cpu.yaml's JPEG reward that dies mid-run.

A run whose OCR reward is served by `RewardServer` equals the same run with the reward in process, metric for metric:
the images cross as PNG (lossless), the served OCR is built from the same recipe node and reads with one thread as
the recipe says, so it reads the same pixels with the same arithmetic, and a float32 score crosses JSON exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from grpo_image.app.cli import main
from grpo_image.base.logging import read_metrics
from grpo_image.scoring.reward_server import RewardServer
from rewards.remote import RemoteReward
from tests.helpers_reward_server import REPO, DiesAfter, recipe_batch, recipe_rewards, serving

TEXT_RECIPE = str(REPO / "recipes" / "tiny_text_en.yaml")
TEXT_SIZE = [  # tests/test_text_demo.py's test size for three steps: two words, N = 2 x 8 rollouts, rewards in process
    "data.batch_size=2", "train.lr=5e-3", "train.beta=0", "workers.backend=inprocess", "sample_every=0",
    "logging.tensorboard=false", "seed=0", "steps=3", "save_every=3",
]
COLOR_RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")
COLOR_SIZE = [  # tests/test_cli_train.py's test size: N = 2 x 4 rollouts of 2 x 2 codes, a 1-layer model
    f"data.prompts={REPO / 'prompts' / 'tiny_colors.jsonl'}", "data.batch_size=2", "data.group_size=4",
    "train.minibatches=2", "policy.hidden_size=32", "policy.num_layers=1", "policy.grid=[2,2]", "sample_every=0",
    "logging.tensorboard=false", "steps=3", "save_every=3",
]
FAST = "max_retries: 2, backoff: 0.01, timeout: 60.0"  # quick retries; a generous attempt on two shared cores


def remote(url: str, reward: str) -> str:
    return f'{{_component_: rewards.remote.RemoteReward, base_url: "{url}", reward: {reward}, {FAST}}}'


def comparable(rows: list[dict]) -> list[dict]:
    """Everything but wall-clock timings."""
    return [{key: value for key, value in row.items() if not key.startswith("time/")} for row in rows]


@pytest.fixture(scope="module")
def ocr_server():
    """tiny_text_en.yaml's OCR reward, served as `grpo-image serve-reward` serves it."""
    with serving(RewardServer(recipe_rewards("tiny_text_en.yaml"))) as running:
        yield running


def test_served_ocr_scores_equal_in_process_scores(ocr_server):
    codes = np.random.default_rng(0).integers(0, 11, size=(10, 4))  # int64 [10, L = 1 x 4 glyphs]
    codes[:2] = [[5, 7, 7, 6], [9, 10, 1, 8]]  # "moon", "star": the glyphs " aeilmnorst" spelling prompts 0 and 1
    images, prompts, metadata = recipe_batch("tiny_text_en.yaml", codes, [0, 1] * 5)  # uint8 [10, 56, 112, 3]
    expected = recipe_rewards("tiny_text_en.yaml")["ocr"](images, prompts, metadata)
    got = RemoteReward(ocr_server.url, batch_size=4, backoff=0.01)(images, prompts, metadata)  # 3 requests: 4, 4, 2
    np.testing.assert_array_equal(got.scores, expected.scores)  # exact (module docstring)
    assert got.info == expected.info
    assert expected.scores[:2].tolist() == [1.0, 1.0] and len(set(expected.scores.tolist())) > 2  # read, and varied


def test_a_run_with_the_ocr_reward_served_equals_the_run_in_process(ocr_server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((REPO / "prompts" / "tiny_text_en.jsonl").read_text().splitlines(True)[:2]))
    common = [*TEXT_SIZE, f"data.prompts={prompts}"]
    assert main(["train", TEXT_RECIPE, *common, f"output_dir={tmp_path / 'local'}"]) == 0
    assert main(["train", TEXT_RECIPE, *common, f"output_dir={tmp_path / 'served'}",
                 f"rewards.0.scorer={remote(ocr_server.url, 'ocr')}"]) == 0
    local, served = (comparable(read_metrics(tmp_path / run / "metrics.jsonl")) for run in ("local", "served"))
    assert [row["step"] for row in served] == [1, 2, 3]
    assert served == local  # every reward figure, loss, KL and gradient norm, to the bit
    assert all(0 < row["reward/ocr/mean"] < 1 and math.isfinite(row["train/loss"]) for row in served)


def test_a_required_reward_whose_server_dies_stops_the_run_after_its_retries(tmp_path, capsys):
    with serving(DiesAfter(recipe_rewards("tiny_cpu.yaml"), requests=1)) as dying:  # answers step 1's one request
        code = main(["train", COLOR_RECIPE, *COLOR_SIZE, f"output_dir={tmp_path}",
                     f"rewards.1.scorer={remote(dying.url, 'jpeg')}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "required reward 'jpeg' failed on sample 0" in err, err
    assert f"{dying.url}/score failed after 2 retries" in err and "Connection refused" in err, err
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    assert (tmp_path / "checkpoints" / "step_000001").is_dir()  # the last good step, for resume=


def test_an_optional_reward_whose_server_dies_scores_nan_and_the_run_goes_on(tmp_path):
    with serving(DiesAfter(recipe_rewards("tiny_cpu.yaml"), requests=1)) as dying:
        code = main(["train", COLOR_RECIPE, *COLOR_SIZE, f"output_dir={tmp_path}", "rewards.1.required=false",
                     f"rewards.1.scorer={remote(dying.url, 'jpeg')}"])
    assert code == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[0]["reward/jpeg/nan"] == 0 and math.isfinite(rows[0]["reward/jpeg/mean"])
    for row in rows[1:]:  # every one of the N = 8 samples failed, and the colour reward alone drove the step
        assert (row["reward/jpeg/nan"], row["reward/jpeg/failed"]) == (8, 8.0), row
        assert math.isfinite(row["reward/color/mean"]) and math.isfinite(row["train/loss"])
