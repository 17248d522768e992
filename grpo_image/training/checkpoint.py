"""Atomic, sharded checkpoints: a run resumes from its newest complete checkpoint as if it had never stopped.

`checkpoints/step_XXXXXX/` holds:
- `policy/`: LoRA: the peft adapter (adapter_config.json + adapter_model.safetensors), written once by rank 0; full
  weights: a `torch.distributed.checkpoint` (DCP) folder, `.metadata` and one `__<rank>_0.distcp` file per process,
  each process writing its own FSDP shards (a tensor every process holds whole is written once);
- `optimizer/`: AdamW's state keyed by parameter name, a DCP folder written the same way;
- `decoder/` (decoder GRPO): the decoder's LoRA adapters (peft's names) and their AdamW state, whole on every
  process and written by rank 0;
- `scheduler.pt`, `rng.pt`, `trainer_state.json`, `config.yaml` and the prefetched rollouts (rank 0);
- `manifest.json`: every file's size and SHA-256, written last.

Atomic: every rank writes into `.tmp-step_XXXXXX`; once all are done, rank 0 writes the manifest and renames the
folder to `step_XXXXXX`. A crash leaves either a complete checkpoint or a temporary folder that is ignored; on resume
the newest checkpoint whose files match its manifest is used, a corrupt or partial one skipped with a warning.

At real size (115 GB for X-Omni full fine-tuning: fp32 weights and AdamW) no rank gathers, writes, hashes or reads
the whole: each rank hashes the files it wrote itself, just written and in parallel, so the manifest costs 1/W of a
re-read; on resume each rank hashes the files it wrote when the process counts match (they are the ones it reads)
and DCP reads its own shard, one tensor at a time, straight into the tensors it fills (resharding when the number of
processes or FSDP differs). Every wait inside a checkpoint (DCP's planning and finishing, the hashes, the rename)
goes through a gloo group of its own whose timeout is the recipe's `checkpoint_timeout_s`, and the ranks leave the
checkpoint together: the training group (NCCL, 10 minutes by default) never waits for a slow disk. A CPU group is also
what DCP's asynchronous save needs.

Everything random in a step derives from (seed, step), so the state to restore is the weights, the optimizer, the
scheduler, the step and torch's global RNG.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from grpo_image.training.distributed import World

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
PREFIX = "step_"
PREFETCH = "prefetched_rollout.safetensors"
POLICY = "policy"
OPTIMIZER = "optimizer"
DECODER = "decoder"
DCP_METADATA = ".metadata"  # what makes a folder a DCP checkpoint
TIMEOUT_S = 3600.0  # checkpoint_timeout_s's default (grpo_image/base/defaults.yaml says why)
EVERYTHING, WEIGHTS, SIZES_ONLY = "", f"{POLICY}/", None  # which files find_checkpoint hashes: a name prefix, or none
WRITER = re.compile(r"__(\d+)_\d+\.distcp$")  # DCP names the files rank r writes __r_<i>.distcp


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: none is there, or it does not fit the recipe."""


