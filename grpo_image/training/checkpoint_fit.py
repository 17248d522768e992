"""Whether saved weights fit the recipe's model, and which training keys a resumed recipe changed.

Saved weights of another model (another size or family, another LoRA rank, the other `train.mode`) are refused
before any step with one line naming the first tensor that differs (its name, its shape in the checkpoint and in the
recipe's model), rather than a traceback of every size mismatch: on resume, for `train.init_from`, and for `sample`
and `eval --checkpoint`. The shapes are read from the files' headers (DCP's `.metadata`, safetensors' header), never
from the tensors. A resumed recipe whose training keys differ from the checkpoint's `config.yaml` runs on, with a
warning naming each key and both values.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Collection
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from grpo_image.training.checkpoint import DCP_METADATA, CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
FULL_WEIGHTS_FILE = "model.safetensors"
HOLDS = {"lora": "a LoRA adapter", "full": "full weights"}
ADAPTER_TENSOR = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")  # peft's names: the adapted Linear
# What a resumed run computes depends on these keys; a change is named in a warning (the run goes on).
TRAINING_KEYS = ("seed", "policy", "decoder", "decoder_seeds", "rewards", "data", "sampling", "train", "advantages")
# ... except these, which say how the same numbers are split over forwards, processes and memory (or compiled).
SCHEDULING_KEYS = {"train.micro_batch_size", "train.gradient_checkpointing", "train.fsdp", "train.logprob_chunk",
                   "sampling.batch_size", "sampling.compile"}


def saved_kind(folder: Path) -> str | None:
    """What a weights folder holds: "lora" (a peft adapter), "full" (a DCP folder or a model.safetensors), or None."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        return "lora"
    if (folder / DCP_METADATA).is_file() or (folder / FULL_WEIGHTS_FILE).is_file():
        return "full"
    return None


def refuse_other_mode(folder: Path, mode: str) -> None:
    """A resumed run trains what its checkpoint holds: an adapter is not resumed as full weights, nor the reverse."""
    kind = saved_kind(folder)
    if kind != mode:
        raise CheckpointError(
            f"{folder}: holds {HOLDS.get(kind, 'no weights')} (train.mode {kind}) and the recipe trains {HOLDS[mode]} "
            f"(train.mode {mode}): resume with the checkpoint's train.mode, or start a new run from its weights with "
            f"train.init_from={Path(folder).parent}"
        )


def saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every saved tensor's name and shape, in the file's order, from its header alone."""
    folder = Path(folder)
    if (folder / DCP_METADATA).is_file():
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        metadata = FileSystemReader(folder).read_metadata().state_dict_metadata
        return {name: tuple(m.size) for name, m in metadata.items() if isinstance(m, TensorStorageMetadata)}
    from safetensors import safe_open

    file = folder / (ADAPTER_FILE if saved_kind(folder) == "lora" else FULL_WEIGHTS_FILE)
    with safe_open(file, "pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def refuse_unless_fits(folder: Path, wanted: dict[str, tuple[int, ...]], optional: Collection[str] = ()) -> None:
    """Refuse saved weights whose tensors are not, name for name and shape for shape, `wanted` (the recipe's model's,
    in its order); `optional`: names the file may leave out (tied weights that save_pretrained does not write)."""
    saved = saved_shapes(folder)
    for name, shape in wanted.items():
        if name not in saved and name not in optional:
            example = next(iter(saved), "none")
            raise CheckpointError(f"{folder} does not fit the recipe's model: it has no tensor '{name}' (it has "
                                  f"{len(saved)} others, e.g. '{example}'): was it saved from another model family?")
        if name in saved and tuple(saved[name]) != tuple(shape):
            _refuse_shape(folder, name, saved[name], shape)
    extra = next((name for name in saved if name not in wanted), None)
    if extra is not None:
        raise CheckpointError(f"{folder} does not fit the recipe's model: it has a tensor '{extra}' "
                              f"{list(saved[extra])} that the recipe's model does not: another model family?")


def refuse_adapter_unless_fits(folder: Path, model) -> None:
    """An adapter applies to the recipe's model only if every Linear it adapts is there with the widths it was
    trained on: lora_A is [r, in_features] and lora_B [out_features, r] of that Linear's weight [out, in]."""
    for name, shape in saved_shapes(folder).items():
        match = ADAPTER_TENSOR.match(name)
        if match is None:
            continue
        try:
            out_features, in_features = model.get_submodule(match.group(1)).weight.shape
        except AttributeError:
            raise CheckpointError(f"{folder} does not fit the recipe's model: its tensor '{name}' adapts "
                                  f"'{match.group(1)}', which the recipe's model does not have") from None
        wanted = (shape[0], in_features) if match.group(2) == "A" else (out_features, shape[1])
        if tuple(shape) != wanted:
            _refuse_shape(folder, name, shape, wanted)


def _refuse_shape(folder: Path, name: str, saved, wanted) -> None:
    raise CheckpointError(f"{folder} does not fit the recipe's model: '{name}' is {list(saved)} in the checkpoint "
                          f"and {list(wanted)} in the recipe's model")


def warn_changed_training_keys(checkpoint: Path, cfg: DictConfig) -> list[str]:
    """Warn once per training key whose value in the recipe differs from the checkpoint's config.yaml; return them."""
    saved = Path(checkpoint) / "config.yaml"
    if not saved.is_file():
        return []
    theirs, ours = _leaves(OmegaConf.load(saved)), _leaves(cfg)
    changed = [key for key in sorted(set(theirs) | set(ours))
               if key not in SCHEDULING_KEYS and theirs.get(key) != ours.get(key)]
    for key in changed:
        warnings.warn(f"resuming {checkpoint}: '{key}' is {ours.get(key)} in the recipe and was {theirs.get(key)} in "
                      "the checkpoint; the run goes on with the recipe's value", stacklevel=2)
    return changed


def _leaves(cfg: DictConfig) -> dict[str, object]:
    """The training keys as dotted names and values; lists of nodes (the rewards) are walked, other lists are values."""
    leaves: dict[str, object] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}", value)
        elif isinstance(node, list) and any(isinstance(item, dict) for item in node):
            for index, value in enumerate(node):
                walk(f"{prefix}.{index}", value)
        else:
            leaves[prefix] = node

    for key in TRAINING_KEYS:
        node = OmegaConf.select(cfg, key, default=None)
        walk(key, OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node)
    return leaves
