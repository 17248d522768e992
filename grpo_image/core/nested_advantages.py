"""Advantages of nested groups: K AR samples per prompt, G decoder samples of each with the codes fixed.

When the AR policy and the decoder learn in the same run (`train.target: both`), each prompt's K code samples are
decoded G times each. Each reward feeds the policy, the decoder, or both (the recipe says which, as GLM-Image's
decoupled RL sends aesthetics and alignment to the AR model and detail and text to the decoder):
- the decoder's advantage of image (k, g) compares it with the other decodes of the same codes: its scores
  normalised within its (prompt, AR sample) group of G, the decoder rewards only;
- the policy's advantage of sample k compares its expected reward, the mean over its G decodes, with the prompt's
  other samples: normalised within the prompt's group of K, the policy rewards only.
Averaging over the decodes is what takes the decoder's noise out of the policy's signal.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from grpo_image.core.advantages import group_advantages


def nested_group_advantages(
    scores: np.ndarray,  # float [B*K*G, R]: prompt-major, then AR sample, then decode
    policy_weights: Sequence[float],  # [R]: each reward's weight in the policy's advantage (0: not fed)
    decoder_weights: Sequence[float],  # [R]: and in the decoder's
    *,
    samples: int,  # K
    decodes: int,  # G
    scale: str = "group",
    aggregation: str = "sum_then_normalize",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy advantages float32 [B*K], decoder advantages float32 [B*K*G])."""
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape[0] % (samples * decodes):
        raise ValueError(f"nested advantages: {scores.shape[0]} rows are not whole groups of {samples} x {decodes}")
    decoder, _ = group_advantages(scores, decoder_weights, group_size=decodes, scale=scale, aggregation=aggregation,
                                  eps=eps)  # [B*K*G]
    with np.errstate(invalid="ignore"):  # a sample whose decodes all failed a reward: NaN, as a failed score
        means = np.nanmean(scores.reshape(-1, decodes, scores.shape[1]), axis=1)  # [B*K, R]
    policy, _ = group_advantages(means, policy_weights, group_size=samples, scale=scale, aggregation=aggregation,
                                 eps=eps)  # [B*K]
    return policy, decoder
