"""Code agreement within a prompt and across prompts: hand-counted, and against every pair compared one by one."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from grpo_image.core.agreement import agreement_counts, agreement_from_counts, code_agreement


def test_a_hand_counted_batch():
    # Two prompts of two rollouts, two positions each. Same prompt: (r0, r1) agree at position 0 only, (r2, r3) at
    # position 1 only: 2 of 4 position pairs. Other prompts: (r0, r2) 2, (r0, r3) 1, (r1, r2) 1, (r1, r3) 0: 4 of 8.
    codes = np.array([[0, 1], [0, 2], [0, 1], [3, 1]])
    assert code_agreement(codes, 2) == {"same_prompt": 0.5, "other_prompts": 0.5}


@pytest.mark.parametrize("prompts, group, length, vocab", [(3, 4, 5, 3), (4, 2, 7, 16), (2, 5, 1, 2)])
def test_equals_the_mean_over_every_pair(prompts, group, length, vocab):
    codes = np.random.default_rng(prompts * group).integers(0, vocab, (prompts * group, length))  # [N, L]
    same, other = [], []
    for i, j in itertools.combinations(range(len(codes)), 2):
        (same if i // group == j // group else other).append(np.mean(codes[i] == codes[j]))
    figures = code_agreement(codes, group)
    # Both sides are ratios of integer counts (at most N^2 L = 2,000 here): exact up to float64 rounding, 1e-12.
    assert figures["same_prompt"] == pytest.approx(np.mean(same), abs=1e-12)
    assert figures["other_prompts"] == pytest.approx(np.mean(other), abs=1e-12)


def test_a_policy_that_paints_every_prompt_alike_and_one_that_follows_them():
    alike = np.full((8, 16), 5)  # [N, L]: 4 prompts of 2 rollouts, one flat image for all
    following = np.repeat(np.arange(4), 2)[:, None].repeat(16, axis=1)  # each prompt its own flat image
    assert code_agreement(alike, 2) == {"same_prompt": 1.0, "other_prompts": 1.0}
    assert code_agreement(following, 2) == {"same_prompt": 1.0, "other_prompts": 0.0}


def test_figures_without_pairs_are_left_out_and_partial_groups_refused():
    codes = np.arange(12).reshape(4, 3)
    assert set(code_agreement(codes, 1)) == {"other_prompts"}  # G = 1: no two rollouts of one prompt
    assert set(code_agreement(codes, 4)) == {"same_prompt"}  # one prompt
    with pytest.raises(ValueError, match="not whole groups of 3"):
        code_agreement(codes, 3)


def test_counts_of_two_processes_add_up_to_the_pairs_inside_each():
    # Two ranks of two prompts each (G = 3, L = 4): the summed counts give the mean over the pairs each rank holds,
    # the figures the training loop logs with several processes (their pair counts averaged over ranks).
    codes = np.random.default_rng(7).integers(0, 3, (12, 4))  # [N, L]
    halves = [agreement_counts(codes[:6], 3), agreement_counts(codes[6:], 3)]
    summed = agreement_from_counts({key: halves[0][key] + halves[1][key] for key in halves[0]})
    same, other = [], []
    for rows in (range(0, 6), range(6, 12)):
        for i, j in itertools.combinations(rows, 2):
            (same if i // 3 == j // 3 else other).append(np.mean(codes[i] == codes[j]))
    # integer counts over 6 x 4 comparisons a pair: float64 rounding only, 1e-12
    assert summed["same_prompt"] == pytest.approx(np.mean(same), abs=1e-12)
    assert summed["other_prompts"] == pytest.approx(np.mean(other), abs=1e-12)
