"""The contracts that cross module and process boundaries.

Everything here is a plain dataclass of numpy arrays, tensors and builtins, so that it pickles across a
process boundary (reward workers) and says in one place what shape each field has. Shape names:
B prompts, G group size, N = B * G rollouts, L image codes per rollout, K rewards, V codes in the codebook.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a prompt set.

    `metadata` is the only channel from a prompt set to a reward: e.g. `metadata["text"]` is the text an
    OCR reward expects to see, `metadata["color"]` the colour the demo's colour reward asks for.
    """

    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)


CJK = "\u4e00-\u9fa5"  # the CJK ideographs LongText-Bench's published scorer counts as Chinese, as a regex range
_HAS_CJK = re.compile(f"[{CJK}]")


def text_language(text: str | Sequence[str]) -> str:
    """'zh' when a target text has a CJK character, else 'en': the language of `metadata["lang"]` when a prompt set
    does not say, which decides whether text is compared as characters or as words."""
    joined = text if isinstance(text, str) else " ".join(text)
    return "zh" if _HAS_CJK.search(joined) else "en"


@dataclass(frozen=True)
class RewardOutput:
    """What a reward returns for n images.

    `scores` are raw, unweighted, float32 [n]; NaN means "not applicable to this sample" and nothing else
    (a failure is an exception, never a NaN). `info` holds optional per-call diagnostics (counts, not
    tensors) that the trainer may log.
    """

    scores: np.ndarray  # float32 [n]
    info: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores, dtype=np.float32)
        if scores.ndim != 1:
            raise ValueError(f"RewardOutput.scores must be 1-D [n], got shape {scores.shape}")
        object.__setattr__(self, "scores", scores)


class Reward(Protocol):
    """A reward plugin: built from config inside a worker, heavy imports and weights in `__init__`."""

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        """images: uint8 RGB [n, H, W, 3]; prompts and metadata: n entries each."""
        ...


class Decoder(Protocol):
    """Turns image codes into pixels; stochastic decoders draw only from the given per-sample seeds.

    A decoder whose images depend on the prompt (X-Omni's English one) takes `prompts=` as well; a policy may put
    codes before the grid's (GLM-Image's preview), which its decoder skips: L >= h * w.
    """

    def __call__(self, codes: np.ndarray, grid: tuple[int, int], seeds: np.ndarray) -> np.ndarray:
        """codes: int64 [n, L]; grid (h, w); seeds: int64 [n]; returns uint8 RGB [n, H, W, 3]."""
        ...


