"""Every reward of a recipe on a batch of decoded images, under the training rules, for workers and evaluation.

One set of rules wherever images are scored (the reward workers during training, `grpo-image eval` over folders):
a required reward that raises or returns an infinite score stops with a message naming the reward and the first
sample it fails on alone; an optional one scores NaN for those samples and counts them (`failed`, `nonfinite`);
only NaN, "not applicable", is ever passed on.
"""

from __future__ import annotations

import numpy as np

from grpo_image.core.types import RewardOutput


class RewardFailure(RuntimeError):
    """A required reward failed, or the reward pool gave up on a chunk: the message names the reward or the samples.

    It is the one failure that leaves a step cleanly unapplied (rewards are gathered before any update), so the
    trainer checkpoints the step before and stops; every other exception is treated as a crash.
    """


def score_images(
    specs: list[dict], rewards: list, images: np.ndarray, prompts: list[str], metadata: list[dict], first_row: int = 0
) -> tuple[np.ndarray, dict[str, float]]:
    """Every reward on decoded images under the training rules: scores float32 [n, K] and summed info counts.

    A required reward that raises or returns an infinite score fails with a message naming it and the sample; an
    optional one scores NaN for those samples and counts them (`failed`, `nonfinite`). Used by the workers and by
    evaluation, so that both score alike. `first_row` numbers the samples in messages.
    """
    scores = np.full((len(prompts), len(rewards)), np.nan, dtype=np.float32)  # [n, K]
    info: dict[str, float] = {}
    for k, (spec, reward) in enumerate(zip(specs, rewards)):
        output = _run_one(spec, reward, images, prompts, metadata, first_row)
        scores[:, k] = output.scores
        for key, value in output.info.items():
            info[f"reward/{spec['name']}/{key}"] = info.get(f"reward/{spec['name']}/{key}", 0.0) + value
    return scores, info


def _run_one(spec: dict, reward, images: np.ndarray, prompts: list[str], metadata: list[dict], first_row: int) -> RewardOutput:
    """The reward's output; an optional reward that failed scores NaN and counts its samples as failed."""
    n = len(prompts)
    try:
        output = reward(images, prompts, metadata)
    except Exception as err:
        if spec["required"]:
            where = _culprit(reward, images, prompts, metadata, first_row)
            raise RewardFailure(f"required reward '{spec['name']}' failed on {where}: {err}") from err
        return RewardOutput(np.full(n, np.nan, dtype=np.float32), {"failed": float(n)})
    if not isinstance(output, RewardOutput) or output.scores.shape != (n,):
        raise RewardFailure(
            f"reward '{spec['name']}' returned {type(output).__name__} with a wrong shape on samples "
            f"{first_row}..{first_row + n - 1}; expected RewardOutput with scores of shape ({n},)"
        )
    infinite = np.flatnonzero(np.isinf(output.scores))
    if infinite.size:  # only NaN has a meaning ("not applicable"); an infinite score is a fault
        first = first_row + int(infinite[0])
        if spec["required"]:
            raise RewardFailure(f"required reward '{spec['name']}' returned an infinite score for sample {first}")
        scores = np.where(np.isinf(output.scores), np.nan, output.scores).astype(np.float32)
        return RewardOutput(scores, {**output.info, "nonfinite": float(infinite.size)})
    return output


def _culprit(reward, images: np.ndarray, prompts: list[str], metadata: list[dict], first_row: int) -> str:
    """Name the first sample the reward fails on alone, so that the message points at the bad input."""
    for i in range(len(prompts)):
        try:
            reward(images[i : i + 1], prompts[i : i + 1], metadata[i : i + 1])
        except Exception:
            return f"sample {first_row + i} (prompt {prompts[i]!r})"
    return f"samples {first_row}..{first_row + len(prompts) - 1} (together; each alone succeeds)"
