"""The GRPO loop, top to bottom. One step (N = B * G rollouts):

1. prompts: the group sampler draws B prompt records for this step and repeats each G times;
2. rollouts: the policy samples [N, L] image codes without grad, keeping behaviour log-probs and decode seeds;
3. rewards: the pool receives codes, prompts, metadata and seeds, and decodes and scores them;
4. reference log-probs for the KL term while the rewards are computed (skipped when beta is 0), and with truncated
   importance sampling the trainer's own log-probs of the rollouts (before any update);
5. gather the scores [N, K] and time how long the trainer waited for them;
6. advantages [N] from the scores, the recipe's weights and the groups;
7. loss per minibatch and inner epoch: policy log-probs with grad, clipped ratio, KL;
8. update: backward, clip the gradient norm, optimizer step; then the scheduler, logs and checkpoints.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from grpo_image.core.advantages import group_advantages
from grpo_image.core.nested_advantages import nested_group_advantages
from grpo_image.training.checkpoint import find_checkpoint, load_checkpoint
from grpo_image.training.checkpoint_fit import warn_changed_training_keys
from grpo_image.base.config import instantiate, reward_specs
from grpo_image.training.decoder_grpo import DecoderTrainer
from grpo_image.training.data import GroupSampler, load_recipe_prompts
from grpo_image.training.distributed import (
    World, gather_objects, gather_scored, join_world, leave_world, mean_over_ranks,
)
from grpo_image.training.health import HealthMonitor
from grpo_image.base.logging import RunLogger, SilentLogger
from grpo_image.training.weights import make_weights
from grpo_image.training.policy_update import reference_logprobs, trainer_old_logprobs, update_policy
from grpo_image.training.preflight import check_batches, check_reward_placement
from grpo_image.training.step_metrics import (
    StepTimer, agreement_counts_to_average, agreement_from_averaged_counts, captioned_samples, reward_metrics,
    thumbnail_rows,
)
from grpo_image.training.stops import StepStart, crash, save_step, stop_cleanly
from grpo_image.core.sampling import SamplingSettings, resolve_checkpoint_sampling, sample_codes_with_mass
from grpo_image.core.seeding import STREAM_SAMPLE, decode_seeds, derive_seeds
from grpo_image.core.types import Rollout, ScoredBatch
from grpo_image.scoring.ray_pool import RayRewardPool
from grpo_image.scoring.score import RewardFailure
from grpo_image.scoring.workers import InProcessRewardPool


@dataclass
class Trainer:
    """What every step uses: built once from the recipe by `build_trainer`."""

    cfg: DictConfig
    policy: object
    weights: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    sampler: GroupSampler
    settings: SamplingSettings
    pool: InProcessRewardPool | RayRewardPool
    reward_names: list[str]
    reward_weights: list[float]
    start_step: int
    world: World = World()
    prefetched: tuple[int, Rollout, object] | None = None  # (step, rollout, pending rewards) sampled a step early
    phase: str | None = None  # the phase of the step running now (named in failure messages)
    moved_in_step: int = 0  # the last step whose update has begun changing the weights
    health: HealthMonitor | None = None  # the run-health checks, fed every step; their memory is checkpointed
    last_scores: np.ndarray | None = None  # the last step's whole-batch scores [N, K], for the health checks
    decoder: DecoderTrainer | None = None  # the decoder this process trains (train.target decoder or both)
    learner_weights: dict[str, list[float]] | None = None  # each learner's reward weights: a reward's `feeds`


def build_trainer(cfg: DictConfig, world: World = World()) -> Trainer:
    from transformers import get_scheduler

    records = load_recipe_prompts(cfg.data)
    sampler = GroupSampler(records, batch_size=cfg.data.batch_size, group_size=cfg.data.group_size, seed=cfg.seed,
                           rank=world.rank, world_size=world.size)
    check_batches(cfg, world.size, world.distributed)  # also when train() is called without the CLI's preflight
    torch.manual_seed(cfg.seed)  # draws outside our seeded streams (LoRA init, dropout) start from the recipe's seed
    policy = instantiate(cfg.policy)  # on the host; make_weights places it on this process's GPU (whole, or sharded)
    resolve_checkpoint_sampling(cfg.sampling, policy)  # null keys: the checkpoint's, written to config.yaml as resolved
    weights = make_weights(policy, cfg.train, world)  # LoRA or full (fp32 masters), from init_from, FSDP when asked
    if cfg.train.gradient_checkpointing:  # recompute each layer in the backward pass: far less activation memory
        policy.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(
        weights.trainable_parameters(),
        lr=cfg.train.lr,
        betas=tuple(cfg.train.adam_betas),
        weight_decay=cfg.train.weight_decay,
        foreach=False if cfg.train.fsdp else None,  # sharded and whole parameters cannot share one foreach kernel
    )
    scheduler = get_scheduler(
        cfg.train.scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=cfg.steps
    )
    decoder = DecoderTrainer(cfg, world) if cfg.train.target != "policy" else None
    start_step, prefetched_codes, loop_state = 0, None, {}
    if cfg.resume:  # every rank hashes and reads its share; weights that do not fit the model are refused
        checkpoint = find_checkpoint(cfg.resume, world=world, timeout_s=cfg.checkpoint_timeout_s)
        start_step, prefetched_codes, loop_state = load_checkpoint(
            checkpoint, weights, optimizer, scheduler, world, cfg.checkpoint_timeout_s, decoder
        )
        if world.is_main:
            warn_changed_training_keys(checkpoint, cfg)
    specs = reward_specs(cfg)
    trainer = Trainer(
        cfg=cfg,
        policy=policy,
        weights=weights,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        settings=SamplingSettings.from_config(cfg.sampling),
        pool=make_pool(cfg, specs),
        reward_names=[spec["name"] for spec in specs],
        reward_weights=[spec["weight"] for spec in specs],
        learner_weights={learner: [spec["weight"] if spec["feeds"] in (learner, "both") else 0.0 for spec in specs]
                         for learner in ("policy", "decoder")},
        start_step=start_step,
        world=world,
        health=HealthMonitor(cfg.health, [spec["name"] for spec in specs], cfg.data.group_size * images_per_sample(cfg)),
        decoder=decoder,
    )
    if "health" in loop_state:
        trainer.health.restore(loop_state["health"])
    if prefetched_codes is not None:  # the checkpoint holds rollouts sampled for the next step: score them again
        step = start_step + 1
        mine = world.rows(len(prefetched_codes["codes"]))  # saved whole; this rank's rows
        rollout = rebuild_rollout(trainer, step, *(prefetched_codes[key][mine] for key in PREFETCHED))
        trainer.prefetched = (step, rollout, _submit(trainer, step, rollout))
    return trainer


def make_pool(cfg: DictConfig, specs: list[dict]) -> InProcessRewardPool | RayRewardPool:
    """The reward pool the recipe asks for; both build their workers from configuration only (without the decoder
    when the trainer decodes: decoder GRPO)."""
    decoder = OmegaConf.to_container(cfg.decoder, resolve=True) if cfg.train.target == "policy" else None
    if cfg.workers.backend == "inprocess":
        return InProcessRewardPool(decoder, specs)
    check_reward_placement(cfg)  # also when train() is called without the CLI's preflight
    w = cfg.workers
    return RayRewardPool(
        decoder, specs, num_workers=w.num_workers, num_cpus=w.num_cpus, num_gpus=w.num_gpus, chunks=w.chunks,
        timeout_s=w.timeout_s, timeout_per_image_s=w.timeout_per_image_s, max_retries=w.max_retries,
        build_timeout_s=w.build_timeout_s,
        address=w.ray_address, py_modules=list(w.py_modules),
    )


def train(cfg: DictConfig) -> dict:
    """Run the recipe from its first step (or from `resume`) to `steps`; return the run summary."""
    started = time.perf_counter()
    world = join_world()
    try:
        return _train(cfg, world, started)
    finally:
        leave_world(world)


def _train(cfg: DictConfig, world: World, started: float) -> dict:
    trainer = build_trainer(cfg, world)
    run_dir = Path(cfg.output_dir)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    bad_steps = 0  # steps in a row with a skipped (non-finite) update
    logger = RunLogger(run_dir, cfg.steps, start_step=trainer.start_step, tensorboard=cfg.logging.tensorboard,
                       wandb=_wandb(cfg)) if world.is_main \
        else SilentLogger()
    with logger as log:
        for step in range(trainer.start_step + 1, cfg.steps + 1):
            before = StepStart(torch.get_rng_state(), trainer.prefetched)  # the state after step - 1
            try:
                metrics, samples = grpo_step(trainer, step)
            except RewardFailure as err:  # a required reward or the reward pool gave up: nothing was applied yet
                stop_cleanly(trainer, run_dir, step, before, f"step {step} failed: {err}")
            except Exception as err:
                crash(trainer, run_dir, step, before, err)
            for warning in trainer.health.observe(step, metrics, trainer.last_scores):
                log.warn(warning.step, warning.metric, warning.message, warning.flag)
            log.log_metrics(step, metrics)
            if samples is not None:
                log.log_images(step, *samples)
            bad_steps = bad_steps + 1 if metrics["train/skipped_updates"] else 0
            if bad_steps >= cfg.train.max_bad_steps:
                stop_cleanly(trainer, run_dir, step + 1, StepStart(torch.get_rng_state(), trainer.prefetched),
                      f"{bad_steps} steps in a row had a non-finite loss or gradient (train.max_bad_steps); their "
                      "updates were skipped")
            if step % cfg.save_every == 0 or step == cfg.steps:
                save_step(trainer, run_dir, step, StepStart(torch.get_rng_state(), trainer.prefetched))
        trainer.pool.close()
        summary = log.finish(time.perf_counter() - started)
    if world.is_main:  # with the number of processes: rank r sampled rows r*N/W .. (r+1)*N/W-1 of each step
        (run_dir / "summary.json").write_text(json.dumps({**summary, "processes": world.size}, indent=1))
    return summary


def images_per_sample(cfg: DictConfig) -> int:
    """Images each code sample is decoded into in a step: decoder_train.group_size when the decoder learns, else 1."""
    return 1 if cfg.train.target == "policy" else cfg.decoder_train.group_size


def grpo_step(trainer: Trainer, step: int) -> tuple[dict[str, float], tuple | None]:
    """One GRPO step; returns its metrics and, on sample steps, (thumbnails, captions) to log."""
    if trainer.decoder is not None:
        return decoupled_step(trainer, step)
    cfg, timer = trainer.cfg, StepTimer(trainer)
    # 1-2. prompts and rollouts (sampled during the previous step when workers.prefetch is on)
    # 3. decode + rewards: the pool gets codes, prompts, metadata and seeds only, and works while we go on
    if trainer.prefetched is not None and trainer.prefetched[0] == step:
        _, rollout, pending = trainer.prefetched
    else:
        with timer("rollout"):
            rollout = sample_rollout(trainer, step)
        pending = _submit(trainer, step, rollout)
    trainer.prefetched = None
    prompts, codes = rollout.prompts, rollout.codes
    # 4. reference log-probs while the rewards are computed; with prefetch, also the next step's rollouts,
    #    sampled from the weights before this step's update (one step stale; their ratios correct for it)
    with timer("ref"):
        ref_logprobs = reference_logprobs(trainer, prompts, codes) if cfg.train.beta > 0 else None
    trainer_old = None  # the trainer's own log-probs of the rollouts, for truncated importance sampling
    if cfg.train.tis_cap > 0:
        with timer("old_logprobs"):
            trainer_old = trainer_old_logprobs(trainer, prompts, codes)
    if cfg.workers.prefetch and step < cfg.steps:
        with timer("rollout"):
            upcoming = sample_rollout(trainer, step + 1)
        trainer.prefetched = (step + 1, upcoming, _submit(trainer, step + 1, upcoming))
    # 5. gather scores (this rank's [N/W, K]); the wait is what the overlap did not hide
    with timer("reward_wait"):
        scored = _gather_or_fail(trainer, pending)
    # 6. advantages [N/W] of this rank's rows, from every rank's scores [N, K], the weights and the groups
    scored, advantages, mine, adv_stats = rank_advantages(trainer.world, scored, trainer.learner_weights["policy"],
                                                          cfg)  # fmt: skip
    trainer.last_scores = scored.scores  # [N, K]
    # 7-8. loss per minibatch and inner epoch, backward, clip, optimizer step; scheduler once per step
    with timer("update"):
        train_stats = update_policy(trainer, step, prompts, codes, rollout.old_logprobs, ref_logprobs, mine, trainer_old)
    busy = sum(timer.seconds.values())
    metrics = {
        **reward_metrics(scored, trainer.reward_weights),
        **scored.info,
        **mean_over_ranks(trainer.world, {
            **train_stats,
            "sampling/filtered_mass/mean": float(rollout.filtered_mass.mean()),  # this rank's sampled codes
            "sampling/filtered_mass/max": float(rollout.filtered_mass.max()),
            **agreement_counts_to_average(codes, cfg.data.group_size),
            **{f"time/{name}": seconds for name, seconds in timer.seconds.items()},
            "time/idle_frac": timer.seconds["reward_wait"] / busy if busy > 0 else 0.0,
        }),
        "adv/zero_std_frac": adv_stats["zero_std_frac"],
        "adv/abs_mean": float(advantages.abs().mean()),
        "time/reward_worker": scored.worker_seconds,
    }
    agreement_from_averaged_counts(metrics)
    return metrics, captioned_samples(scored, prompts) if scored.thumbnail_rows else None


def decoupled_step(trainer: Trainer, step: int) -> tuple[dict[str, float], tuple | None]:
    """One step that trains the decoder (train.target decoder, or both with the policy) on nested groups: per prompt
    K = data.group_size code samples, each decoded G = decoder_train.group_size times on this process (the decoder
    learns here); the workers score the images. Steps 4 and 7 for the policy only when it learns too."""
    cfg, timer, world, decoder = trainer.cfg, StepTimer(trainer), trainer.world, trainer.decoder
    both, decodes = cfg.train.target == "both", cfg.decoder_train.group_size
    # 1-2. prompts and code samples (from the frozen policy when only the decoder learns)
    with timer("rollout"):
        rollout = sample_rollout(trainer, step)  # codes [n, L], n = B*K/W
    prompts, codes = rollout.prompts, rollout.codes
    # 3. decodes with their windows' log-probs [n*G], then the rewards on the images
    seeds = rollout.decode_seeds  # [n*G]: one per image (sample_rollout derives them for this target)
    with timer("decode"):
        images, chunks = decoder.rollout(step, codes, prompts, rollout.grid, seeds)
    decoded = Rollout(codes.repeat_interleave(decodes, 0), rollout.old_logprobs.repeat_interleave(decodes, 0),
                      seeds, [r for r in rollout.records for _ in range(decodes)], rollout.grid)
    group = cfg.data.group_size * decodes  # a prompt's images
    pending = trainer.pool.submit(decoded, thumbnail_rows(cfg, step, len(images), group), images)
    # 4. the policy's reference (and own) log-probs while the rewards are computed
    with timer("ref"):
        ref_logprobs = reference_logprobs(trainer, prompts, codes) if both and cfg.train.beta > 0 else None
    trainer_old = None
    if both and cfg.train.tis_cap > 0:
        with timer("old_logprobs"):
            trainer_old = trainer_old_logprobs(trainer, prompts, codes)
    # 5. gather the images' scores, then every rank's: [B*K*G, R]
    with timer("reward_wait"):
        scored = gather_scored(world, _gather_or_fail(trainer, pending))
    trainer.last_scores = scored.scores
    # 6. nested advantages: the policy's [B*K] from each sample's mean over its decodes, the decoder's [B*K*G]
    policy_adv, decoder_adv = nested_group_advantages(
        scored.scores, trainer.learner_weights["policy"], trainer.learner_weights["decoder"],
        samples=cfg.data.group_size, decodes=decodes, scale=cfg.advantages.scale,
        aggregation=cfg.advantages.aggregation, eps=cfg.advantages.eps,
    )
    # 7-8. the policy's update (when it learns), then the decoder's
    train_stats = {}
    if both:
        with timer("update"):
            train_stats = update_policy(trainer, step, prompts, codes, rollout.old_logprobs, ref_logprobs,
                                  policy_adv[world.rows(len(policy_adv))], trainer_old)  # fmt: skip
    with timer("decoder_update"):
        trainer.moved_in_step = step  # the adapters may move from here on
        decoder_stats = decoder.update(chunks, decoder_adv[world.rows(len(decoder_adv))])
    busy = sum(timer.seconds.values())
    metrics = {
        **reward_metrics(scored, trainer.reward_weights),
        **scored.info,
        **mean_over_ranks(world, {
            **train_stats, **decoder_stats,
            **{f"time/{name}": seconds for name, seconds in timer.seconds.items()},
            "time/idle_frac": timer.seconds["reward_wait"] / busy if busy > 0 else 0.0,
        }),
        "adv/abs_mean": float(policy_adv.abs().mean()) if both else 0.0,
        "decoder/window_start": float(chunks[0].window.start),
        "time/reward_worker": scored.worker_seconds,
    }
    metrics["train/skipped_updates"] = metrics.get("train/skipped_updates", 0.0) + metrics["decoder/skipped_updates"]
    return metrics, captioned_samples(scored, decoded.prompts) if scored.thumbnail_rows else None


@torch.no_grad()
def sample_rollout(trainer: Trainer, step: int) -> Rollout:
    """Steps 1-2: draw this step's prompts and sample their code grids with recorded seeds."""
    records, _ = trainer.sampler.sample(step)
    trainer.policy.model.eval()
    sample_seeds = _rank_seeds(trainer, step, STREAM_SAMPLE)  # [N/W]
    with trainer.weights.rollout_weights():
        codes, old_logprobs, filtered_mass = sample_codes_with_mass(
            trainer.policy, [r.prompt for r in records], sample_seeds, trainer.settings
        )  # [N/W, L] each
    return Rollout(codes, old_logprobs, _decode_seeds(trainer, step), records, trainer.policy.grid, filtered_mass)


