"""The reward worker: decodes codes, runs every reward in order, handles required and optional failures."""

import numpy as np
import pytest
import torch

from grpo_image.core.types import PromptRecord, Rollout
from grpo_image.scoring.score import RewardFailure
from grpo_image.scoring.workers import InProcessRewardPool, make_job

PALETTE = {"_component_": "grpo_image.decoders.palette.PaletteDecoder", "patch_size": 4}  # black, silver, ... (web colours)


def spec(name, component, required=True, weight=1.0, **kwargs):
    return {"name": name, "weight": weight, "required": required, "scorer": {"_component_": component, **kwargs}}


def rollout(codes):
    codes = torch.tensor(codes)
    n = codes.shape[0]
    records = [PromptRecord(f"p{i}", {"color": "#FF0000"}) for i in range(n)]
    return Rollout(codes, torch.zeros(codes.shape), torch.arange(n), records, (1, 2))


def test_pool_returns_scores_in_reward_order_and_thumbnails():
    pool = InProcessRewardPool(PALETTE, [
        spec("red", "tests.helpers_rewards.MeanRed"),
        spec("color", "rewards.color.ColorAdherence", tolerance=10.0),
    ])
    # code 5 is red #FF0000, code 0 black, code 12 navy #000080; each image is 1 x 2 codes
    batch = rollout([[5, 5], [5, 0], [12, 0]])
    scored = pool.gather(pool.submit(batch, thumbnail_rows=[0, 2]))
    # red channel: [255, 255] -> 1.0; [255, 0] -> 0.5; [0, 0] -> 0.0. Colour fraction against red: 1, 0.5, 0
    np.testing.assert_allclose(scored.scores, [[1.0, 1.0], [0.5, 0.5], [0.0, 0.0]])  # halves: exact in float32
    assert scored.reward_names == ["red", "color"]
    assert scored.thumbnail_rows == [0, 2] and scored.thumbnails.shape == (2, 4, 8, 3)
    assert scored.thumbnails[0, 0, 0].tolist() == [255, 0, 0] and scored.thumbnails[1, 0, 0].tolist() == [0, 0, 128]
    assert not np.isnan(scored.scores).any()


def test_required_reward_failure_names_the_reward_and_the_sample():
    pool = InProcessRewardPool(PALETTE, [spec("judge", "tests.helpers_rewards.Broken")])
    with pytest.raises(RewardFailure, match=r"required reward 'judge' failed on sample 0 \(prompt 'p0'\): model server"):
        pool.gather(pool.submit(rollout([[5, 5], [5, 0], [12, 0]]), []))
    picky = InProcessRewardPool(PALETTE, [spec("ocr", "tests.helpers_rewards.FailsOnPrompt", prompt="p2")])
    with pytest.raises(RewardFailure, match=r"'ocr' failed on sample 2 \(prompt 'p2'\): cannot score 'p2'"):
        picky.gather(picky.submit(rollout([[5, 5], [5, 0], [12, 0]]), []))


def test_reward_info_counts_are_summed_under_the_reward_name():
    pool = InProcessRewardPool(PALETTE, [spec("judge", "tests.helpers_rewards.CountsUnparsed", required=False)])
    scored = pool.gather(pool.submit(rollout([[5, 5], [5, 0], [12, 0]]), []))
    assert scored.info == {"reward/judge/unparsed": 3.0} and np.isnan(scored.scores[:, 0]).sum() == 3
    assert scored.worker_seconds > 0


def test_optional_reward_failure_scores_nan_and_is_counted():
    pool = InProcessRewardPool(PALETTE, [
        spec("judge", "tests.helpers_rewards.Broken", required=False),
        spec("red", "tests.helpers_rewards.MeanRed"),
    ])
    scored = pool.gather(pool.submit(rollout([[5, 5], [0, 0]]), []))
    assert np.isnan(scored.scores[:, 0]).all() and scored.scores[:, 1].tolist() == [1.0, 0.0]
    assert scored.info == {"reward/judge/failed": 2.0}  # logged as reward/judge/failed


def test_a_reward_returning_the_wrong_shape_is_an_error():
    pool = InProcessRewardPool(PALETTE, [spec("bad", "tests.helpers_rewards.WrongShape", required=False)])
    with pytest.raises(RewardFailure, match=r"reward 'bad' returned RewardOutput with a wrong shape.*\(2,\)"):
        pool.gather(pool.submit(rollout([[5, 5], [0, 0]]), []))


def test_a_job_for_part_of_a_batch_keeps_global_sample_numbers():
    job = make_job(rollout([[5, 5], [5, 0], [12, 0], [0, 0]]), thumbnail_rows=[0, 2, 3], start=2, stop=4)
    assert job.first_row == 2 and job.prompts == ["p2", "p3"] and job.thumbnail_rows == [0, 1]
    assert job.codes.tolist() == [[12, 0], [0, 0]] and job.decode_seeds.tolist() == [2, 3]
