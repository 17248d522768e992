"""What a step reports besides its update: the rewards' figures, the code agreement of its rollouts, the
captioned thumbnails of sample steps, and how long each phase took.

Code agreement (`grpo_image/core/agreement.py`) is counted on each rank's own groups: the pair counts travel under
private keys in the dict the loop averages over ranks (averaging keeps their ratios, so no rank gathers another's
codes), and `agreement_from_averaged_counts` turns them into `sampling/agreement/{same_prompt,other_prompts}`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch
from omegaconf import DictConfig

from grpo_image.core.advantages import weighted_total
from grpo_image.core.agreement import agreement_counts, agreement_from_counts
from grpo_image.core.types import ScoredBatch

AGREEMENT_COUNT = "_agreement_count/"  # the private keys of the pair counts (never logged)


def reward_metrics(scored: ScoredBatch, weights: list[float]) -> dict[str, float]:
    """Per reward mean, spread and NaN count, and the weighted total (NaN scores left out of the sum)."""
    scores = scored.scores  # [N, K]
    metrics: dict[str, float] = {}
    for k, name in enumerate(scored.reward_names):
        column = scores[:, k]  # [N]
        valid = column[~np.isnan(column)]
        metrics[f"reward/{name}/mean"] = float(valid.mean()) if valid.size else float("nan")
        metrics[f"reward/{name}/std"] = float(valid.std()) if valid.size else float("nan")
        metrics[f"reward/{name}/nan"] = int(np.isnan(column).sum())
    total = weighted_total(scores, weights)  # [N]
    metrics["reward/total/mean"] = float(np.nanmean(total)) if not np.isnan(total).all() else float("nan")
    return metrics


def agreement_counts_to_average(codes: torch.Tensor, group_size: int) -> dict[str, float]:
    """This rank's pair counts of its codes [N/W, L], under the private keys, to go into the dict averaged over
    ranks."""
    counts = agreement_counts(codes.cpu().numpy(), group_size)
    return {AGREEMENT_COUNT + key: float(value) for key, value in counts.items()}


def agreement_from_averaged_counts(metrics: dict[str, float]) -> None:
    """Replace the averaged pair counts in `metrics` by the figures they give, in place."""
    counts = {key[len(AGREEMENT_COUNT):]: metrics.pop(key) for key in list(metrics) if key.startswith(AGREEMENT_COUNT)}
    metrics.update({f"sampling/agreement/{name}": value for name, value in agreement_from_counts(counts).items()})


def thumbnail_rows(cfg: DictConfig, step: int, n: int, group: int | None = None) -> list[int]:
    """First image of up to `logging.num_samples` prompts (groups of `group` images, default data.group_size), on
    the first, every sample_every-th and last step."""
    every = cfg.sample_every
    if every <= 0 or not (step == 1 or step % every == 0 or step == cfg.steps):
        return []
    group = group or cfg.data.group_size
    return list(range(0, n, group))[: cfg.logging.num_samples]


def captioned_samples(scored: ScoredBatch, prompts: list[str]) -> tuple[np.ndarray, list[str]]:
    """The thumbnails the pool returned, each captioned with its prompt and its score under every reward."""
    captions = []
    for row in scored.thumbnail_rows:
        scores = "  ".join(f"{name} {scored.scores[row, k]:.2f}" for k, name in enumerate(scored.reward_names))
        captions.append(f"{prompts[row]}\n{scores}")
    return scored.thumbnails, captions


PHASES = {"rollout": "rollout", "ref": "reference", "old_logprobs": "old log-probs", "decode": "decoder rollouts",
          "reward_wait": "decode and rewards", "update": "update", "decoder_update": "decoder update"}


class StepTimer:
    """Wall seconds per named phase of a step (`time/<name>`); the trainer knows which phase is running."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        self.trainer.phase = PHASES[name]
        yield  # an exception leaves the phase set, for the failure message
        self.trainer.phase = None
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
