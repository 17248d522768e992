"""`grpo-image export`: a run's trained model, in its family's own format or as a peft adapter.

auto (the default): the source folder the run was trained from (`policy.path`) with the trained weights in it,
loadable by the family's own code without grpo-image (source_folders.py says which files change). The trained
model is rebuilt in float32 from the source's weights and every stage of the run (`saved_weights.stage_folders`),
adapters merged there, and cast once to `--dtype`: a LoRA update of 1e-5 of a weight survives float32 whole, and
loses only the final rounding in bfloat16. A causal LM built in memory (no source folder) is written by its own
`save_pretrained`, with its tokenizer.

peft: the adapter alone, its `base_model_name_or_path` the source folder; a run that continued earlier stages, or
trained full weights, has no adapter that stands alone and is refused.

A run that trained the decoder too (decoder GRPO: the checkpoint holds `decoder/`) exports it as well: in auto, the
decoder's transformer with its adapters merged, in the family's place for it; in peft, its adapter in `decoder/`
(decoder_weights.py). Without `decoder/`, the decoder's files are carried as they are.

Bad input is refused in one line before anything is written: a missing checkpoint or source folder, a source of
another model, an output folder that is not empty, an unknown family. The export is written into a temporary folder
beside `--out` and renamed at the end, so a failure never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import shutil
import sys
import typing
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from grpo_image.base.config import import_dotted, instantiate
from grpo_image.export.decoder_weights import (
    DIFFUSERS_STEM, TrainedDecoder, check_decoder_source, decoder_folder, merged_tensors, peft_decoder_base,
    trained_decoder, write_decoder_adapter,
)
from grpo_image.export.model_card import REWARD_CURVE, trained_row, trainer_step, write_model_card
from grpo_image.export.safetensors_shards import cast, write_shards
from grpo_image.export.source_folders import (
    CONFIG, FAMILIES, ExportError, Family, carry_files, check_source, rewrite_config, weight_files,
)
from grpo_image.training.checkpoint_fit import ADAPTER_CONFIG, ADAPTER_FILE, saved_kind
from grpo_image.training.saved_weights import load_stages, policy_folder, stage_folders, tied_names

DTYPES = ("bfloat16", "float32", "float16")
FORMATS = ("auto", "peft")


def export(
    path: str | Path, out: str | Path, *, dtype: str = "bfloat16", fmt: str = "auto", link: bool = False,
    source: str | Path | None = None, max_shard_size: str | int = "5GB",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the model trained by the run or checkpoint `path` into `out`; returns `out`.

    `source`: the folder the run was trained from, where it has moved since (default: the run's `policy.path`).
    """
    say = progress or (lambda line: print(f"grpo-image export: {line}", file=sys.stderr, flush=True))
    out = Path(out)
    if dtype not in DTYPES or fmt not in FORMATS:
        raise ExportError(f"--dtype must be one of {DTYPES} and --format one of {FORMATS}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; choose a new --out")
    weights = policy_folder(path)  # a run folder's newest complete checkpoint, a checkpoint, or its policy/
    checkpoint = weights.parent
    if not (checkpoint / "config.yaml").is_file() or not (checkpoint / "trainer_state.json").is_file():
        raise ExportError(f"{path}: not a checkpoint of a run (no config.yaml and trainer_state.json beside "
                          f"{weights.name}/): export a run folder or one of its checkpoints/step_N")
    config_text = (checkpoint / "config.yaml").read_text()
    cfg = OmegaConf.create(config_text)
    if source is not None:
        cfg.policy.path = str(source)
    source = _source(cfg)
    stages = stage_folders(weights)
    decoder = trained_decoder(checkpoint)
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        family, written_dtype, decoder_place = _write(cfg, weights, stages, source, partial, dtype, fmt, link,
                                                      max_shard_size, say, decoder)
        trained = trained_row(OmegaConf.select(cfg, "train.target", default="policy") if decoder else "policy",
                              _mode(cfg), decoder.describe() if decoder else None, peft=fmt == "peft")
        write_model_card(
            partial, out, family=family, source=source, checkpoint=checkpoint, config_text=config_text,
            steps=trainer_step(checkpoint), mode=trained, stages=stages, dtype=written_dtype, name=out.name,
            decoder=_decoder(cfg), decoder_export=decoder_place,
        )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a failed export leaves nothing behind
        raise
    if out.exists():
        out.rmdir()  # empty, checked above
    partial.rename(out)
    say(f"wrote {out}")
    return out