def save_checkpoint(
    run_dir: Path, step: int, weights, optimizer, scheduler, config: DictConfig, keep: int,
    prefetched: dict[str, torch.Tensor] | None = None, world: World = World(), timeout_s: float = TIMEOUT_S,
    rng_state: torch.Tensor | None = None, loop_state: dict | None = None, decoder=None,
) -> Path:
    """Write the checkpoint of `step` atomically and keep only the newest `keep` (0: all). Every rank calls this.

    `prefetched` holds rollouts already sampled for the next step (workers.prefetch): they were drawn from the
    weights before this step's update, which the checkpoint no longer has, so they are saved to resume exactly.
    `rng_state`: torch's RNG as it was after `step` (default: as it is now); `loop_state`: what else the loop
    remembers across steps (JSON: the health checks' streaks), restored by `load_checkpoint`. `decoder`: the
    decoder GRPO trains (grpo_image/training/decoder_grpo.py), if any.
    """
    group = coordination_group(world, timeout_s)
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(group)  # nobody writes before the folder is there and empty
    weights.save(tmp / POLICY, group)
    weights.save_optimizer_state(optimizer, tmp / OPTIMIZER, group)
    if world.is_main:
        if decoder is not None:
            decoder.save(tmp / DECODER)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state() if rng_state is None else rng_state}, tmp / "rng.pt")
        if prefetched is not None:
            save_file({key: value.contiguous() for key, value in prefetched.items()}, str(tmp / PREFETCH))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "loop": loop_state or {}}))
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(config))
    mine = _files_of(tmp, world.rank, world.size)  # the files this rank wrote
    for name in mine:
        _fsync(tmp / name)
    entries = _gathered(group, {name: _entry(tmp / name) for name in mine})
    if world.is_main:
        files = {name: entry for part in entries for name, entry in part.items()}
        manifest = {"step": step, "processes": world.size, "files": dict(sorted(files.items()))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep)
    _barrier(group)  # the ranks leave together: no training collective waits for the rename
    return final


def find_checkpoint(
    path: str | Path, *, hashed: str | None = EVERYTHING, world: World = World(), timeout_s: float = TIMEOUT_S
) -> Path:
    """The checkpoint folder itself, or the newest complete checkpoint of a run folder.

    Every file must be there with its manifest's size; `hashed` says which files are also checked against their
    SHA-256: those whose name starts with it (EVERYTHING, or WEIGHTS for sample and eval), or none (SIZES_ONLY: a quick
    look, as before a launch). With several processes every rank calls this and hashes its share of the files.
    """
    path = Path(path)
    group = coordination_group(world, timeout_s)
    if (path / MANIFEST).is_file():
        problem = verify_checkpoint(path, hashed=hashed, world=world, group=group)
        if problem:
            raise CheckpointError(f"{path}: not a usable checkpoint: {problem}")
        return path
    candidates = sorted((path / CHECKPOINTS).glob(f"{PREFIX}*"), reverse=True)
    for candidate in candidates:
        problem = verify_checkpoint(candidate, hashed=hashed, world=world, group=group)
        if problem is None:
            return candidate
        if world.is_main:
            warnings.warn(f"skipping checkpoint {candidate}: {problem}", stacklevel=2)
    raise CheckpointError(f"{path}: no complete checkpoint found (neither a checkpoint nor a run folder holding one)")


def verify_checkpoint(
    folder: Path, *, hashed: str | None = EVERYTHING, world: World = World(), group=None
) -> str | None:
    """None when every file the manifest lists is present with its size (and the hashed ones with their SHA-256),
    else what is wrong; the same answer on every rank, each of which hashes its share (`_files_of`)."""
    return next((p for p in _gathered(group, _problem(Path(folder), hashed, world)) if p is not None), None)


