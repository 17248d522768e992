"""`grpo-image`: the command line.

    grpo-image train RECIPE [key=value ...]      run (or, with resume=DIR, continue) a recipe
    grpo-image validate RECIPE [key=value ...]   check a recipe without loading any weight

A recipe that cannot run fails before any model is loaded, with one line naming the file, key or sample, and exit
code 2. A run that stops cleanly (a required reward that keeps failing, repeated non-finite updates) checkpoints
its last good step and exits with code 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from grpo_image.checkpoint import CheckpointError
from grpo_image.config import RecipeError, load_recipe
from grpo_image.data import PromptSetError
from grpo_image.preflight import preflight

USAGE_ERRORS = (RecipeError, PromptSetError, CheckpointError, FileNotFoundError)


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
        checked = preflight(cfg)
    except USAGE_ERRORS as err:
        print(f"grpo-image: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever the source
        return 2
    if args.command == "validate":
        print(f"{args.recipe}: ok ({checked} components checked)")
        return 0
    from grpo_image.train import TrainingStopped, train

    try:
        train(cfg)
    except TrainingStopped as err:
        print(f"grpo-image: {err}", file=sys.stderr)
        return 1
    return 0


def _quiet_libraries() -> None:
    """Keep the run's own progress bar the only one on screen."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
