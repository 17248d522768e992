"""`decoder_seeds`: each rollout decoded with its own seed, or every rollout of a group with the group's one."""

from __future__ import annotations

import json

import pytest
import torch

from grpo_image.core.seeding import STREAM_DECODE, decode_seeds, derive_seeds
from tests.test_cli_train import run


def test_group_seeds_are_each_groups_first_rollout_seed():
    own = decode_seeds(7, 3, group_size=4, count=12)  # [12]
    assert torch.equal(own, derive_seeds(7, 3, STREAM_DECODE, 12))  # per rollout: what runs always used
    shared = decode_seeds(7, 3, group_size=4, count=12, per="group").view(3, 4)  # [B, G]
    assert torch.equal(shared, own.view(3, 4)[:, :1].expand(3, 4))
    assert len(set(shared[:, 0].tolist())) == 3  # groups apart
    with pytest.raises(ValueError, match="per 'rollout' or per 'group'"):
        decode_seeds(7, 3, group_size=4, count=12, per="prompt")


@pytest.mark.parametrize("per", ["rollout", "group"])
def test_the_trainer_decodes_with_the_seeds_the_recipe_asks_for(tmp_path, per):
    log = tmp_path / "seeds.jsonl"
    decoder = [f"decoder={{_component_: tests.helpers_seeds.SeedRecordingDecoder, log: '{log}', patch_size: 8}}"]
    assert run(tmp_path / "run", "steps=1", "workers.prefetch=false", f"decoder_seeds={per}", *decoder) == 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    seeds = torch.tensor([s for call in calls for s in call])  # [N] = B 2 x G 4, in rollout order
    assert torch.equal(seeds, decode_seeds(0, 1, group_size=4, count=8, per=per))  # seed 0, step 1