PREFETCHED = ("codes", "old_logprobs", "filtered_mass")  # what a checkpoint keeps of rollouts sampled a step early


def rebuild_rollout(trainer: Trainer, step: int, codes: torch.Tensor, old_logprobs: torch.Tensor,
                    filtered_mass: torch.Tensor) -> Rollout:
    """A rollout saved in a checkpoint: prompts and seeds derive from (seed, step), the tensors come from the file."""
    records, _ = trainer.sampler.sample(step)
    return Rollout(codes, old_logprobs, _decode_seeds(trainer, step), records, trainer.policy.grid, filtered_mass)


def rank_advantages(world: World, scored: ScoredBatch, weights: list[float], cfg: DictConfig):
    """Step 6 on one rank: the whole batch's scores and advantages [N], and this rank's advantages [N/W].

    Every rank gathers all scores and normalises the whole batch (groups never straddle ranks, but
    `advantages.scale: batch` needs every group), then keeps its own rows. Returns (the whole batch's
    ScoredBatch, advantages [N], this rank's advantages [N/W], statistics).
    """
    whole = gather_scored(world, scored)
    advantages, stats = group_advantages(
        whole.scores, weights, group_size=cfg.data.group_size, scale=cfg.advantages.scale,
        aggregation=cfg.advantages.aggregation, eps=cfg.advantages.eps,
    )  # [N]
    return whole, advantages, advantages[world.rows(len(advantages))], stats