class FlowDecoder(Protocol):
    """A flow-matching decoder that decoder GRPO trains (`train.target: decoder | both`; docs/algorithm.md).

    Built on the trainer's device from a recipe's `Decoder` (`grpo_image.decoders.flow_decoder`); m rollouts of one
    prompt at a time (a GRPO group's decodes share their conditioning). Latents are fp32 [m, ...] in the layout the
    family's transformer takes; `velocity` is computed with grad when grad is enabled.
    """

    transformer: Any  # the torch module that carries the LoRA adapters
    scheduler: Any  # a FlowMatchEulerDiscreteScheduler; `set_timesteps` gives it the training schedule
    max_batch_size: int | None  # rollouts per transformer call (None: a whole group)
    lora_targets: str  # regex over the transformer's module names: the family's adapted projections

    def set_timesteps(self, grid: tuple[int, int], num_inference_steps: int) -> None:
        """The schedule (timesteps and shifted sigmas) the family's own pipeline samples this grid with."""
        ...

    def velocity(self, codes: torch.Tensor, grid: tuple[int, int], prompt: str, guidance_scale: float | None):
        """The guided velocity for m rollouts of one prompt: `(latents [m, ...], timestep [m]) -> fp32 [m, ...]`.
        codes int64 [m, L]; guidance_scale None: the decoder's own, 1: one conditional pass."""
        ...

    def initial_latents(self, grid: tuple[int, int], generators: list[torch.Generator]) -> torch.Tensor:
        """fp32 [m, ...] noise, row i drawn from generators[i] as the family's pipeline draws it."""
        ...

    def to_images(self, latents: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
        """Final latents [m, ...] -> uint8 RGB [m, H, W, 3], as the family's decoder turns them into pixels."""
        ...


class Policy(Protocol):
    """What the sampler and the teacher-forced pass need of a model family (`grpo_image.policies` implements it
    for causal LMs with a code id range, X-Omni, Janus-Pro and GLM-Image).

    R rows (2N under classifier-free guidance), P prefix tokens (left-padded), L codes, H hidden, V codes. Positions
    are [R, T] for 1-D RoPE or [3, R, T] for 3-axis RoPE; they are concatenated along the last dimension.
    """

    model: Any  # the torch module the optimizer trains (peft-wrapped for LoRA)
    grid: tuple[int, int]  # (h, w) of the decoded image grid
    num_codes: int  # V
    pad_token_id: int

    @property
    def num_positions(self) -> int:
        """L: codes sampled per rollout."""
        ...

    @property
    def device(self) -> torch.device: ...

    def encode(self, prompts: list[str], unconditional: bool = False) -> list[list[int]]:
        """Each row's prefix ids, ending right before code 0 (the empty prompt's row when unconditional)."""
        ...

    def prefix_positions(self, mask: torch.Tensor) -> torch.Tensor:
        """Positions of left-padded prefixes: mask [R, P] -> [R, P] or [3, R, P]."""
        ...

    def code_positions(self, mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Positions of codes start..stop-1 after each row's prefix: [R, stop - start] or [3, R, stop - start]."""
        ...

    def new_cache(self, rows: int, max_tokens: int, bucket: int = 1) -> Any:
        """A KV cache allocated once for `max_tokens` tokens per row, with `attend_over(held, exact=False) -> width`:
        the next forward attends over its first `width` positions (`held`, or rounded up to a multiple of `bucket`)."""
        ...

    def forward_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """ids [R, T], mask [R, past + T] (or the call's full width), positions -> final hidden [R, T, H], cache."""
        ...

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The V code rows of the head only: [..., H] -> [..., V]."""
        ...

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """The input ids the model embeds for codes (same shape)."""
        ...


@dataclass
class Rollout:
    """A batch of N = B * G sampled images, as codes, with everything needed to reproduce it.

    Groups are contiguous: rows g*G .. g*G+G-1 share one prompt. Any logged image and score can be rebuilt from
    (checkpoint, step, index): the codes from the sampling seeds of (seed, step) and the pixels from `decode_seeds`.
    """

    codes: torch.Tensor  # int64 [N, L]
    old_logprobs: torch.Tensor  # float32 [N, L], behaviour log-probs (see docs/algorithm.md)
    decode_seeds: torch.Tensor  # int64 [N]
    records: list[PromptRecord]  # N entries, record i belongs to row i
    grid: tuple[int, int]  # (h, w) in codes, L = h * w
    filtered_mass: torch.Tensor | None = None  # float32 [N, L], the mass the sampling filters removed before each draw

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.records]

    @property
    def metadata(self) -> list[dict[str, Any]]:
        return [r.metadata for r in self.records]


@dataclass
class ScoredBatch:
    """What the reward pool returns for one rollout batch.

    `scores` are raw [N, K] in the recipe's reward order (NaN only by the reward contract);
    `thumbnails` are a few small uint8 images with the row index each belongs to, for logging;
    `info` sums the rewards' diagnostic counts ("reward/<name>/<key>"); `worker_seconds` is the wall time of the
    slowest chunk inside its worker (decode + score), to compare with how long the trainer waited.
    """

    scores: np.ndarray  # float32 [N, K]
    reward_names: list[str]  # K
    thumbnails: np.ndarray  # uint8 [T, h, w, 3]
    thumbnail_rows: list[int]  # T, indices into the N rollouts
    info: dict[str, float] = field(default_factory=dict)
    worker_seconds: float = 0.0
