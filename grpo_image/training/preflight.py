"""Everything checked before any model is loaded, so that a run that cannot finish is refused at once.

A refused run leaves nothing behind (the run folder is created only after these checks) and the CLI prints one
line naming the file, key or sample, and exits with code 2. The checks import the components and bind their
arguments, but never call them: no weight is loaded.
"""

from __future__ import annotations

import math
import os
import re
import typing
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from grpo_image.core.advantages import AGGREGATIONS, SCALES
from grpo_image.training.checkpoint import SIZES_ONLY, find_checkpoint
from grpo_image.training.decoder_grpo import trained_decoder_folder
from grpo_image.base.config import COMPONENT_KEY, RecipeError, import_dotted, reward_specs, validate_components
from grpo_image.training.data import load_recipe_prompts
from grpo_image.core.sampling import CHECKPOINT_KEYS, SamplingSettings

PATH_ARGUMENT = re.compile(r"(^|_)(path|dir|file|folder)$")  # component arguments that name local files
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name: fetched only when the user is online


def preflight(cfg: DictConfig, processes: int | None = None, placement: bool = True) -> int:
    """Run every check; returns the number of components checked.

    `processes`: the training processes to check the batch shapes against (default: WORLD_SIZE, the launcher's,
    else 1); `validate` passes the recipe's `hardware.gpus` when no launcher set WORLD_SIZE. `placement`: check where
    GPU reward workers would run (a run; `validate` checks a recipe that `grpo-image launch` may place).
    """
    for key in ("policy", "decoder", "data.prompts"):
        if OmegaConf.select(cfg, key) is None:
            raise RecipeError(f"'{key}' is not set")
    if not cfg.rewards:
        raise RecipeError("'rewards' is empty: name at least one reward")
    checked = validate_components(cfg.policy, "policy") + validate_components(cfg.decoder, "decoder")
    checked += validate_components(cfg.rewards, "rewards")
    for where in ("policy", "decoder", "rewards"):
        _check_paths(OmegaConf.to_container(cfg[where], resolve=True), where)
    _check_values(cfg)
    check_batches(cfg, processes or int(os.environ.get("WORLD_SIZE", "1")))
    if placement:
        check_reward_placement(cfg, processes)
    _check_run_paths(cfg)
    records = load_recipe_prompts(cfg.data)
    _check_rewards_can_score(cfg, records)
    return checked


AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
POSITIVE = (lambda v: v > 0, "> 0")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
RANGES = {  # every numeric key of defaults.yaml: (test, what it must be)
    "seed": AT_LEAST_0, "steps": AT_LEAST_1, "save_every": AT_LEAST_1, "sample_every": AT_LEAST_0,
    "keep_checkpoints": AT_LEAST_0, "checkpoint_timeout_s": POSITIVE,
    "data.batch_size": AT_LEAST_1, "data.max_passes": POSITIVE,
    "data.group_size": (lambda v: v >= 2, ">= 2 (advantages compare the rollouts of a group: one rollout alone "
                                          "always gets advantage 0 and nothing is learned)"),
    "sampling.temperature": POSITIVE, "sampling.top_k": AT_LEAST_0,
    "sampling.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "sampling.min_p": FRACTION,
    "sampling.cfg_scale": POSITIVE, "sampling.batch_size": AT_LEAST_0,
    "train.lr": POSITIVE, "train.weight_decay": AT_LEAST_0, "train.max_grad_norm": POSITIVE,
    "train.warmup_steps": AT_LEAST_0, "train.minibatches": AT_LEAST_1, "train.micro_batch_size": AT_LEAST_0,
    "train.inner_epochs": AT_LEAST_1, "train.clip_eps_low": FRACTION, "train.clip_eps_high": AT_LEAST_0,
    "train.beta": AT_LEAST_0, "train.tis_cap": (lambda v: v == 0 or v >= 1, "0 (off) or >= 1 (a cap below 1 would "
                                                                           "shrink every code's weight)"),
    "train.logprob_chunk": AT_LEAST_1, "train.max_bad_steps": AT_LEAST_1,
    "train.lora.r": AT_LEAST_1, "train.lora.alpha": POSITIVE, "train.lora.dropout": FRACTION,
    "advantages.eps": (lambda v: v > 0, "> 0 (a group whose rewards do not vary divides by it)"),
    "workers.num_workers": AT_LEAST_1, "workers.num_cpus": AT_LEAST_0, "workers.num_gpus": AT_LEAST_0,
    "workers.chunks": AT_LEAST_0, "workers.timeout_s": POSITIVE, "workers.timeout_per_image_s": AT_LEAST_0,
    "workers.max_retries": AT_LEAST_0, "workers.build_timeout_s": POSITIVE,
    "hardware.gpus": AT_LEAST_0, "hardware.gpu_memory_gb": POSITIVE,
    "logging.num_samples": AT_LEAST_0,
    "health.update_ratio_min": AT_LEAST_0,
    "decoder_train.group_size": (lambda v: v >= 2, ">= 2 (the decoder's advantages compare the decodes of one code "
                                                   "sample)"),
    "decoder_train.num_inference_steps": (lambda v: v >= 2, ">= 2"), "decoder_train.window": AT_LEAST_1,
    "decoder_train.noise_level": POSITIVE, "decoder_train.lr": POSITIVE, "decoder_train.weight_decay": AT_LEAST_0,
    "decoder_train.max_grad_norm": POSITIVE, "decoder_train.clip_range": POSITIVE, "decoder_train.adv_clip": POSITIVE,
    "decoder_train.beta": AT_LEAST_0, "decoder_train.minibatches": AT_LEAST_1,
    "decoder_train.lora.r": AT_LEAST_1, "decoder_train.lora.alpha": POSITIVE,
}


