"""`grpo-image`: the command line.

    grpo-image train RECIPE [key=value ...]      run (or, with resume=DIR, continue) a recipe
    grpo-image validate RECIPE [key=value ...]   check a recipe without loading any weight
    grpo-image launch RECIPE [key=value ...]     run a recipe on this node: torchrun on the first hardware.gpus GPUs,
                                                 a Ray head of its own on the next ones for the reward workers
    grpo-image plan RECIPE [key=value ...] [--gpus N] [--gpu-memory GB]   memory per GPU, from the model configs
    grpo-image sample RECIPE [key=value ...] --prompts FILE --out DIR [--checkpoint CKPT] [--n 4]
    grpo-image eval [RECIPE [key=value ...]] --prompts FILE | --longtext FILE ... [--checkpoint CKPT]
                    [--compare CKPT|base] [--seeds S ...] [--images DIR ...]
    grpo-image ablate RECIPE [key=value ...] --grid FILE [--out DIR]
    grpo-image export RUN_OR_CHECKPOINT --out DIR [--dtype bfloat16|float32] [--format auto|peft] [--link]
                      [--source DIR]
                                                 the trained model in its family's own format (or the adapter alone)
    grpo-image serve-reward RECIPE [key=value ...] [--reward NAME] --port PORT [--host HOST] [--token-env VAR]
                                                 the recipe's rewards over HTTP, for rewards.remote.RemoteReward

A recipe that cannot run fails before any model is loaded, with one line naming the file, key or sample, and exit
code 2. A run that stops cleanly (a required reward that keeps failing, repeated non-finite updates) checkpoints
its last good step and exits with code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from grpo_image.training.checkpoint import CheckpointError
from grpo_image.base.config import RecipeError, load_recipe
from grpo_image.training.data import PromptSetError
from grpo_image.base.image_files import MissingImages
from grpo_image.training.preflight import preflight
from grpo_image.scoring.reward_server import MAX_IMAGE_PIXELS, MAX_REQUEST_BYTES

USAGE_ERRORS = (RecipeError, PromptSetError, CheckpointError, FileNotFoundError, MissingImages)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from grpo_image.evaluation.ablate import AblationError
    from grpo_image.evaluation.longtext import TextBenchError
    from grpo_image.export.source_folders import ExportError
    from grpo_image.scoring.score import RewardFailure

    try:
        if args.command not in ("train", "validate"):
            return {"sample": _sample, "eval": _eval, "ablate": _ablate, "plan": _plan,
                    "launch": _launch, "export": _export, "serve-reward": _serve_reward}[args.command](args)
        cfg = load_recipe(args.recipe, args.overrides)
        validating = args.command == "validate"  # a recipe that `grpo-image launch` may place: no placement check
        checked = preflight(cfg, _processes(cfg) if validating else None, placement=not validating)
    except (*USAGE_ERRORS, TextBenchError, AblationError, ExportError) as err:
        print(f"grpo-image: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever the source
        return 2
    except RewardFailure as err:  # a required reward failed while eval scored images
        print(f"grpo-image: {err}", file=sys.stderr)
        return 1
    if args.command == "validate":
        print(f"{args.recipe}: ok ({checked} components checked)")
        _warn_if_it_does_not_fit(cfg, args.recipe)
        _warn_if_prompts_repeat(cfg)
        return 0
    return _train(cfg)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo-image", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "run a recipe"), ("validate", "check a recipe without loading weights")):
        _recipe_arguments(commands.add_parser(name, help=help_text))

    _recipe_arguments(commands.add_parser(
        "launch", help="run a recipe on this node, training and reward workers on GPUs apart (hardware:, workers:)"))

    sample = commands.add_parser("sample", help="generate images from the recipe's policy or a checkpoint")
    _recipe_arguments(sample)
    sample.add_argument("--prompts", required=True, help="a prompt set (.txt / .jsonl) or a LongText-Bench file")
    sample.add_argument("--out", required=True, help="folder for {id:04d}_{k}.png and samples.jsonl")
    _model_arguments(sample)
    sample.add_argument("--seed", type=int, default=None, help="default: the recipe's seed")

    ev = commands.add_parser("eval", help="score a prompt set; compare two checkpoints; LongText-Bench")
    _recipe_arguments(ev, optional=True)
    ev.add_argument("--prompts", help="a prompt set scored with the recipe's rewards")
    ev.add_argument("--longtext", nargs="+", default=[], metavar="FILE",
                    help="LongText-Bench files (or prompt sets with metadata text) scored for text accuracy")
    _model_arguments(ev)
    ev.add_argument("--compare", metavar="CKPT|base", help="a second model (the 'before'; base: no checkpoint)")
    ev.add_argument("--seeds", nargs="+", type=int, help="seeds to repeat the evaluation with (default: the recipe's)")
    ev.add_argument("--rewards", nargs="+", metavar="NAME|FILE.yaml",
                    help="score with these of the recipe's rewards, or the rewards: list of a YAML file")
    ev.add_argument("--images", nargs="+", metavar="DIR",
                    help="score existing images ({id:04d}_{k}.png) instead of sampling: one folder per prompt file")
    ev.add_argument("--allow-missing", action="store_true", help="score prompts that have images, skip the rest")
    ev.add_argument("--ocr", default="rapidocr", choices=("rapidocr", "easyocr", "vlm"), help="text reader")
    ev.add_argument("--ocr-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an engine option, repeated for each, e.g. --ocr-option base_url=http://localhost:8000/v1")
    ev.add_argument("--ocr-config", metavar="FILE.yaml", help="a component node building the reader instead")
    ev.add_argument("--report-prompts", type=int, default=12, help="prompts shown with their images in the reports")
    ev.add_argument("--out", help="output folder (default: OUTPUT_DIR/eval of the recipe, or ./eval)")

    plan = commands.add_parser("plan", help="memory per GPU from the model configs (no weights), and what fits")
    _recipe_arguments(plan)
    plan.add_argument("--gpus", type=int, metavar="N",
                      help="training processes, one GPU each (default: hardware.gpus, else 1)")
    plan.add_argument("--gpu-memory", type=float, metavar="GB", help="memory per GPU (default: hardware.gpu_memory_gb)")

    ablate = commands.add_parser("ablate", help="train a grid of reward weights and compare the runs")
    _recipe_arguments(ablate)
    ablate.add_argument("--grid", required=True, help="YAML grid of reward weights (see docs/evaluation.md)")
    ablate.add_argument("--out", help="output folder (default: OUTPUT_DIR_ablation of the recipe)")

    export = commands.add_parser("export", help="the trained model in its family's own format, or the adapter alone")
    export.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run folder (its newest checkpoint) or "
                        "checkpoints/step_N")
    export.add_argument("--out", required=True, help="a new (or empty) folder")
    export.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                        help="the exported weights' dtype (adapters are merged in float32 first; default bfloat16)")
    export.add_argument("--format", default="auto", choices=("auto", "peft"), dest="fmt",
                        help="auto: the family's own folder (default); peft: the adapter alone")
    export.add_argument("--link", action="store_true", help="link the source's unchanged files instead of copying")
    export.add_argument("--source", metavar="DIR", help="the folder the run was trained from, where it has moved "
                        "since (default: the run's policy.path)")

    serve = commands.add_parser("serve-reward", help="serve a recipe's rewards over HTTP (docs/rewards-server.md)")
    _recipe_arguments(serve)
    serve.add_argument("--reward", metavar="NAME", help="serve this reward of the recipe only (default: all of them)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port, printed)")
    serve.add_argument("--token-env", metavar="VAR",
                       help="require 'Authorization: Bearer <token>', the token being the value of this variable")
    serve.add_argument("--max-request-mb", type=float, default=MAX_REQUEST_BYTES / 2**20, metavar="MB",
                       help=f"largest request body in MiB (default {MAX_REQUEST_BYTES / 2**20:g})")
    serve.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N",
                       help=f"largest image, width x height in pixels (default {MAX_IMAGE_PIXELS})")
    return parser


def _recipe_arguments(command: argparse.ArgumentParser, optional: bool = False) -> None:
    command.add_argument("recipe", nargs="?" if optional else None,
                         help="a recipe YAML file, e.g. recipes/tiny_cpu.yaml")
    command.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=10 train.lr=1e-4")


def _model_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--checkpoint", help="a run folder, checkpoint folder or adapter folder (default: base)")
    command.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    command.add_argument("--batch-size", type=int, default=16, help="images sampled and scored per batch")


def _train(cfg) -> int:
    from grpo_image.training.stops import TrainingStopped
    from grpo_image.training.train import train

    try:
        train(cfg)
    except TrainingStopped as err:
        print(f"grpo-image: {err}", file=sys.stderr)
        return 1
    except CheckpointError as err:  # resume or init_from weights that do not fit the recipe: refused before any step
        print(f"grpo-image: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


def _launch(args) -> int:
    """The training processes' exit code; 1 when the node could not start the run, 130 on Ctrl-C."""
    from grpo_image.training.launch import LaunchFailed, launch

    try:
        return launch(args.recipe, args.overrides)
    except LaunchFailed as err:
        print(f"grpo-image launch: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("grpo-image launch: interrupted; the training processes and the Ray head were stopped", file=sys.stderr)
        return 130


def _sample(args) -> int:
    from grpo_image.base.config import validate_components
    from grpo_image.evaluation.generate import sample

    cfg = load_recipe(args.recipe, args.overrides)
    validate_components(cfg.policy, "policy")
    validate_components(cfg.decoder, "decoder")
    rows = sample(cfg, args.prompts, args.out, checkpoint=args.checkpoint, n=args.n, seed=args.seed,
                  batch_size=args.batch_size)
    print(f"{len(rows)} images in {args.out} (seeds in {Path(args.out) / 'samples.jsonl'})")
    return 0


def _eval(args) -> int:
    from grpo_image.evaluation.evaluate import evaluate, prompt_sets
    from grpo_image.evaluation.longtext import build_reader

    if args.recipe is None and args.overrides:
        raise RecipeError(f"overrides {args.overrides} given without a recipe")
    cfg = load_recipe(args.recipe, args.overrides) if args.recipe else None
    out = Path(args.out or (Path(cfg.output_dir) / "eval" if cfg is not None else "eval"))
    sets = prompt_sets(args.prompts, args.longtext)
    reader = None
    if args.longtext:
        node = _yaml_node(args.ocr_config) if args.ocr_config else None
        reader = build_reader(args.ocr, _options(args.ocr_option), node)
    result = evaluate(
        cfg, sets, out, checkpoint=args.checkpoint, compare_to=args.compare, n=args.n, seeds=args.seeds,
        batch_size=args.batch_size, rewards=args.rewards, images=args.images, reader=reader,
        allow_missing=args.allow_missing, report_prompts=args.report_prompts, recipe_path=args.recipe,
    )
    for label, summary in result["summary"].items():
        shown = "  ".join(f"{k} {v['mean']:.4f}" for k, v in summary.items()
                          if v["mean"] is not None and not k.endswith("/nan") and k.count("/") < 2)
        print(f"{label}: {shown}")
    for key, entry in (result["comparison"] or {}).items():
        if key.count("/") < 2 and entry["delta"] is not None:
            spread = "" if entry["delta_std"] is None else f" ± {entry['delta_std']:.4f} across seeds"
            print(f"delta {key}: {entry['delta']:+.4f}{spread}")
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'report.html'}")
    return 0


