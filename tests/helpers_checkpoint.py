"""Reading what a checkpoint saved, whatever its format, as tests compare weights file against file."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from grpo_image.training.checkpoint import DCP_METADATA, read_sharded
from grpo_image.training.checkpoint_fit import ADAPTER_FILE, saved_shapes
from grpo_image.training.saved_weights import policy_folder


def saved_weights(path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved policy (a run, a checkpoint or its policy/ folder): an adapter's, or full weights."""
    folder = policy_folder(Path(path))
    if not (folder / DCP_METADATA).is_file():
        return load_file(folder / ADAPTER_FILE)
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(folder).read_metadata().state_dict_metadata
    state = {name: torch.empty(shape, dtype=metadata[name].properties.dtype)
             for name, shape in saved_shapes(folder).items()}
    read_sharded(state, folder, None)
    return state
