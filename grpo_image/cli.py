"""`grpo-image`: the command line.

    grpo-image train RECIPE [key=value ...]      run (or, with resume=DIR, continue) a recipe
    grpo-image validate RECIPE [key=value ...]   check a recipe without loading any weight

A recipe that cannot run fails with one line naming the file, key or sample and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from grpo_image.advantages import AGGREGATIONS, SCALES
from grpo_image.checkpoint import CheckpointError
from grpo_image.config import RecipeError, load_recipe, validate_components
from grpo_image.data import PromptSetError, load_prompts
from grpo_image.sampling import SamplingSettings

USAGE_ERRORS = (RecipeError, PromptSetError, CheckpointError, FileNotFoundError)


def validate(cfg) -> int:
    """Import every component and bind its arguments, read the prompt set, check the batch arithmetic.

    Returns the number of components checked.
    """
    for key in ("policy", "decoder", "data.prompts"):
        if _select(cfg, key) is None:
            raise RecipeError(f"'{key}' is not set")
    if not cfg.rewards:
        raise RecipeError("'rewards' is empty: name at least one reward")
    checked = validate_components(cfg.policy, "policy") + validate_components(cfg.decoder, "decoder")
    checked += validate_components(cfg.rewards, "rewards")
    load_prompts(cfg.data.prompts)
    n = cfg.data.batch_size * cfg.data.group_size
    if cfg.data.batch_size < 1 or cfg.data.group_size < 1 or cfg.train.minibatches < 1:
        raise RecipeError("data.batch_size, data.group_size and train.minibatches must be >= 1")
    if n % cfg.train.minibatches:
        raise RecipeError(f"train.minibatches ({cfg.train.minibatches}) must divide N = B * G = {n}")
    if cfg.save_every < 1:
        raise RecipeError(f"save_every must be >= 1, got {cfg.save_every}")
    _check_choice("train.mode", cfg.train.mode, ("lora", "full"))
    _check_choice("advantages.scale", cfg.advantages.scale, SCALES)
    _check_choice("advantages.aggregation", cfg.advantages.aggregation, AGGREGATIONS)
    _check_choice("workers.backend", cfg.workers.backend, ("inprocess", "ray"))
    if cfg.advantages.eps <= 0:
        raise RecipeError(f"advantages.eps must be > 0 (a group whose rewards do not vary divides by it), got {cfg.advantages.eps}")
    try:
        SamplingSettings.from_config(cfg.sampling)
    except ValueError as err:
        raise RecipeError(str(err)) from err
    return checked


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise RecipeError(f"'{key}' must be one of {', '.join(choices)}; got {value!r}")


def _select(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grpo-image", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "run a recipe"), ("validate", "check a recipe without loading weights")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("recipe", help="a recipe YAML file, e.g. recipes/tiny_cpu.yaml")
        command.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=10 train.lr=1e-4")
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        checked = validate(cfg)
        if args.command == "validate":
            print(f"{args.recipe}: ok ({checked} components checked)")
            return 0
        from grpo_image.train import train

        train(cfg)
        return 0
    except USAGE_ERRORS as err:
        print(f"grpo-image: error: {err}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    """Keep the run's own progress bar the only one on screen."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
