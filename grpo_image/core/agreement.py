"""Code agreement: how often two rollouts hold the same code at the same position, within a prompt and across.

A policy that stops reading its prompt paints every prompt alike: its rollouts for different prompts converge on one
output while the rewards that depend on the prompt stay where they were. Its loss and mean reward look like learning
(a prompt-independent reward such as JPEG compressibility still rises), so the run health check reads these figures.
"""

from __future__ import annotations

import numpy as np


def code_agreement(codes: np.ndarray, group_size: int) -> dict[str, float]:
    """`same_prompt` and `other_prompts`: the share of positions at which two rollouts hold the same code.

    `codes` is int [N, L] with N = B * G rows grouped by prompt. `same_prompt` is the mean over every pair of rollouts
    of one prompt, `other_prompts` over every pair of rollouts of two different prompts; both are exact, counted per
    position from how many rollouts hold each code there (no N x N comparison). A random policy over V codes scores
    about 1/V on both; one that follows its prompts scores high within a prompt and, across, about the share of
    prompt pairs that ask for the same picture; one that paints every prompt alike scores high on both. A figure that
    has no pair (G = 1, or one prompt) is left out.
    """
    return agreement_from_counts(agreement_counts(codes, group_size))


def agreement_counts(codes: np.ndarray, group_size: int) -> dict[str, float]:
    """The pair counts behind `code_agreement`: equal and compared position pairs, within prompts and across.

    Counts from several batches (each process's rows) add up: their sums give the agreement over the pairs inside
    each batch, the same figures estimated without bias from fewer of the cross-prompt pairs.
    """
    n, length = codes.shape
    if group_size < 1 or n % group_size:
        raise ValueError(f"code_agreement: {n} rows are not whole groups of {group_size}")
    prompts = n // group_size
    codes = codes.astype(np.int64)  # [N, L]
    width = int(codes.max(initial=0)) + 1
    position = np.arange(length, dtype=np.int64)  # [L]
    group = np.repeat(np.arange(prompts, dtype=np.int64), group_size)  # [N]
    by_position = position * width + codes  # [N, L], one key per (position, code)
    by_group = (group[:, None] * length + position) * width + codes  # [N, L], one key per (prompt, position, code)
    equal_pairs = _ordered_equal_pairs(by_position)  # pairs (i != j) with the same code at a position, summed
    equal_within = _ordered_equal_pairs(by_group)
    return {"same_equal": equal_within, "same_pairs": length * n * (group_size - 1),
            "other_equal": equal_pairs - equal_within, "other_pairs": length * (n * n - prompts * group_size**2)}


def agreement_from_counts(counts: dict[str, float]) -> dict[str, float]:
    """The figures of `code_agreement` from (summed) `agreement_counts`; one with no pair is left out."""
    return {name: counts[f"{prefix}_equal"] / counts[f"{prefix}_pairs"]
            for name, prefix in (("same_prompt", "same"), ("other_prompts", "other")) if counts[f"{prefix}_pairs"] > 0}


def _ordered_equal_pairs(keys: np.ndarray) -> int:
    """The number of ordered pairs of distinct entries with equal keys: sum over keys of count * (count - 1)."""
    counts = np.unique(keys, return_counts=True)[1].astype(np.int64)
    return int(np.sum(counts * (counts - 1)))