def _write(
    cfg, weights: Path, stages: list[Path], source: Path | None, partial: Path, dtype: str, fmt: str, link: bool,
    max_shard_size: str | int, say: Callable[[str], None], decoder: TrainedDecoder | None = None,
) -> tuple[Family | None, str | None, str | None]:
    """The export's weights (and the files carried with them) into `partial`: (its family, its dtype, where the
    trained decoder went), (None, None, ...) for an adapter alone."""
    if fmt == "peft":
        _refuse_unless_one_adapter(weights, stages)
        base = peft_decoder_base(cfg, source, lambda: _family(cfg)) if decoder else None
        partial.mkdir(parents=True)
        _write_adapter(weights, partial, source)
        if decoder is not None:
            write_decoder_adapter(decoder, partial / "decoder", base)
        return None, None, f"`decoder/`: its peft adapter on `{base}`" if decoder else None
    family = _family(cfg)
    if source is not None:
        check_source(source, family)
        _warn_if_decoded_elsewhere(cfg, source, say)
    elif family.name != "causal LM" or decoder is not None:
        raise ExportError(f"the run's {family.name} policy was built in memory (no policy.path): there is no "
                          "source folder to export into")
    merged = None
    if decoder is not None:  # checked before anything is written
        model_dir = decoder_folder(source, family)
        check_decoder_source(cfg, model_dir)
        merged = (model_dir, *merged_tensors(model_dir, decoder, getattr(torch, dtype)))
    say(f"rebuilding the trained model in float32 from {len(stages)} saved stage(s)")
    policy = _trained_policy(cfg, weights)
    partial.mkdir(parents=True)
    if source is None:
        state = {name: cast(value, getattr(torch, dtype)) for name, value in policy.model.state_dict().items()}
        policy.save_pretrained(partial, state_dict=state)
        return family, dtype, None
    _write_into_source(source, family, policy, partial, dtype, link, max_shard_size, say,
                       also_replaced=set(merged[1]) if merged else set())
    if merged is None:
        return family, dtype, None
    model_dir, _, tensors = merged
    folder = partial / model_dir.relative_to(source)
    say(f"writing the trained decoder into {model_dir.relative_to(source)}/ (its adapters merged in float32)")
    folder.mkdir(parents=True, exist_ok=True)
    write_shards(tensors, folder, max_shard_size, say, stem=DIFFUSERS_STEM)
    return family, dtype, f"`{model_dir.relative_to(source)}/`: the transformer with the run's adapters merged"


def _source(cfg) -> Path | None:
    path = OmegaConf.select(cfg, "policy.path", default=None)
    if path is None:
        return None
    source = Path(str(path))
    if not source.is_dir():
        raise ExportError(f"{source}: the run's policy.path is not there; the export is that folder with the "
                          "trained weights in it (give its new place with --source)")
    return source


def _family(cfg) -> Family:
    """The family the recipe's policy component builds, from its return annotation: known before loading weights."""
    builder = import_dotted(cfg.policy._component_)
    built = typing.get_type_hints(builder).get("return")
    for kind, family in FAMILIES.items():
        if isinstance(built, type) and issubclass(built, kind):
            return family
    raise ExportError(f"unknown model family: {cfg.policy._component_} builds {built}; export knows "
                      f"{', '.join(f.name for f in FAMILIES.values())}; use --format peft for an adapter")


def _trained_policy(cfg, weights: Path):
    """The recipe's policy in float32 (from the source's own weights) with every stage merged in float32."""
    node = OmegaConf.to_container(cfg.policy, resolve=True)
    if "dtype" in node:
        node["dtype"] = "float32"
    torch.manual_seed(cfg.seed)  # as in training, so that a seeded model built in memory is the same one
    policy = instantiate(node)
    load_stages(policy, weights, merge=True)
    return policy


