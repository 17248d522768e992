"""Every reward can be named in a recipe: `validate` imports it and binds its arguments without loading weights."""

from __future__ import annotations

import pytest

from grpo_image.base.config import RecipeError, validate_components

REWARD_NODES = {
    "hpsv2": {"_component_": "rewards.hpsv2.HPSv2", "version": "v2.1", "checkpoint": "/w/HPS_v2.1_compressed.pt"},
    "clip": {"_component_": "rewards.clip_score.CLIPScore", "model_path": "/w/clip-vit-large-patch14"},
    "pick": {
        "_component_": "rewards.pickscore.PickScore",
        "model_path": "/w/PickScore_v1",
        "processor_path": "/w/CLIP-ViT-H-14-laion2B-s32B-b79K",
    },
    "aesthetic": {
        "_component_": "rewards.aesthetic.Aesthetic",
        "model_path": "/w/clip-vit-large-patch14",
        "head_path": "/w/sa_0_4_vit_l_14_linear.pth",
    },
    "ocr": {"_component_": "rewards.ocr.OCR", "engine": "rapidocr", "metric": "accuracy"},
    "unified": {
        "_component_": "rewards.unified_reward.UnifiedReward",
        "base_url": "http://localhost:8080/v1",
        "rubric": "2.0",
        "fields": ["alignment"],
        "api_key_env": "JUDGE_API_KEY",
        "max_concurrency": 16,
    },
    "alignment": {"_component_": "rewards.vlm_alignment.VLMAlignment", "base_url": "http://x/v1", "model": "qwen"},
    "jpeg": {"_component_": "rewards.jpeg.JPEGCompressibility", "quality": 75},
    "color": {"_component_": "rewards.color.ColorAdherence"},
}


@pytest.mark.parametrize("name", sorted(REWARD_NODES))
def test_reward_nodes_validate_without_loading_anything(name):
    rewards = [{"name": name, "weight": 1.0, "scorer": REWARD_NODES[name]}]
    assert validate_components(rewards, "rewards") == 1


def test_a_misspelt_argument_names_the_reward():
    node = {"_component_": "rewards.unified_reward.UnifiedReward", "base_url": "http://x/v1", "rubrik": "2.0"}
    with pytest.raises(RecipeError, match=r"rewards\.0\.scorer.*UnifiedReward.*rubrik"):
        validate_components([{"name": "u", "scorer": node}], "rewards")
