"""Prompt sets and the group sampler.

A prompt set is a `.txt` file (one prompt a line) or a `.jsonl` file (one `{"prompt", "metadata"}` object
a line); metadata is the only channel from a prompt set to a reward, so it is loaded strictly: a typo in a
key fails at load time with the file and line, not as a silently NaN reward hundreds of steps later.
It can also be anything Hugging Face `datasets` reads, as TRL users keep their prompts: a `.parquet`, `.csv`,
`.json` or `.arrow` file, a folder of them, or a hub id when the machine is online. Its prompt column is named
by the recipe (`data.prompt_column`), and its metadata is the other columns (or those `data.metadata_columns`
lists), so a column `text` reaches the OCR reward as `metadata["text"]`.

The group sampler draws B prompts per step and repeats each G times, contiguously, with explicit group ids.
What it draws is a pure function of (seed, step): a resumed run draws exactly the prompts the original run
would have, and every rank computes the same global batch and keeps only its own slice of groups.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from grpo_image.core.types import PromptRecord

_JSONL_KEYS = ("prompt", "metadata")
DATASETS_FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".arrow": "arrow"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name


class PromptSetError(ValueError):
    """A prompt set that cannot be loaded; the message names the file (and line, where there is one)."""


def load_prompts(
    path: str | Path, prompt_column: str = "prompt", metadata_columns: Sequence[str] | None = None,
    split: str = "train",
) -> list[PromptRecord]:
    """Load a prompt set; raise `PromptSetError` naming the file (and line or row) on any problem.

    `.txt` and `.jsonl` are read here; other formats, folders and hub ids through `datasets` (see the module
    docstring), where the other arguments name the split and columns.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DATASETS_FORMATS or path.is_dir() or (not path.exists() and HUB_ID.match(str(path))):
        return _load_with_datasets(path, prompt_column, metadata_columns, split)
    if suffix not in (".txt", ".jsonl"):
        raise PromptSetError(
            f"{path}: unknown prompt set format {path.suffix!r}; expected .txt, .jsonl, or a file datasets reads "
            f"({', '.join(DATASETS_FORMATS)}), a folder of them or a hub id"
        )
    if not path.is_file():
        raise PromptSetError(f"{path}: prompt set file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise PromptSetError(f"{path}: not valid UTF-8 ({err})") from err

    parse = _parse_txt_line if suffix == ".txt" else _parse_jsonl_line
    records = [parse(line, path, lineno) for lineno, line in enumerate(lines, start=1) if line.strip()]
    if not records:
        raise PromptSetError(f"{path}: the prompt set is empty (no non-blank lines)")
    return records


def _parse_txt_line(line: str, path: Path, lineno: int) -> PromptRecord:
    return PromptRecord(prompt=line.strip(), metadata={})


def _parse_jsonl_line(line: str, path: Path, lineno: int) -> PromptRecord:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise PromptSetError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(obj, dict):
        raise PromptSetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_JSONL_KEYS))
    if unknown:
        raise PromptSetError(f"{where}: unknown key(s) {unknown}; valid keys are {list(_JSONL_KEYS)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptSetError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise PromptSetError(f"{where}: 'metadata' must be a JSON object, got {type(metadata).__name__}")
    return PromptRecord(prompt=prompt, metadata=metadata)


def _load_with_datasets(
    path: Path, prompt_column: str, metadata_columns: Sequence[str] | None, split: str
) -> list[PromptRecord]:
    """Rows of a datasets-readable source as records: one column the prompt, the others (or the named) metadata."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise PromptSetError(
            f"{path}: reading this prompt set needs the datasets package: "
            "pip install -c constraints.txt -e '.[datasets]'"
        ) from err
    if path.is_file():
        source = {"path": DATASETS_FORMATS[path.suffix.lower()], "data_files": str(path)}
    else:
        source = {"path": str(path)}  # a local folder, or a hub id (fetched only when the machine is online)
    try:
        table = load_dataset(**source, split=split)
    except Exception as err:  # datasets raises many kinds (missing files, no network, bad split)
        raise PromptSetError(f"{path}: datasets could not load split {split!r}: {err}") from err
    columns = list(table.column_names)
    wanted = [c for c in columns if c != prompt_column] if metadata_columns is None else list(metadata_columns)
    missing = [c for c in [prompt_column, *wanted] if c not in columns]
    if missing:
        raise PromptSetError(f"{path}: no column(s) {missing}; its columns are {columns} (data.prompt_column, "
                             "data.metadata_columns)")
    records = []
    for index, row in enumerate(table):
        prompt = row[prompt_column]
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptSetError(f"{path}: row {index}: column {prompt_column!r} must be a non-empty string, "
                                 f"got {prompt!r}")
        records.append(PromptRecord(prompt=prompt, metadata={c: row[c] for c in wanted if row[c] is not None}))
    if not records:
        raise PromptSetError(f"{path}: the prompt set is empty (split {split!r} has no rows)")
    return records


def load_recipe_prompts(data_cfg) -> list[PromptRecord]:
    """The prompt set a recipe's `data` section names, with its column settings."""
    columns = data_cfg.metadata_columns
    return load_prompts(data_cfg.prompts, data_cfg.prompt_column, None if columns is None else list(columns),
                        data_cfg.split)


class GroupSampler:
    """Draws B prompts per step, each repeated G times: N = B * G records and int64 `group_ids [N]`.

    Prompts are visited epoch by epoch without replacement: epoch e is a permutation of all records seeded
    by `numpy.random.default_rng([seed, e])`, and step s takes positions s*B .. s*B+B-1 of the concatenated
    epochs. Nothing is carried between calls, so `sample(step)` depends on (seed, step) alone.

    With `world_size` W > 1, `batch_size` is the global B; rank r gets groups r*B/W .. (r+1)*B/W-1 of the
    step (B/W prompts, B/W * G records) and its `group_ids` stay global group indices.
    """

    def __init__(
        self,
        records: Sequence[PromptRecord],
        *,
        batch_size: int,
        group_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(records) == 0:
            raise ValueError("GroupSampler needs at least one prompt record")
        if batch_size < 1:
            raise ValueError(f"batch_size (B) must be >= 1, got {batch_size}")
        if group_size < 1:
            raise ValueError(f"group_size (G) must be >= 1, got {group_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if batch_size % world_size != 0:
            raise ValueError(
                f"batch_size (global B={batch_size}) must be divisible by world_size ({world_size})"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.records = list(records)
        self.batch_size = batch_size
        self.group_size = group_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def sample(self, step: int) -> tuple[list[PromptRecord], torch.Tensor]:
        """Return this rank's records (each drawn prompt repeated G times, contiguous) and group ids."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        per_rank = self.batch_size // self.world_size
        first_group = self.rank * per_rank
        groups = np.arange(first_group, first_group + per_rank)  # int64 [B/W], global group indices
        positions = step * self.batch_size + groups  # int64 [B/W], into the concatenated epochs
        indices = self._record_indices(positions)  # int64 [B/W]
        records = [self.records[i] for i in indices for _ in range(self.group_size)]  # N/W entries
        group_ids = torch.from_numpy(groups).repeat_interleave(self.group_size)  # int64 [N/W]
        return records, group_ids

    def _record_indices(self, positions: np.ndarray) -> np.ndarray:
        """Map positions in the concatenated epochs to record indices, one permutation per epoch touched."""
        num = len(self.records)
        epochs, offsets = np.divmod(positions, num)  # int64 [B/W] each
        indices = np.empty_like(positions)  # int64 [B/W]
        for epoch in np.unique(epochs):
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(num)  # int64 [M]
            mask = epochs == epoch  # bool [B/W]
            indices[mask] = perm[offsets[mask]]
        return indices
