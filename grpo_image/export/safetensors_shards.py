"""Weights written as transformers writes them: safetensors shards of at most a given size, with an index.

Each shard's tensors are cast to the export's dtype (and read, for tensors carried from the source) only when that
shard is written, so the export holds the float32 model and one shard at a time, not a second whole copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

Tensor = Callable[[], torch.Tensor]  # a tensor, produced when its shard is written


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating-point tensors in `dtype`; integer buffers keep theirs."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def write_shards(
    tensors: dict[str, tuple[Tensor, tuple[int, ...], torch.dtype]], folder: Path, max_shard_size: str | int = "5GB",
    progress: Callable[[str], None] = lambda line: None, stem: str = "model",
) -> list[Path]:
    """`tensors` (name -> (producer, shape, final dtype)) into `folder`/model.safetensors, or model-0000i-of-0000n
    shards and model.safetensors.index.json when they are larger than one shard; returns the files written.
    `stem` names the files as the loading library expects them ("diffusion_pytorch_model" for diffusers' models)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    sizes = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (_, shape, dtype) in tensors.items()}
    split = split_torch_state_dict_into_shards(sizes, filename_pattern=stem + "{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    written = []
    for i, (filename, names) in enumerate(split.filename_to_tensors.items(), start=1):
        progress(f"writing {filename} ({i}/{len(split.filename_to_tensors)})")
        shard = {name: cast(tensors[name][0](), tensors[name][2]).contiguous() for name in names}
        save_file(shard, folder / filename, metadata={"format": "pt"})
        written.append(folder / filename)
    if split.is_sharded:
        total = sum(t.numel() * t.element_size() for t in sizes.values())
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(folder / f"{stem}.safetensors.index.json")
    return written
