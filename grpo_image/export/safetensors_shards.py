"""Weights written as transformers writes them: safetensors shards of at most a given size, with an index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from grpo_image.export.source_folders import INDEX


def write_shards(
    state: dict[str, torch.Tensor], folder: Path, max_shard_size: str | int = "5GB",
    progress: Callable[[str], None] = lambda line: None,
) -> list[Path]:
    """`state` (tensors already in their final dtype) into `folder`/model.safetensors, or model-0000i-of-0000n
    shards and model.safetensors.index.json when it is larger than one shard; returns the files written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    written = []
    for i, (filename, names) in enumerate(split.filename_to_tensors.items(), start=1):
        progress(f"writing {filename} ({i}/{len(split.filename_to_tensors)})")
        save_file({name: state[name].contiguous() for name in names}, folder / filename, metadata={"format": "pt"})
        written.append(folder / filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(folder / INDEX)
    return written