def _rank_seeds(trainer: Trainer, step: int, stream: int) -> torch.Tensor:
    """This rank's rows of the whole batch's seeds: rollout i has the same seed whatever the number of ranks."""
    n = trainer.cfg.data.batch_size * trainer.cfg.data.group_size
    return derive_seeds(trainer.cfg.seed, step, stream, n)[trainer.world.rows(n)]  # [N/W]


def _decode_seeds(trainer: Trainer, step: int) -> torch.Tensor:
    """This rank's rows of the whole batch's decoder seeds (`decoder_seeds`: per rollout or per group), one per image
    (a code sample has decoder_train.group_size images when the decoder learns)."""
    cfg = trainer.cfg
    n = cfg.data.batch_size * cfg.data.group_size * images_per_sample(cfg)
    seeds = decode_seeds(cfg.seed, step, cfg.data.group_size, n, cfg.decoder_seeds)  # [N]
    return seeds[trainer.world.rows(n)]  # [N/W]


def _gather_or_fail(trainer: Trainer, pending) -> ScoredBatch:
    """This rank's scores; a reward failure on any rank stops every rank with its message (none waits forever)."""
    try:
        scored, failure = trainer.pool.gather(pending), None
    except Exception as err:
        if not trainer.world.distributed:
            raise
        scored, failure = None, f"{type(err).__name__}: {err}"
    failures = [f for f in gather_objects(trainer.world, failure) if f is not None]
    if failures:
        raise RewardFailure(failures[0])
    return scored


def _submit(trainer: Trainer, step: int, rollout: Rollout):
    """Hand a rollout to the reward pool, asking for thumbnails on sample steps."""
    return trainer.pool.submit(rollout, thumbnail_rows(trainer.cfg, step, len(rollout.records)))


def _wandb(cfg: DictConfig) -> dict | None:
    return None if cfg.logging.wandb is None else OmegaConf.to_container(cfg.logging.wandb, resolve=True)
