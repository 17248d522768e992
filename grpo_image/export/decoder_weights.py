"""A run's trained decoder in its export: the diffusion decoder's transformer with decoder GRPO's adapters merged,
or those adapters as a peft adapter of their own.

Decoder GRPO (`train.target` decoder or both) trains LoRA adapters on the decoder's transformer; a checkpoint keeps
them in `decoder/` (peft's names, float32) with what they are (`adapter_config.json`: r, alpha, the targets' regex). The
trained decoder is the source's transformer plus those adapters, so an export that carried the source's
transformer alone would serve the untrained decoder. Here each adapted Linear's weight becomes W + (alpha / r) B A,
computed in float32 from the source's own W (as the policy's adapters are merged) and cast once to the export's
dtype; every other tensor of the transformer is the source's, cast once too.

Where each family keeps the transformer, as its own loader reads it: GLM-Image's diffusers repository in
`transformer/`; X-Omni in the subfolder its `config.json` names (`vision_config.decoder.model_path`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from grpo_image.export.safetensors_shards import Tensor
from grpo_image.export.source_folders import CONFIG, ExportError, Family, weight_files
from grpo_image.training.checkpoint import DECODER
from grpo_image.training.checkpoint_fit import ADAPTER_FILE
from grpo_image.training.decoder_grpo import saved_lora

DIFFUSERS_STEM = "diffusion_pytorch_model"  # diffusers' weight files: diffusion_pytorch_model*.safetensors
GLM_IMAGE_TRANSFORMER = "transformer"


@dataclass(frozen=True)
class TrainedDecoder:
    """A checkpoint's decoder adapters and the LoRA shape they were trained with."""

    folder: Path  # the checkpoint's decoder/
    r: int
    alpha: float
    targets: str  # the regex over the transformer's module names that the adapters were injected on

    @property
    def scaling(self) -> float:
        return self.alpha / self.r  # peft's scaling of B A (no rsLoRA: decoder_train.lora has r and alpha only)

    def describe(self) -> str:
        return f"LoRA r {self.r}, alpha {self.alpha:g} on its transformer"


def trained_decoder(checkpoint: Path) -> TrainedDecoder | None:
    """The checkpoint's trained decoder, or None for a run that trained the policy alone (no decoder/)."""
    folder = checkpoint / DECODER
    if not (folder / ADAPTER_FILE).is_file():
        return None
    lora = saved_lora(folder)  # r, alpha and the targets' regex, as the run injected them
    return TrainedDecoder(folder, int(lora["r"]), float(lora["lora_alpha"]), lora["target_modules"])


def decoder_folder(source: Path, family: Family) -> Path:
    """The folder of `source` holding the family's decoder transformer, as the family's own code finds it."""
    if family.name == "GLM-Image":
        return source / GLM_IMAGE_TRANSFORMER
    if family.name == "X-Omni":
        config = json.loads((source / CONFIG).read_text())
        model_path = (config.get("vision_config") or {}).get("decoder", {}).get("model_path")
        if not model_path:
            raise ExportError(f"{source / CONFIG}: no vision_config.decoder.model_path: X-Omni's decoder transformer "
                              "has no place in this folder; export the decoder with --format peft")
        return source / model_path
    raise ExportError(f"the run trained a decoder; export knows where GLM-Image and X-Omni keep theirs, not "
                      f"{family.name}: export the adapters with --format peft")


def run_decoder_folder(cfg) -> Path | None:
    """The transformer folder the run's decoder read (None: a decoder built in memory)."""
    node = OmegaConf.to_container(cfg.decoder, resolve=True)
    if node.get("transformer"):  # X-Omni's decoder given its parts one by one
        return Path(node["transformer"])
    if node.get("path"):  # GlmImageDecoder
        return Path(node["path"]) / GLM_IMAGE_TRANSFORMER
    if node.get("xomni_path") and (Path(node["xomni_path"]) / CONFIG).is_file():
        from grpo_image.export.source_folders import FAMILIES

        xomni = next(family for family in FAMILIES.values() if family.name == "X-Omni")
        return decoder_folder(Path(node["xomni_path"]), xomni)
    return None