def _check_values(cfg: DictConfig) -> None:
    for key, (ok, what) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None and key.removeprefix("sampling.") in CHECKPOINT_KEYS:
            continue  # the checkpoint's own value, resolved and checked when the policy is built
        if not math.isfinite(value) or not ok(value):
            raise RecipeError(f"'{key}' must be {what}, got {value}")
    columns = cfg.data.metadata_columns
    if columns is not None and not (OmegaConf.is_list(columns) and all(isinstance(c, str) for c in columns)):
        raise RecipeError(f"'data.metadata_columns' must be null (every other column) or a list of names, got {columns}")
    betas = list(cfg.train.adam_betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise RecipeError(f"'train.adam_betas' must be two numbers in [0, 1), got {betas}")
    _check_choice("train.mode", cfg.train.mode, ("lora", "full"))
    from transformers import SchedulerType

    stepped = [kind.value for kind in SchedulerType if kind.value not in ("reduce_lr_on_plateau", "greedy")]
    _check_choice("train.scheduler", cfg.train.scheduler, stepped)  # the other two step on a metric, not a step
    _check_choice("advantages.scale", cfg.advantages.scale, SCALES)
    _check_choice("advantages.aggregation", cfg.advantages.aggregation, AGGREGATIONS)
    _check_choice("workers.backend", cfg.workers.backend, ("inprocess", "ray"))
    _check_choice("decoder_seeds", cfg.decoder_seeds, ("rollout", "group"))
    _check_choice("train.target", cfg.train.target, ("policy", "decoder", "both"))
    _check_decoder_training(cfg)
    for index, entry in enumerate(cfg.rewards):
        if not math.isfinite(float(entry.get("weight", 1.0))):
            raise RecipeError(f"'rewards.{index}.weight' must be a finite number, got {entry.weight}")
    try:
        SamplingSettings.from_config(cfg.sampling, unresolved="defaults")  # null keys: checked once resolved
    except ValueError as err:
        raise RecipeError(str(err)) from err


def _check_decoder_training(cfg: DictConfig) -> None:
    """What decoder GRPO needs: each learner fed by a reward, a window that fits its steps, a decode seed per image,
    no prefetched rollouts (the trainer decodes), and the guidance scale a decoder can take."""
    from grpo_image.core.flow import KINDS

    _check_choice("decoder_train.kind", cfg.decoder_train.kind, KINDS)
    learners = {"policy": ("policy",), "decoder": ("decoder",), "both": ("policy", "decoder")}[cfg.train.target]
    specs = reward_specs(cfg)
    for learner in learners:
        if not any(spec["feeds"] in (learner, "both") for spec in specs):  # (weights may be 0: an ablation's)
            raise RecipeError(f"train.target {cfg.train.target}: no reward feeds the {learner} "
                              f"(rewards.N.feeds: {learner} or both)")
    if cfg.train.target == "policy":
        if cfg.train.init_from and Path(cfg.train.init_from).exists() \
                and trained_decoder_folder(cfg.train.init_from, SIZES_ONLY) is not None:
            raise RecipeError(
                f"'train.init_from': {cfg.train.init_from} trained the decoder too, and with train.target policy the "
                "reward workers would decode with the recipe's untrained decoder: export the run (grpo-image export) "
                "and point decoder.path at the export, or keep training the decoder (train.target both)")
        return
    train = cfg.decoder_train
    last_start = min(train.num_inference_steps // 2, train.num_inference_steps - 1 - train.window)
    if last_start < 0:
        raise RecipeError(f"'decoder_train.window' ({train.window}) does not fit decoder_train.num_inference_steps "
                          f"({train.num_inference_steps}) with the last step left out of it")
    if cfg.decoder_seeds != "rollout":
        raise RecipeError(f"decoder_seeds: {cfg.decoder_seeds} gives every decode of a code sample the same noise, "
                          f"which leaves the decoder nothing to compare: train.target {cfg.train.target} needs rollout")
    if cfg.workers.prefetch:
        raise RecipeError(f"workers.prefetch: the trainer decodes when train.target is {cfg.train.target}, so there "
                          "is nothing to overlap with; set it to false")
    if train.guidance_scale is not None and not train.guidance_scale > 0:
        raise RecipeError(f"'decoder_train.guidance_scale' must be null (the decoder's own) or > 0, got "
                          f"{train.guidance_scale}")
    built = import_dotted(cfg.decoder[COMPONENT_KEY])
    if not isinstance(built, type):  # a factory: the class its return annotation names (unknown: checked on build)
        built = typing.get_type_hints(built).get("return", type("unknown", (), {"flow": None}))
    if not hasattr(built, "flow"):
        raise RecipeError(f"train.target {cfg.train.target}: the decoder {cfg.decoder[COMPONENT_KEY]} has no "
                          "flow-matching form to train (GlmImageDecoder and XOmniFluxDecoder have)")


def _check_run_paths(cfg: DictConfig) -> None:
    """Each path key names the kind of thing it must be: a run folder is a folder, a module list holds folders."""
    output = Path(cfg.output_dir)
    if output.exists() and not output.is_dir():
        raise RecipeError(f"'output_dir': {output} exists and is not a folder (a run writes a folder of files there)")
    for module in cfg.workers.py_modules:
        if not Path(module).is_dir():
            raise RecipeError(f"'workers.py_modules': {module} is not a folder (ship reward files inside a package folder)")
    if cfg.train.init_from and not Path(cfg.train.init_from).is_dir():
        raise RecipeError(f"'train.init_from': no such checkpoint folder: {cfg.train.init_from}")
    if cfg.resume:  # the files' hashes are checked when the run resumes, each process its share
        find_checkpoint(cfg.resume, hashed=SIZES_ONLY)


def check_batches(cfg: DictConfig, world_size: int, process_group: bool | None = None) -> None:
    """Minibatches that divide the batch, whole groups and whole minibatch shares on every rank (see
    grpo_image/training/distributed.py), and what FSDP needs: full fine-tuning and a process group to shard over (by
    default: when there are 2 or more processes; a group of one, as the GPU check makes, shards too)."""
    process_group = world_size > 1 if process_group is None else process_group
    b, n, m = cfg.data.batch_size, cfg.data.batch_size * cfg.data.group_size, cfg.train.minibatches
    if n % m:
        raise RecipeError(f"train.minibatches ({m}) must divide N = B * G = {n}")
    if b % world_size:
        raise RecipeError(f"data.batch_size ({b}) must be divisible by the {world_size} processes: each holds whole groups")
    if (n // world_size) % m:
        raise RecipeError(
            f"train.minibatches ({m}) must divide the {n // world_size} rollouts of each of the {world_size} processes"
        )
    if cfg.train.fsdp and (cfg.train.mode != "full" or not process_group):
        raise RecipeError(
            f"train.fsdp shards full fine-tuning over several processes: it needs train.mode: full (got "
            f"{cfg.train.mode}) and a launch with 2 or more processes (got {world_size}); LoRA uses DDP without it"
        )


def prompt_passes_warning(cfg: DictConfig, prompts: int) -> str | None:
    """A line for `validate` when the run draws each prompt more than `data.max_passes` times, else None.

    The group sampler visits the prompts epoch by epoch without replacement, so each prompt is drawn
    steps x B / prompts times, give or take the last epoch.
    """
    passes = cfg.steps * cfg.data.batch_size / prompts
    if passes <= cfg.data.max_passes:
        return None
    enough = math.ceil(cfg.steps * cfg.data.batch_size / cfg.data.max_passes)
    return (f"the run draws each prompt of {cfg.data.prompts} about {passes:.0f} times (steps {cfg.steps} x "
            f"data.batch_size {cfg.data.batch_size} / {prompts} prompts), more than data.max_passes "
            f"{cfg.data.max_passes:g}: bring {enough} prompts or more (data.prompts), or lower steps or data.batch_size")


def check_reward_placement(cfg: DictConfig, processes: int | None = None) -> None:
    """GPU reward workers need a Ray cluster that holds GPUs of its own: a training process that starts Ray itself
    gives it every GPU it sees, and Ray puts the workers on the lowest free one, beside the policy (with 8 processes,
    8 Rays each put theirs on GPU 0). One process may share its GPU on purpose (workers.share_training_gpus)."""
    w = cfg.workers
    if w.backend != "ray" or w.num_gpus == 0 or w.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    if w.share_training_gpus and processes == 1:
        return
    shared = " (workers.share_training_gpus covers one training process only)" if w.share_training_gpus else ""
    raise RecipeError(
        f"'workers.num_gpus' is {w.num_gpus:g} but no Ray cluster is named (workers.ray_address, RAY_ADDRESS): the Ray "
        f"each training process would start puts the reward workers on the training GPUs{shared}; run `grpo-image "
        f"launch RECIPE [key=value ...]` (the same recipe and overrides), which starts Ray on GPUs of its own, or, "
        f"to share one GPU on purpose, set workers.share_training_gpus=true"
    )


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise RecipeError(f"'{key}' must be one of {', '.join(choices)}; got {value!r}")


def _check_paths(node, where: str) -> None:
    """Arguments named like `path`, `*_dir`, `*_file`, `*_folder` must exist (or be a hub id while online)."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            _check_paths(item, f"{where}.{index}")
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if isinstance(value, (dict, list)):
            _check_paths(value, f"{where}.{key}")
        elif key != COMPONENT_KEY and isinstance(value, str) and PATH_ARGUMENT.search(key) and not Path(value).exists():
            if HUB_ID.match(value) and os.environ.get("HF_HUB_OFFLINE") != "1":
                continue
            raise RecipeError(f"'{where}.{key}': no such file or folder: {value}")


def _check_rewards_can_score(cfg: DictConfig, records) -> None:
    """A required reward that declares what it needs from a prompt (`missing_inputs`) must get it for every one."""
    for spec in reward_specs(cfg):
        scorer = dict(spec["scorer"])
        reward_class = import_dotted(scorer.pop(COMPONENT_KEY))
        check = getattr(reward_class, "missing_inputs", None)
        if not spec["required"] or check is None:
            continue
        for index, record in enumerate(records):
            problem = check(record.prompt, record.metadata, **scorer)
            if problem:
                raise RecipeError(
                    f"{cfg.data.prompts}: prompt {index + 1} ({record.prompt!r}): required reward "
                    f"'{spec['name']}' cannot score it: {problem} (make the reward optional, required: false, "
                    f"to score such prompts NaN)"
                )