def _problem(folder: Path, hashed: str | None, world: World) -> str | None:
    """What this rank finds wrong: a file missing or of another size, or one of its share whose hash differs."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"manifest unreadable ({err})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} does not match its manifest entry ({path.stat().st_size} bytes, not {expected['bytes']})"
    mine = [] if hashed is None else _files_of(folder, world.rank, world.size, list(files))
    for name in mine:
        if name.startswith(hashed) and _entry(folder / name)["sha256"] != files[name]["sha256"]:
            return f"{name} does not match its manifest entry"
    return None


def load_checkpoint(
    folder: Path, weights, optimizer, scheduler, world: World = World(), timeout_s: float = TIMEOUT_S, decoder=None,
) -> tuple[int, dict[str, torch.Tensor] | None, dict]:
    """Restore weights, optimizer, scheduler and RNG (and the trained decoder's adapters and optimizer) in place;
    every rank reads its own shard.

    Returns the step the checkpoint was taken after, the prefetched rollout tensors (if it holds any) and the loop's
    own state.
    """
    group = coordination_group(world, timeout_s)
    if not (folder / OPTIMIZER).is_dir():
        raise CheckpointError(
            f"{folder}: written by an earlier version (optimizer.pt, gathered whole), which does not resume; its "
            f"weights still start a new run with train.init_from={folder}"
        )
    weights.load(folder / POLICY, group)  # refuses, naming the tensor, weights that do not fit the recipe's model
    weights.load_optimizer_state(optimizer, folder / OPTIMIZER, group)
    if decoder is not None:
        if not (folder / DECODER).is_dir():
            raise CheckpointError(f"{folder}: holds no decoder/ (its run did not train the decoder): it cannot "
                                  "resume a run whose train.target is decoder or both")
        decoder.load(folder / DECODER)
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(folder / "rng.pt", weights_only=True)["torch"])
    state = json.loads((folder / "trainer_state.json").read_text())
    prefetched = load_file(folder / PREFETCH) if (folder / PREFETCH).is_file() else None
    _barrier(group)  # the ranks leave together: no training collective waits for a slow reader
    return int(state["step"]), prefetched, state.get("loop", {})


def write_sharded(state: dict, folder: Path, group) -> None:
    """A state dict into a DCP folder: every rank writes the tensors it holds (its FSDP shards; a tensor every rank
    holds whole is written by one of them), rank 0 the metadata. `group`: None for a single process."""
    import torch.distributed.checkpoint as dcp

    with _single_process_quietly():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(folder), process_group=group, no_dist=group is None)


def saved_keys(folder: Path) -> set[str]:
    """The flattened keys a DCP folder holds (e.g. `state.lm_head.weight.step` of an optimizer's state)."""
    import torch.distributed.checkpoint as dcp

    return set(dcp.FileSystemReader(folder).read_metadata().state_dict_metadata)


def read_sharded(state: dict, folder: Path, group) -> None:
    """A DCP folder into `state`'s own tensors, in place: each rank reads the part of each tensor it holds, one saved
    tensor at a time, whatever the number of processes that wrote it. `group`: None reads every tensor here."""
    import torch.distributed.checkpoint as dcp

    with _single_process_quietly():
        dcp.load(state, storage_reader=dcp.FileSystemReader(folder), process_group=group, no_dist=group is None)


@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns whenever it runs without a process group, which is what a single process asks for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


_GROUPS: dict[float, tuple[object, object]] = {}  # timeout -> (the default group it was made in, the gloo group)


def coordination_group(world: World, timeout_s: float):
    """The gloo group a checkpoint's waits go through, with a timeout that fits the write (None: one process).

    Made once per process group, by every rank at the same point (the first checkpoint saved or looked for).
    """
    if not world.distributed:
        return None
    default = dist.group.WORLD
    made = _GROUPS.get(timeout_s)
    if made is None or made[0] is not default:  # none yet, or made in a process group that has since been replaced
        made = (default, dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)))
        _GROUPS[timeout_s] = made
    return made[1]


def is_first(group) -> bool:
    """Whether this process writes what is written once for all: a single process, or rank 0 of `group`."""
    return group is None or dist.get_rank(group) == 0


def _barrier(group) -> None:
    if group is not None:
        dist.barrier(group=group)


def _gathered(group, value) -> list:
    """Every rank's `value` in rank order (small things: hashes, a problem), through the checkpoint's group."""
    if group is None:
        return [value]
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, value, group=group)
    return every


def _files_of(folder: Path, rank: int, processes: int, names: list[str] | None = None) -> list[str]:
    """The files rank `rank` of `processes` hashes: those DCP names as written by a rank r (`__r_*.distcp`) go to rank
    r mod W, which wrote them (when saving, or resuming with as many processes: they are also what it reads); any
    other file, small, to rank 0."""
    if names is None:
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    owners = {name: int(m.group(1)) % processes if (m := WRITER.search(name)) else 0 for name in names}
    return [name for name in names if owners[name] == rank]


def _entry(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in sorted(root.glob(f"{PREFIX}*"), reverse=True)[keep:]:
        shutil.rmtree(old)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
