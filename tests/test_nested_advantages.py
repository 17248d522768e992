"""Nested-group advantages (grpo_image/core/nested_advantages.py) against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grpo_image.core.nested_advantages import nested_group_advantages


def test_nested_advantages_equal_a_hand_computation():
    # B 1 prompt, K 2 AR samples, G 2 decodes; rewards: [aesthetic -> policy, ocr -> decoder]
    scores = np.array([[1.0, 0.2], [3.0, 0.6],   # sample 0: aesthetic mean 2, ocr 0.2 / 0.6
                       [5.0, 0.9], [7.0, 0.1]],  # sample 1: aesthetic mean 6, ocr 0.9 / 0.1
                      dtype=np.float32)
    policy, decoder = nested_group_advantages(scores, [1.0, 0.0], [0.0, 1.0], samples=2, decodes=2, eps=0.0)
    # policy: means 2 and 6 over K = 2: centred -2, +2, population std 2 -> -1, +1
    assert torch.allclose(policy, torch.tensor([-1.0, 1.0]))
    # decoder: within each sample's two decodes of ocr: (0.2, 0.6) -> -1, +1; (0.9, 0.1) -> +1, -1
    assert torch.allclose(decoder, torch.tensor([-1.0, 1.0, 1.0, -1.0]), atol=1e-6)  # float32 of 0.2 and 0.6


def test_the_policy_sees_the_mean_over_decodes_not_the_decoder_noise():
    generator = np.random.default_rng(0)
    codes_quality = np.repeat(np.array([0.0, 1.0, 2.0]), 4)  # K 3 samples x G 4 decodes
    noise = generator.normal(0, 0.1, size=12)
    scores = (codes_quality + noise)[:, None].astype(np.float32)  # [12, 1]
    policy, decoder = nested_group_advantages(scores, [1.0], [1.0], samples=3, decodes=4)
    assert torch.equal(torch.argsort(policy), torch.tensor([0, 1, 2]))  # the codes' order, whatever the noise
    assert torch.allclose(decoder.view(3, 4).sum(1), torch.zeros(3), atol=1e-5)  # centred within each sample


def test_rows_that_are_not_whole_nested_groups_are_refused():
    with pytest.raises(ValueError, match="whole groups of 2 x 2"):
        nested_group_advantages(np.zeros((6, 1)), [1.0], [1.0], samples=2, decodes=2)
