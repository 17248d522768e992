"""Everything checked before any model is loaded, so that a run that cannot finish is refused at once.

A refused run leaves nothing behind (the run folder is created only after these checks) and the CLI prints one
line naming the file, key or sample, and exits with code 2. The checks import the components and bind their
arguments, but never call them: no weight is loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from grpo_image.advantages import AGGREGATIONS, SCALES
from grpo_image.checkpoint import find_checkpoint
from grpo_image.config import COMPONENT_KEY, RecipeError, import_dotted, reward_specs, validate_components
from grpo_image.data import load_prompts
from grpo_image.sampling import SamplingSettings

PATH_ARGUMENT = re.compile(r"(^|_)(path|dir|file|folder)$")  # component arguments that name local files
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name: fetched only when the user is online


def preflight(cfg: DictConfig) -> int:
    """Run every check; returns the number of components checked."""
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
    _check_processes(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    records = load_prompts(cfg.data.prompts)
    _check_rewards_can_score(cfg, records)
    if cfg.resume:
        find_checkpoint(cfg.resume)
    if cfg.train.init_from and not Path(cfg.train.init_from).exists():
        raise RecipeError(f"'train.init_from': no such checkpoint folder: {cfg.train.init_from}")
    return checked


def _check_values(cfg: DictConfig) -> None:
    n = cfg.data.batch_size * cfg.data.group_size
    if cfg.data.batch_size < 1 or cfg.data.group_size < 1 or cfg.train.minibatches < 1:
        raise RecipeError("data.batch_size, data.group_size and train.minibatches must be >= 1")
    if n % cfg.train.minibatches:
        raise RecipeError(f"train.minibatches ({cfg.train.minibatches}) must divide N = B * G = {n}")
    for key in ("steps", "save_every", "train.inner_epochs", "train.max_bad_steps", "train.logprob_chunk"):
        if OmegaConf.select(cfg, key) < 1:
            raise RecipeError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
    if cfg.train.micro_batch_size < 0:
        raise RecipeError(f"train.micro_batch_size must be >= 0 (0: the whole minibatch), got {cfg.train.micro_batch_size}")
    _check_choice("train.mode", cfg.train.mode, ("lora", "full"))
    _check_choice("advantages.scale", cfg.advantages.scale, SCALES)
    _check_choice("advantages.aggregation", cfg.advantages.aggregation, AGGREGATIONS)
    _check_choice("workers.backend", cfg.workers.backend, ("inprocess", "ray"))
    if cfg.advantages.eps <= 0:
        raise RecipeError(
            f"advantages.eps must be > 0 (a group whose rewards do not vary divides by it), got {cfg.advantages.eps}"
        )
    try:
        SamplingSettings.from_config(cfg.sampling)
    except ValueError as err:
        raise RecipeError(str(err)) from err


def _check_processes(cfg: DictConfig, world_size: int) -> None:
    """Whole groups and whole minibatch shares on every rank (see grpo_image/distributed.py); FSDP's needs."""
    b, n, m = cfg.data.batch_size, cfg.data.batch_size * cfg.data.group_size, cfg.train.minibatches
    if b % world_size:
        raise RecipeError(f"data.batch_size ({b}) must be divisible by the {world_size} processes: each holds whole groups")
    if (n // world_size) % m:
        raise RecipeError(
            f"train.minibatches ({m}) must divide the {n // world_size} rollouts of each of the {world_size} processes"
        )
    if cfg.train.fsdp and (cfg.train.mode != "full" or world_size < 2):
        raise RecipeError(
            f"train.fsdp shards full fine-tuning over several processes: it needs train.mode: full (got "
            f"{cfg.train.mode}) and a launch with 2 or more processes (got {world_size}); LoRA uses DDP without it"
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