def _write_into_source(
    source: Path, family: Family, policy, partial: Path, dtype: str, link: bool, max_shard_size: str | int,
    say: Callable[[str], None], also_replaced: set[Path] = frozenset(),
) -> None:
    """The source folder with the language model's weights and config replaced (and `also_replaced`, files another
    part of the export writes), the rest carried over.

    Every tensor of the source's weights is written: the trained model's where it has one (same shape, or the
    source is another model), the source's own where it has none (a part the policy does not load). A trained tensor
    the source lacks is refused, unless it is one save_pretrained leaves out (tied to another).
    """
    model_dir = source / family.weights_folder
    files = weight_files(model_dir)
    state = policy.model.state_dict()
    target = getattr(torch, dtype)
    tensors = {}
    for file in (f for f in files if f.suffix == ".safetensors"):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                shape = tuple(handle.get_slice(name).get_shape())
                if name not in state:
                    tensors[name] = (partial_tensor(file, name), shape, target)
                elif tuple(state[name].shape) != shape:
                    raise ExportError(f"{model_dir}: its tensor '{name}' {list(shape)} is {list(state[name].shape)} "
                                      "in the trained model: policy.path names another model than the run trained")
                else:
                    tensors[name] = ((lambda value=state[name]: value), shape, target)
    lacking = sorted(set(state) - set(tensors) - tied_names(policy.model))
    if lacking:
        raise ExportError(f"{model_dir}: has no tensor '{lacking[0]}' of the trained model ({len(lacking)} missing): "
                          "policy.path names another model than the run trained")
    say(f"carrying {source}'s other files ({'linked' if link else 'copied'})")
    replaced = {*files, model_dir / CONFIG, source / "README.md", source / REWARD_CURVE, *also_replaced}
    carry_files(source, partial, replaced, link)
    (partial / family.weights_folder).mkdir(parents=True, exist_ok=True)
    rewrite_config(model_dir / CONFIG, partial / family.weights_folder / CONFIG, dtype)
    write_shards(tensors, partial / family.weights_folder, max_shard_size, say)


def partial_tensor(file: Path, name: str):
    """A source tensor, read when its shard is written."""
    def read() -> torch.Tensor:
        with safe_open(file, "pt") as handle:
            return handle.get_tensor(name)

    return read


def _refuse_unless_one_adapter(weights: Path, stages: list[Path]) -> None:
    if saved_kind(weights) != "lora":
        raise ExportError(f"{weights}: holds full weights, not an adapter; export them with --format auto")
    if len(stages) > 1:
        raise ExportError(f"{weights}: its run continued {stages[0]}; its adapter applies on top of that stage's "
                          "and is no model alone: export with --format auto")


def _write_adapter(weights: Path, partial: Path, source: Path | None) -> None:
    config = json.loads((weights / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = str(source.resolve()) if source is not None else None
    (partial / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy2(weights / ADAPTER_FILE, partial / ADAPTER_FILE)


def _decoder(cfg) -> str:
    """The decoder component and the folders it read, as the recipe names them."""
    node = OmegaConf.to_container(cfg.decoder, resolve=True) if "decoder" in cfg else {}
    paths = ", ".join(f"{key} `{value}`" for key, value in node.items() if key.endswith("path") and value)
    return f"`{node.get('_component_', 'none')}`" + (f" ({paths})" if paths else "")


def _warn_if_decoded_elsewhere(cfg, source: Path, say: Callable[[str], None]) -> None:
    """X-Omni's decoder files travel in its model folder: say so when the run's rewards saw another folder's."""
    decoder_folder = OmegaConf.select(cfg, "decoder.xomni_path", default=None)
    if decoder_folder and Path(str(decoder_folder)).resolve() != source.resolve():
        say(f"warning: the run decoded with {decoder_folder}'s decoder; the export carries {source}'s vision and "
            "decoder files (the model card names the run's decoder)")


def _mode(cfg) -> str:
    if cfg.train.mode == "lora":
        lora = cfg.train.lora
        return f"LoRA r {lora.r}, alpha {lora.alpha}"
    return "full weights"
