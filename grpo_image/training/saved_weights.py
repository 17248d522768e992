"""Saved weights into a policy: a checkpoint's, an adapter's, and those of every stage a run continues.

A run that starts from another (`train.init_from`) starts from exactly the model that run trained, whatever the
precision, and so does `sample`, `eval` or `export` of one of its checkpoints:
- the stages are found by following `train.init_from` back: a checkpoint's own `config.yaml` names the run it
  continued, back to full weights or the base model (`stage_folders`);
- an earlier stage's adapter is attached frozen (`stage_1`, `stage_2`, ...) under the adapter being trained, never
  merged into the base: merged into a bf16 base, an RL update of 1e-5 to 1e-4 of the weights is mostly below half a
  bf16 ULP and rounds away (docs/recipes.md, "Stages"). Attached, the model computes what the earlier run computed,
  bit for bit, and it is the new run's reference;
- full fine-tuning merges earlier adapters into its fp32 master weights (`merge=True`), where rounding is fp32's;
- full weights load in place: they already hold every stage before them.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from grpo_image.policies.causal_lm import CausalLMPolicy
from grpo_image.training.checkpoint import DCP_METADATA, POLICY, WEIGHTS, CheckpointError, find_checkpoint, read_sharded
from grpo_image.training.checkpoint_fit import (
    ADAPTER_FILE, FULL_WEIGHTS_FILE, refuse_adapter_unless_fits, refuse_unless_fits, saved_kind,
)

TRAINED_ADAPTER = "default"  # peft's name for the adapter get_peft_model makes: the one a LoRA run trains
STAGE_ADAPTER = "stage_{}"  # an earlier stage's adapter, attached frozen: stage_1 is the first run's


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """peft reads `is_gradient_checkpointing`, which transformers has deprecated: its notice is not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def policy_folder(path: str | Path, hashed: str | None = WEIGHTS) -> Path:
    """The folder holding saved weights: the path itself (an adapter, a checkpoint's DCP weights, a model folder), a
    checkpoint's `policy/`, or the newest checkpoint of a run folder whose weights are complete (their hashes checked
    unless `hashed` is SIZES_ONLY: a quick look, as the memory plan takes)."""
    path = Path(path)
    if saved_kind(path):
        return path
    if (path / POLICY).is_dir():
        return path / POLICY
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    return find_checkpoint(path, hashed=hashed) / POLICY


def stage_folders(init_from: str | Path | None, hashed: str | None = WEIGHTS) -> list[Path]:
    """The saved weights a run starting from `init_from` builds on, earliest first.

    `init_from`'s own weights last; before them, while they are an adapter, the weights its run started from, read
    from `train.init_from` in the `config.yaml` saved beside them (a relative path is read from the working folder,
    as the run that wrote it read it). The walk stops at full weights, which hold every stage before them, or at
    weights with no run config (the first stage, or an adapter saved by hand).
    """
    chain: list[Path] = []
    path = init_from
    while path:
        folder = policy_folder(path, hashed).resolve()
        if folder in chain:
            raise CheckpointError(f"{folder}: train.init_from leads back to itself through {chain[0]}")
        chain.insert(0, folder)
        saved_config = folder.parent / "config.yaml"
        if saved_kind(folder) == "full" or not saved_config.is_file():
            break
        path = OmegaConf.select(OmegaConf.load(saved_config), "train.init_from", default=None)
    return chain


def load_full_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Full weights into a whole `model` in place, cast to each tensor's dtype: a checkpoint's DCP folder (this
    process reads every shard, one tensor at a time, into the model's own tensors) or a model.safetensors."""
    folder = Path(folder)
    state = model.state_dict()  # the model's own tensors
    shapes = {name: tuple(value.shape) for name, value in state.items()}
    if (folder / DCP_METADATA).is_file():
        refuse_unless_fits(folder, shapes)
        read_sharded(state, folder, None)
        return
    refuse_unless_fits(folder, shapes, optional=tied_names(model))
    model.load_state_dict(load_file(folder / FULL_WEIGHTS_FILE), strict=False)


def tied_names(model: torch.nn.Module) -> set[str]:
    """Weights that save_pretrained leaves out because they are tied to another one."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if model.config.tie_word_embeddings else set()


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model under peft's wrappers (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attached_adapters(model: torch.nn.Module) -> list[str]:
    """The adapters attached to `model` (peft's), in the order they were attached."""
    return list(model.peft_config) if hasattr(model, "peft_config") else []


def attach_adapter(policy: CausalLMPolicy, folder: Path, name: str) -> None:
    """A saved adapter onto `policy.model` as adapter `name`, frozen, every attached adapter active (their outputs
    add up); the base's own parameters keep whether they are trainable."""
    from peft import PeftModel

    if not (folder / ADAPTER_FILE).is_file():
        raise CheckpointError(f"{folder}: adapter_config.json without {ADAPTER_FILE}")
    refuse_adapter_unless_fits(folder, base_model(policy.model))
    trainable = {id(p): p.requires_grad for p in policy.model.parameters()}
    with peft_quietly():
        if attached_adapters(policy.model):
            policy.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        else:
            policy.model = PeftModel.from_pretrained(policy.model, str(folder), adapter_name=name, is_trainable=False)
    names = attached_adapters(policy.model)
    policy.model.base_model.set_adapter(names, inference_mode=True)  # all active, all frozen
    for param in policy.model.parameters():
        param.requires_grad_(trainable.get(id(param), False))  # peft froze the base while attaching


def merge_adapters(policy: CausalLMPolicy) -> None:
    """Every attached adapter merged into the base weights, in the base's dtype (fp32 masters: fp32's rounding)."""
    if not attached_adapters(policy.model):
        return
    trainable = [p.requires_grad for p in base_model(policy.model).parameters()]
    policy.model = policy.model.merge_and_unload()
    for param, flag in zip(policy.model.parameters(), trainable):  # peft froze the base while attached
        param.requires_grad_(flag)


def load_stages(policy: CausalLMPolicy, init_from: str | Path | None, *, merge: bool) -> list[str]:
    """The weights of every stage `init_from` builds on into `policy`, in order (see `stage_folders`).

    Adapters are attached frozen as `stage_1`, `stage_2`, ..., or merged into the base (`merge`: full fine-tuning's
    fp32 masters). Returns the names of the adapters left attached.
    """
    names: list[str] = []
    for folder in stage_folders(init_from):
        if saved_kind(folder) == "full":
            load_full_weights(policy.model, folder)
        elif saved_kind(folder) == "lora":
            names.append(STAGE_ADAPTER.format(len(names) + 1))
            attach_adapter(policy, folder, names[-1])
        else:
            raise CheckpointError(f"{folder}: holds neither a peft adapter nor full weights")
    if merge:
        merge_adapters(policy)
        return []
    return names