def check_decoder_source(cfg, target: Path) -> None:
    """The adapters merge into the weights they were trained on: the run's decoder's transformer must be the export's.

    A run folder that has moved (its old place gone) is taken to have moved with the source (`--source`)."""
    trained_on = run_decoder_folder(cfg)
    if trained_on is None:
        raise ExportError("the run's decoder was built in memory (no folder): no source holds the weights its "
                          "adapters were trained on; export the adapters with --format peft")
    if trained_on.exists() and trained_on.resolve() != target.resolve():
        raise ExportError(f"the run trained the decoder in {trained_on}, the export's decoder is {target}: its "
                          "adapters belong to another transformer; name the folder with --source, or export the "
                          "adapters with --format peft")


def decoder_adapters(decoder: TrainedDecoder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The saved adapters by module: name -> (A fp32 [r, in], B fp32 [out, r]), each checked against the run's r."""
    state = load_file(decoder.folder / ADAPTER_FILE)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, sep, part = key.rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise ExportError(f"{decoder.folder / ADAPTER_FILE}: '{key}' is not a LoRA A or B weight")
        pairs.setdefault(module, {})[part[0]] = value.float()
    adapters = {}
    for module, pair in sorted(pairs.items()):
        a, b = pair.get("A"), pair.get("B")  # [r, in], [out, r]
        if a is None or b is None or a.shape[0] != decoder.r or b.shape[1] != decoder.r:
            raise ExportError(f"{decoder.folder / ADAPTER_FILE}: the adapter of '{module}' is not a pair of rank "
                              f"{decoder.r} (decoder_train.lora.r): A {None if a is None else list(a.shape)}, "
                              f"B {None if b is None else list(b.shape)}")
        adapters[module] = (a, b)
    return adapters


def merged_tensors(model_dir: Path, decoder: TrainedDecoder, dtype: torch.dtype
                   ) -> tuple[list[Path], dict[str, tuple[Tensor, tuple[int, ...], torch.dtype]]]:
    """(the source transformer's weight files, every one of its tensors for `write_shards`): an adapted Linear's
    weight as W + scaling B A in float32, every other tensor the source's; read when its shard is written."""
    files = weight_files(model_dir, DIFFUSERS_STEM)
    adapters = decoder_adapters(decoder)
    tensors, merged = {}, set()
    for file in (f for f in files if f.suffix == ".safetensors"):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                shape = tuple(handle.get_slice(name).get_shape())
                module = name.removesuffix(".weight")
                if name.endswith(".weight") and module in adapters:
                    a, b = adapters[module]
                    if shape != (b.shape[0], a.shape[1]):
                        raise ExportError(f"{model_dir}: '{name}' is {list(shape)}, its adapter's B A is "
                                          f"{[b.shape[0], a.shape[1]]}: the source's decoder is another model")
                    tensors[name] = (_merged(file, name, a, b, decoder.scaling), shape, dtype)
                    merged.add(module)
                else:
                    tensors[name] = (_read(file, name), shape, dtype)
    lacking = sorted(set(adapters) - merged)
    if lacking:
        raise ExportError(f"{model_dir}: no weight '{lacking[0]}.weight' for the run's decoder adapter "
                          f"({len(lacking)} missing): the source's decoder is another model")
    return files, tensors


def _read(file: Path, name: str) -> Tensor:
    def read() -> torch.Tensor:
        with safe_open(file, "pt") as handle:
            return handle.get_tensor(name)

    return read


def _merged(file: Path, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> Tensor:
    def merge() -> torch.Tensor:
        with safe_open(file, "pt") as handle:
            weight = handle.get_tensor(name).float()  # [out, in]: the source's own W, exact in float32
        return weight + scaling * (b @ a)  # [out, in]: peft's merge, W + (alpha / r) B A

    return merge


def write_decoder_adapter(decoder: TrainedDecoder, out: Path, base: Path | None) -> None:
    """The adapters as peft writes an adapter: `out`/adapter_model.safetensors (the checkpoint's tensors, peft's
    names under the transformer) and adapter_config.json (r, alpha, the targets' regex, the transformer folder)."""
    from peft import LoraConfig

    out.mkdir(parents=True)
    config = LoraConfig(r=decoder.r, lora_alpha=decoder.alpha, target_modules=decoder.targets)
    config.base_model_name_or_path = str(base.resolve()) if base is not None else None
    config.save_pretrained(str(out))
    shutil.copy2(decoder.folder / ADAPTER_FILE, out / ADAPTER_FILE)


def peft_decoder_base(cfg, source: Path | None, family_of: Callable[[], Family]) -> Path | None:
    """The transformer folder a peft decoder adapter applies to: the source's, or the run's decoder's."""
    if source is not None:
        try:
            return decoder_folder(source, family_of())
        except ExportError:
            pass
    return run_decoder_folder(cfg)
