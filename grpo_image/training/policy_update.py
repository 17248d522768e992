"""The policy's side of a step on a training process: its reference and own log-probs of the rollouts, and its
update (steps 4, 7 and 8 of grpo_image/training/train.py). `trainer` is train.py's `Trainer`."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from grpo_image.core.logprobs import logprob_mismatch, no_grad_logprobs, teacher_forced_logprobs
from grpo_image.core.loss import grpo_loss, truncated_is_stats, truncated_is_weights
from grpo_image.core.seeding import minibatch_order
from grpo_image.training.distributed import apply_update
from grpo_image.training.update_ratio import UpdateRatio


@torch.no_grad()
def reference_logprobs(trainer, prompts: list[str], codes: torch.Tensor) -> torch.Tensor:
    """Reference log-probs [N, L], computed a micro-batch (else a minibatch) at a time to bound memory."""
    size = trainer.cfg.train.micro_batch_size or len(prompts) // trainer.cfg.train.minibatches
    pieces = []
    with trainer.weights.reference() as reference:
        reference.model.eval()
        for start in range(0, len(prompts), size):
            pieces.append(teacher_forced_logprobs(
                reference, prompts[start : start + size], codes[start : start + size], trainer.settings,
                trainer.cfg.train.logprob_chunk,
            ))
    return torch.cat(pieces)  # [N, L]


def trainer_old_logprobs(trainer, prompts: list[str], codes: torch.Tensor) -> torch.Tensor:
    """The policy's own log-probs [N, L] of the rollouts before this step's update, as the trainer computes them (for
    truncated importance sampling), a micro-batch (else a minibatch) at a time like the reference's."""
    size = trainer.cfg.train.micro_batch_size or len(prompts) // trainer.cfg.train.minibatches
    trainer.policy.model.eval()
    with trainer.weights.compute():
        return no_grad_logprobs(trainer.policy, prompts, codes, trainer.settings, size, trainer.cfg.train.logprob_chunk)


def update_policy(
    trainer, step, prompts, codes, behaviour, ref_logprobs, advantages, trainer_old=None
) -> dict[str, float]:
    """Steps 7-8: for each inner epoch and minibatch, accumulate gradients over micro-batches, then one update.

    The ratio is taken against the behaviour log-probs, or with truncated importance sampling against the trainer's
    own (`trainer_old`), each token's objective then weighted by min(exp(trainer_old - behaviour), train.tis_cap).
    """
    cfg, policy, world = trainer.cfg.train, trainer.policy, trainer.world
    old_logprobs = behaviour if trainer_old is None else trainer_old  # [N/W, L]
    is_weights = None if trainer_old is None else truncated_is_weights(trainer_old, behaviour, cfg.tis_cap)
    first_minibatch: list[torch.Tensor] = []  # its codes' training minus behaviour log-probs, by micro-batch
    n = len(prompts)
    size = n // cfg.minibatches
    micro = cfg.micro_batch_size or size
    params = trainer.weights.trainable_parameters()
    moved = UpdateRatio(policy.model, world)  # the trained weights before this step's updates
    totals: dict[str, list[float]] = {}
    policy.model.train()
    for epoch in range(cfg.inner_epochs):
        order = minibatch_order(  # [N/W]: this rank's rows of each global minibatch, minibatch after minibatch
            seed=trainer.cfg.seed, step=step, epoch=epoch, group_size=trainer.cfg.data.group_size,
            minibatches=cfg.minibatches, first_row=world.rank * n, count=n,
        )
        for minibatch in order.split(size):
            trainer.optimizer.zero_grad(set_to_none=True)
            stats: dict[str, float] = {}
            finite = True
            for rows in minibatch.split(micro):
                share = len(rows) / len(minibatch)  # token mean over the minibatch: equal L, so weight by rows
                with trainer.weights.compute():
                    logprobs = teacher_forced_logprobs(
                        policy, [prompts[i] for i in rows.tolist()], codes[rows], trainer.settings, cfg.logprob_chunk
                    )  # [n_micro, L]
                loss, micro_stats = grpo_loss(
                    logprobs, old_logprobs[rows], None if ref_logprobs is None else ref_logprobs[rows],
                    advantages[rows], clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high, beta=cfg.beta,
                    is_weights=None if is_weights is None else is_weights[rows],
                )
                if epoch == 0 and not totals:  # the step's first minibatch: the weights have not moved yet
                    first_minibatch.append((logprobs.detach() - behaviour[rows]).flatten())
                finite = finite and bool(torch.isfinite(loss))
                (loss * share).backward()
                for key, value in micro_stats.items():
                    stats[key] = stats.get(key, 0.0) + share * value
            stats["grad_norm"], applied = apply_update(  # once it steps, a failure leaves this step half-applied
                world, params, trainer.optimizer, cfg.max_grad_norm, finite,
                before_step=lambda: setattr(trainer, "moved_in_step", step),
            )
            stats["skipped_updates"] = 0.0 if applied else 1.0
            for key, value in stats.items():
                totals.setdefault(key, []).append(value)
    with warnings.catch_warnings():  # every update of the step may have been skipped: the schedule still moves on
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        trainer.scheduler.step()
    metrics = {f"train/{key}": float(np.mean(values)) for key, values in totals.items()}
    metrics["train/skipped_updates"] = float(sum(totals["skipped_updates"]))
    metrics["train/ratio_mean_first"] = totals["ratio_mean"][0]  # the first minibatch: on-policy, 1 up to rounding
    if "kl" in totals:  # the first minibatch of a run's first step: 0 when the reference is the model it starts from
        metrics["train/kl_first"] = totals["kl"][0]
    metrics["train/lr"] = trainer.scheduler.get_last_lr()[0]
    metrics["train/update_ratio"] = moved.ratio()  # ||update|| / ||weights||, global over the ranks
    mismatch = logprob_mismatch(torch.cat(first_minibatch), cfg.clip_eps_low, cfg.clip_eps_high)
    tis = {} if trainer_old is None else truncated_is_stats(trainer_old, behaviour, cfg.tis_cap)
    return {**metrics, **{f"train/{key}": value for key, value in {**mismatch, **tis}.items()}}
