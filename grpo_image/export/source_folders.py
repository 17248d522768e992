"""Where each family's trained weights go back: the source folder's layout, and which of its files a run changes.

An export is the folder the recipe's `policy.path` names, with the language model's weights (and the `torch_dtype`
its config states) replaced and every other file carried over as it is: remote code, tokenizer, processor, vision
and decoder files, the other components of a diffusers repository. Carrying the source's own config (rather than
the one the loading library would write today) is what keeps a model's own code reading the values it was written
for: a transformers-5 config of X-Omni has no top-level `rope_theta`, and X-Omni's code silently falls back to
Qwen2's 10,000 instead of 1e6.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from grpo_image.policies.causal_lm import CausalLMPolicy
from grpo_image.policies.glm_image import AR_FOLDER, GlmImagePolicy
from grpo_image.policies.janus import JanusPolicy
from grpo_image.policies.xomni import XOmniPolicy

CONFIG = "config.json"


class ExportError(ValueError):
    """An export that cannot be written: refused before anything is written."""


@dataclass(frozen=True)
class Family:
    name: str  # as the docs say it
    weights_folder: str  # the language model's folder inside the source ("" for the root)
    model_type: str | None  # what its config.json says (None: any causal LM)
    loaded_by: str  # the family's own code that reads the export


FAMILIES = {  # the most specific policy class first
    XOmniPolicy: Family("X-Omni", "", "x-omni", "X-Omni's generate.py (its remote code, transformers 4.51.3)"),
    GlmImagePolicy: Family("GLM-Image", AR_FOLDER, "glm_image", "diffusers' GlmImagePipeline.from_pretrained"),
    JanusPolicy: Family("Janus-Pro", "", "janus", "transformers' JanusForConditionalGeneration and JanusProcessor"),
    CausalLMPolicy: Family("causal LM", "", None, "transformers' AutoModelForCausalLM and AutoTokenizer"),
}


def check_source(source: Path, family: Family) -> None:
    """The recipe's `policy.path` must be there and hold the family's model in its own layout."""
    config = source / family.weights_folder / CONFIG
    if not config.is_file():
        raise ExportError(f"{source}: the run's policy.path holds no {config.relative_to(source)}; the export is "
                          f"that folder with the trained weights in it, so it must be the {family.name} folder the "
                          "run was trained from")
    model_type = json.loads(config.read_text()).get("model_type")
    if family.model_type is not None and model_type != family.model_type:
        raise ExportError(f"{config}: model_type {model_type!r} is not {family.name}'s {family.model_type!r}: "
                          "policy.path names another model than the one the run trained")
    if family.weights_folder and not (source / "model_index.json").is_file():
        raise ExportError(f"{source}: not a diffusers repository (no model_index.json); {family.name} exports into "
                          "the repository the pipeline loads")


def weight_files(folder: Path, stem: str = "model") -> list[Path]:
    """The safetensors files (and their index) holding a model folder's weights: `stem`.safetensors or its shards
    (transformers' stem is "model", diffusers' "diffusion_pytorch_model")."""
    index, single = f"{stem}.safetensors.index.json", f"{stem}.safetensors"
    if (folder / index).is_file():
        shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
        return [folder / index, *(folder / name for name in shards)]
    if (folder / single).is_file():
        return [folder / single]
    raise ExportError(f"{folder}: no {single} nor {index}: the source's weights are in another format")


def carry_files(source: Path, out: Path, replaced: set[Path], link: bool) -> list[Path]:
    """Copy (or link) every file of `source` but `replaced` into `out`, keeping the tree; returns the files carried.

    Links are hard links where the file system allows them (nothing changes if the source moves), else symbolic.
    """
    carried = []
    for path in sorted(source.rglob("*")):
        if path.is_dir() or path in replaced:
            continue
        target = out / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(path.resolve(), target)
            except OSError:
                os.symlink(path.resolve(), target)
        else:
            shutil.copy2(path, target)
        carried.append(target)
    return carried


def rewrite_config(config_file: Path, target: Path, dtype_name: str) -> None:
    """The source's config with only the dtype it states changed (`torch_dtype`, and `dtype` where it says that)."""
    config = json.loads(config_file.read_text())
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype_name
    target.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