def _ablate(args) -> int:
    from grpo_image.evaluation.ablate import ablate

    cfg = load_recipe(args.recipe, args.overrides)
    out = Path(args.out or f"{cfg.output_dir}_ablation")
    result = ablate(args.recipe, args.overrides, args.grid, out)
    print(f"{len(result['runs'])} runs; table {result['table']}; plots in {out / 'plots'}")
    return 0


def _export(args) -> int:
    from grpo_image.export.export import export

    _quiet_libraries()
    out = export(args.checkpoint, args.out, dtype=args.dtype, fmt=args.fmt, link=args.link, source=args.source)
    print(f"{out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


def _serve_reward(args) -> int:
    """Serve until Ctrl-C (exit 0); a recipe, reward name, token variable or address that cannot serve: exit 2."""
    from grpo_image.scoring.reward_server import RewardServer, build_rewards

    if args.token_env is not None and not os.environ.get(args.token_env):
        raise RecipeError(f"--token-env {args.token_env}: the variable is unset or empty")
    if args.max_request_mb <= 0 or args.max_image_pixels < 1:
        raise RecipeError("--max-request-mb must be > 0 and --max-image-pixels >= 1")
    rewards = build_rewards(load_recipe(args.recipe, args.overrides), args.reward)
    try:
        server = RewardServer(rewards, args.host, args.port, args.token_env, int(args.max_request_mb * 2**20),
                              args.max_image_pixels)
    except OSError as err:  # the address is taken or not this machine's
        raise RecipeError(f"cannot listen on {args.host}:{args.port}: {err}") from None
    print(f"serving {', '.join(rewards)} of {args.recipe} at {server.url} (POST /score, GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    print("grpo-image serve-reward: stopped", file=sys.stderr)
    return 0


def _plan(args) -> int:
    """The plan's table; a recipe that does not fit is still a plan (exit 0), with the keys to change."""
    from grpo_image.planning.memory_plan import plan_recipe
    from grpo_image.planning.memory_report import format_plan

    if args.gpus is not None and args.gpus < 1 or args.gpu_memory is not None and args.gpu_memory <= 0:
        raise RecipeError("--gpus must be >= 1 and --gpu-memory > 0")
    cfg = load_recipe(args.recipe, args.overrides)
    print(format_plan(plan_recipe(cfg, args.recipe, args.gpus, args.gpu_memory)))
    return 0


def _processes(cfg) -> int:
    """What `validate` checks the batches against: the launcher's WORLD_SIZE, else the GPUs the recipe names."""
    return int(os.environ.get("WORLD_SIZE", "0")) or cfg.hardware.gpus or 1


def _warn_if_it_does_not_fit(cfg, recipe: str) -> None:
    """`validate`: one warning line when the recipe names its GPUs (hardware.gpus) and its memory plan exceeds them."""
    if cfg.hardware.gpus < 1:
        return
    from grpo_image.planning.memory_plan import plan_recipe
    from grpo_image.planning.memory_report import fit_warning

    try:
        warning = fit_warning(plan_recipe(cfg, recipe))
    except (RecipeError, FileNotFoundError) as err:  # e.g. a policy named by hub id: no local config.json to read
        warning = f"no memory plan for {recipe}: {' '.join(str(err).split())}"
    if warning:
        print(f"grpo-image: warning: {warning}", file=sys.stderr)


def _warn_if_prompts_repeat(cfg) -> None:
    """`validate`: one warning line when the run draws each prompt more than `data.max_passes` times."""
    from grpo_image.training.data import load_recipe_prompts
    from grpo_image.training.preflight import prompt_passes_warning

    warning = prompt_passes_warning(cfg, len(load_recipe_prompts(cfg.data)))
    if warning:
        print(f"grpo-image: warning: {warning}", file=sys.stderr)


def _options(items: list[str]) -> dict:
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--ocr-option {item!r} is not of the form key=value")
        options[key] = yaml.safe_load(value)
    return options


def _yaml_node(path: str) -> dict:
    from omegaconf import OmegaConf

    if not Path(path).is_file():
        raise RecipeError(f"{path}: --ocr-config file not found")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def _quiet_libraries() -> None:
    """Keep the run's own progress bar the only one on screen."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
