"""Run health: warnings for the ways a GRPO run fails without crashing.

A run whose rewards carry no signal still prints a reward and a loss every step and looks healthy: every group
scored alike (zero advantages, nothing learned), a reward that is NaN for every sample, a gradient norm of exactly
0, a KL or clip fraction that keeps climbing, or one reward bought at the price of another. `HealthMonitor` watches
each step's metrics and raw scores and says so, once per episode, naming the metric and the step, when a condition
has held for `patience` steps in a row (the trade-off check looks at a window of steps instead). The thresholds
are the recipe's `health:` keys (see defaults.yaml); the loop passes each warning to the run logger.

Wiring (once before the loop, then after every step, before its metrics are logged):

    monitor = HealthMonitor(cfg.health, reward_names, cfg.data.group_size)
    for warning in monitor.observe(step, metrics, scores):
        log.warn(warning.step, warning.metric, warning.message, warning.flag)

where `scores` is the step's raw scores [N, K] (all ranks' rows) and `log` a RunLogger.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

ZERO_SPREAD = 1e-6  # a group whose float32 scores lie within this of each other scored its rollouts alike


@dataclass(frozen=True)
class HealthWarning:
    """One warning: the step it fired at, the check, the metric it is about and a sentence for the user."""

    step: int
    check: str  # zero_spread, nan_reward, zero_grad, kl_runaway, clip_runaway, reward_tradeoff, prompt_collapse or
    # small_update
    metric: str  # e.g. "reward/ocr", "train/grad_norm"
    message: str

    @property
    def flag(self) -> str:
        """The metrics-row key set to 1 at the step this warning fired at."""
        return f"health/{self.check}"


@dataclass(frozen=True)
class HealthSettings:
    """The `health:` section of a recipe; see defaults.yaml for what each key means."""

    enabled: bool = True
    patience: int = 5
    zero_spread_frac: float = 1.0
    grad_norm_min: float = 0.0
    kl_max: float = 5.0
    clip_frac_max: float = 0.3
    trend_window: int = 20
    trend_change: float = 0.5
    trend_floor: float = 0.05
    trend_steadiness: float = 0.7
    update_ratio_min: float = 1e-5
    collapse_rise: float = 0.1

    def __post_init__(self) -> None:
        if self.patience < 1 or self.trend_window < 0 or self.trend_window == 1:
            raise ValueError(f"health.patience must be >= 1 and health.trend_window 0 (off) or >= 2, got "
                             f"patience={self.patience}, trend_window={self.trend_window}")
        if not 0 < self.zero_spread_frac <= 1:
            raise ValueError(f"health.zero_spread_frac must be in (0, 1], got {self.zero_spread_frac}")
        if min(self.grad_norm_min, self.kl_max, self.clip_frac_max, self.trend_floor) < 0 or self.trend_change <= 0:
            raise ValueError("health: grad_norm_min, kl_max, clip_frac_max and trend_floor must be >= 0 and "
                             "trend_change > 0")
        if not 0 <= self.trend_steadiness <= 1:
            raise ValueError(f"health.trend_steadiness must be in [0, 1], got {self.trend_steadiness}")
        if self.collapse_rise <= 0:
            raise ValueError(f"health.collapse_rise must be > 0, got {self.collapse_rise}")
        if self.update_ratio_min < 0:
            raise ValueError(f"health.update_ratio_min must be >= 0, got {self.update_ratio_min}")

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> "HealthSettings":
        return cls() if node is None else cls(**{key: node[key] for key in cls.__dataclass_fields__ if key in node})


class HealthMonitor:
    """Feeds on one step at a time; returns the warnings that start at that step.

    A condition that has held for `patience` steps in a row warns once; it warns again only after it has cleared
    and held for `patience` steps anew, so a stuck run says so once instead of every step.
    """

    def __init__(self, settings: HealthSettings | Mapping[str, Any] | None, reward_names: list[str], group_size: int):
        self.settings = settings if isinstance(settings, HealthSettings) else HealthSettings.from_config(settings)
        if group_size < 1:
            raise ValueError(f"HealthMonitor: group_size must be >= 1, got {group_size}")
        self.reward_names = list(reward_names)
        self.group_size = group_size
        self._streaks: dict[str, int] = {}  # condition key -> steps in a row it has held
        self._means: deque[np.ndarray] = deque(maxlen=max(self.settings.trend_window, 1))  # [K] per step
        self._stds: deque[np.ndarray] = deque(maxlen=max(self.settings.trend_window, 1))  # [K] per step
        self._agreement: deque[float] = deque(maxlen=max(self.settings.trend_window, 1))  # other-prompt agreement
        self._tradeoff_active = False
        self._collapse_active = False

    def state(self) -> dict:
        """What the checks remember (streaks, the trend window), as JSON, so that a resumed run warns where an
        uninterrupted one would."""
        return {"streaks": dict(self._streaks), "means": [m.tolist() for m in self._means],
                "stds": [v.tolist() for v in self._stds], "tradeoff_active": self._tradeoff_active,
                "agreement": list(self._agreement), "collapse_active": self._collapse_active}

    def restore(self, state: dict) -> None:
        self._streaks = {key: int(value) for key, value in state["streaks"].items()}
        self._means.clear()
        self._stds.clear()
        self._means.extend(np.asarray(m, dtype=np.float64) for m in state["means"])
        self._stds.extend(np.asarray(v, dtype=np.float64) for v in state["stds"])
        self._tradeoff_active = bool(state["tradeoff_active"])
        self._agreement.clear()
        self._agreement.extend(float(a) for a in state.get("agreement", []))  # absent in checkpoints before the check
        self._collapse_active = bool(state.get("collapse_active", False))

    def observe(self, step: int, metrics: Mapping[str, float], scores: np.ndarray) -> list[HealthWarning]:
        """Check one step: `metrics` is the step's metrics dict, `scores` its raw scores float32 [N, K]."""
        if not self.settings.enabled:
            return []
        scores = np.asarray(scores, dtype=np.float32)  # [N, K]
        n, k = scores.shape if scores.ndim == 2 else (0, -1)
        if k != len(self.reward_names) or n % self.group_size:
            raise ValueError(f"HealthMonitor: scores must be [N, K={len(self.reward_names)}] with N a multiple of "
                             f"group_size={self.group_size}, got shape {scores.shape}")
        self._remember_trends(scores, metrics)
        trends = self._reward_trends()
        return [*self._score_checks(step, scores), *self._training_checks(step, metrics),
                *self._decoder_checks(step, metrics),
                *self._tradeoff_check(step, trends), *self._collapse_check(step, trends),
                *self._update_size_check(step, metrics)]

    def _remember_trends(self, scores: np.ndarray, metrics: Mapping[str, float]) -> None:
        """Add this step to the trend window: each reward's mean and spread, and the other-prompt agreement."""
        if self.settings.trend_window < 2:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN reward has no mean: NaN, skipped by _trends
            self._means.append(np.nanmean(scores, axis=0))  # [K]
            self._stds.append(np.nanstd(scores, axis=0))  # [K]
        agreement = _number(metrics, "sampling/agreement/other_prompts")
        self._agreement.append(np.nan if agreement is None else agreement)

    def _reward_trends(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Each reward's change over a full trend window (in units of its spread) and steadiness, or None."""
        s = self.settings
        if s.trend_window < 2 or len(self._means) < s.trend_window:
            return None
        means, stds = np.stack(self._means), np.stack(self._stds)  # [W, K] each
        scale = np.maximum(stds.mean(axis=0), s.trend_floor * np.abs(means.mean(axis=0)))  # [K]
        return _trends(means, scale)  # [K], [K]

    def _held(self, key: str, condition: bool) -> bool:
        """Count the streak of `key`; True exactly when it reaches `patience` (the step to warn at)."""
        streak = self._streaks.get(key, 0) + 1 if condition else 0
        self._streaks[key] = streak
        return streak == self.settings.patience

    def _since(self, step: int) -> str:
        p = self.settings.patience
        return f"steps {step - p + 1}-{step}" if p > 1 else f"step {step}"

    def _score_checks(self, step: int, scores: np.ndarray) -> list[HealthWarning]:
        """Zero spread in (nearly) every group and all-NaN rewards, named reward by reward."""
        s = self.settings
        groups = scores.reshape(-1, self.group_size, scores.shape[1])  # [B, G, K]
        all_nan = np.isnan(scores).all(axis=0)  # [K]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a group with no valid score: NaN, counted as flat
            spread = np.nanmax(groups, axis=1) - np.nanmin(groups, axis=1)  # [B, K]
        flat = ~(spread > ZERO_SPREAD)  # [B, K]
        stuck = [name for j, name in enumerate(self.reward_names)
                 if not all_nan[j] and float(np.mean(flat[:, j])) >= s.zero_spread_frac]
        found = []
        for j, name in enumerate(self.reward_names):
            if self._held(f"nan_reward/{name}", bool(all_nan[j])):
                found.append(HealthWarning(step, "nan_reward", f"reward/{name}", (
                    f"reward '{name}' was NaN (not applicable) for every sample in {self._since(step)}: check that "
                    f"the prompt set gives it its input (metadata) and that its scorer reads what it should")))
        if self._held("zero_spread", bool(stuck)):
            share = "every group" if s.zero_spread_frac >= 1 else f"at least {s.zero_spread_frac:.0%} of the groups"
            names = ", ".join(f"'{name}'" for name in stuck)
            found.append(HealthWarning(step, "zero_spread", "reward/" + ",".join(stuck), (
                f"{'reward' if len(stuck) == 1 else 'rewards'} {names} scored all rollouts of a prompt alike in "
                f"{share} in {self._since(step)}: their advantages are 0 and the run learns nothing from them (a "
                f"reward that is constant or too sparse for a random start, or a policy collapsed onto one output; "
                f"make the reward denser, or raise data.group_size, train.beta or the sampling temperature)")))
        return found

    def _training_checks(self, step: int, metrics: Mapping[str, float]) -> list[HealthWarning]:
        """Gradient norm at (or below) its floor, KL and clip fraction above their ceilings."""
        s = self.settings
        grad, kl, clip = (_number(metrics, key) for key in ("train/grad_norm", "train/kl", "train/clip_frac"))
        found = []
        if self._held("zero_grad", grad is not None and grad <= s.grad_norm_min):
            found.append(HealthWarning(step, "zero_grad", "train/grad_norm", (
                f"the gradient norm was {grad:g} (<= health.grad_norm_min {s.grad_norm_min:g}) in {self._since(step)}: "
                f"the weights are not changing (zero advantages and no KL gradient, or nothing trainable)")))
        if self._held("kl_runaway", kl is not None and kl > s.kl_max):
            found.append(HealthWarning(step, "kl_runaway", "train/kl", (
                f"the KL to the reference was {kl:.3g} per code (> health.kl_max {s.kl_max:g}) in {self._since(step)}: "
                f"the policy has run far from the model it started from; raise train.beta or lower train.lr")))
        if self._held("clip_runaway", clip is not None and clip > s.clip_frac_max):
            found.append(HealthWarning(step, "clip_runaway", "train/clip_frac", (
                f"{clip:.0%} of the codes had their ratio clipped (> health.clip_frac_max {s.clip_frac_max:g}) in "
                f"{self._since(step)}: the updates are too large for the trust region; lower train.lr or use fewer "
                f"train.minibatches / train.inner_epochs")))
        return found

    def _decoder_checks(self, step: int, metrics: Mapping[str, float]) -> list[HealthWarning]:
        """Decoder GRPO (train.target decoder or both): its adapters' gradient at its floor, its ratios clipped."""
        s = self.settings
        grad, clip = _number(metrics, "decoder/grad_norm"), _number(metrics, "decoder/clip_frac")
        found = []
        if self._held("decoder_zero_grad", grad is not None and grad <= s.grad_norm_min):
            found.append(HealthWarning(step, "decoder_zero_grad", "decoder/grad_norm", (
                f"the decoder's gradient norm was {grad:g} (<= health.grad_norm_min {s.grad_norm_min:g}) in "
                f"{self._since(step)}: its adapters are not changing (no decoder reward varies between the decodes "
                f"of one code sample: check each reward's `feeds`, or raise decoder_train.noise_level)")))
        if self._held("decoder_clip_runaway", clip is not None and clip > s.clip_frac_max):
            found.append(HealthWarning(step, "decoder_clip_runaway", "decoder/clip_frac", (
                f"{clip:.0%} of the decoder's window steps had their ratio clipped (> health.clip_frac_max "
                f"{s.clip_frac_max:g}) in {self._since(step)}: lower decoder_train.lr or decoder_train.minibatches")))
        return found

    def _update_size_check(self, step: int, metrics: Mapping[str, float]) -> list[HealthWarning]:
        """A gradient, but weights that barely move: the learning rate is too small for what is trained.

        Adam's steps are about lr per element whatever the gradient's scale, so a step that moves the trained weights
        by less than `update_ratio_min` of their norm (`train/update_ratio`) while the gradient is not zero moves
        them that little for want of learning rate: typically LoRA run at a full fine-tuning lr.
        """
        s = self.settings
        ratio, grad = _number(metrics, "train/update_ratio"), _number(metrics, "train/grad_norm")
        small = ratio is not None and ratio < s.update_ratio_min and grad is not None and grad > s.grad_norm_min
        if not self._held("small_update", small):
            return []
        return [HealthWarning(step, "small_update", "train/update_ratio", (
            f"the trained weights moved by {ratio:.2g} of their norm per step (< health.update_ratio_min "
            f"{s.update_ratio_min:g}) in {self._since(step)} although the gradient was not zero: the learning rate "
            f"is too small for them to change the policy (LoRA needs about 10x the full fine-tuning lr: raise "
            f"train.lr; docs/recipes.md, \"Learning rates\")"))]

    def _tradeoff_check(self, step: int, trends: tuple[np.ndarray, np.ndarray] | None) -> list[HealthWarning]:
        """Over the last `trend_window` steps, one reward rose steadily while another fell steadily.

        A trend is the least-squares line through a reward's per-step means; its change over the window is measured
        in units of that reward's per-sample spread (so rewards of any scale compare), but of at least `trend_floor`
        times its mean magnitude (a nearly constant reward's wobble is no trend); it is steady when the means
        correlate with the step by at least `trend_steadiness` in absolute value.
        """
        s = self.settings
        if trends is None or len(self.reward_names) < 2:
            return []
        changes, steady = trends
        k = len(self.reward_names)
        rising = [j for j in range(k) if steady[j] >= s.trend_steadiness and changes[j] >= s.trend_change]
        falling = [j for j in range(k) if steady[j] >= s.trend_steadiness and changes[j] <= -s.trend_change]
        active = bool(rising and falling)
        fired = active and not self._tradeoff_active
        self._tradeoff_active = active
        if not fired:
            return []
        up, down = self.reward_names[rising[0]], self.reward_names[falling[0]]
        return [HealthWarning(step, "reward_tradeoff", f"reward/{down}", (
            f"over steps {step - s.trend_window + 1}-{step} reward '{up}' rose by {changes[rising[0]]:.2f} of its "
            f"spread while reward '{down}' fell by {-changes[falling[0]]:.2f}: the policy is buying one with the "
            f"other; check the reward weights (and train.beta)"))]

    def _collapse_check(self, step: int, trends: tuple[np.ndarray, np.ndarray] | None) -> list[HealthWarning]:
        """Over the last `trend_window` steps, the rollouts of different prompts converged on one output (their code
        agreement, `sampling/agreement/other_prompts`, rose steadily by at least `collapse_rise`) while a reward stayed
        flat (its change, up or down, under `trend_change` of its spread; one that falls is the trade-off check's).

        A policy that follows its prompts also agrees more across prompts as it sharpens (prompts that ask for the
        same picture), but then every reward rises with it; a reward left flat while outputs converge is one that
        depends on the prompt, and the policy is no longer reading it.
        """
        s = self.settings
        if trends is None:
            return []
        agreement = np.asarray(self._agreement, dtype=np.float64)[:, None]  # [W, 1]
        rise, steadiness = _trends(agreement, np.ones(1))  # [1], [1]: the fitted change in agreement, absolute
        changes, _ = trends
        flat = [j for j in range(len(self.reward_names)) if abs(changes[j]) < s.trend_change]
        active = bool(rise[0] >= s.collapse_rise and steadiness[0] >= s.trend_steadiness and flat)
        fired = active and not self._collapse_active
        self._collapse_active = active
        if not fired:
            return []
        names = ", ".join(f"'{self.reward_names[j]}'" for j in flat)
        return [HealthWarning(step, "prompt_collapse", "sampling/agreement/other_prompts", (
            f"over steps {step - s.trend_window + 1}-{step} the rollouts of different prompts converged on the same "
            f"codes (their agreement rose by {rise[0]:.2f} to {agreement[-1, 0]:.2f}) while "
            f"{'reward' if len(flat) == 1 else 'rewards'} {names} stayed flat: the policy paints prompts alike "
            f"instead of following them; lower train.lr, raise data.group_size (more rollouts find what each prompt "
            f"asks for) or train.beta, or lower the weight of rewards that favour one output for every prompt"))]


def _trends(means: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per reward: the fitted change over the window in units of `scale`, and |correlation| with the step.

    means [W, K], scale [K] -> changes [K], steadiness [K]; a reward with a NaN mean in the window, or no spread,
    gets 0 for both.
    """
    w, k = means.shape
    t = np.arange(w, dtype=np.float64) - (w - 1) / 2  # [W], centred steps
    changes, steadiness = np.zeros(k), np.zeros(k)
    for j in range(k):
        y = means[:, j].astype(np.float64)  # [W]
        if np.isnan(y).any() or not scale[j] > 0:
            continue
        centred = y - y.mean()
        slope = float(t @ centred / (t @ t))
        changes[j] = slope * (w - 1) / float(scale[j])
        denominator = float(np.sqrt((t @ t) * (centred @ centred)))
        steadiness[j] = abs(float(t @ centred)) / denominator if denominator > 0 else 0.0
    return changes, steadiness


def _number(metrics: Mapping[str, float], key: str) -> float | None:
    """A finite metric value, or None when the step did not log it (or logged NaN)."""
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None
