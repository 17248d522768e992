"""Atomic checkpoints: a run resumes from its newest complete checkpoint as if it had never stopped.

A checkpoint is written into a hidden temporary folder, every file flushed to disk, a manifest of sizes and
SHA-256 hashes written last, and only then renamed to `checkpoints/step_XXXXXX`: a crash leaves either a complete
checkpoint or a temporary folder that is ignored. On resume the newest checkpoint whose manifest matches its files
is used; a corrupt or partial one is skipped with a warning. Everything random in a step derives from (seed, step),
so the state to restore is the weights, the optimizer, the scheduler, the step and torch's global RNG.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
PREFIX = "step_"
PREFETCH = "prefetched_rollout.safetensors"


class CheckpointError(ValueError):
    """A resume path that holds no usable checkpoint."""


def save_checkpoint(
    run_dir: Path, step: int, weights, optimizer, scheduler, config: DictConfig, keep: int,
    prefetched: dict[str, torch.Tensor] | None = None, writer: bool = True, rng_state: torch.Tensor | None = None,
    loop_state: dict | None = None,
) -> Path:
    """Write the checkpoint of `step` atomically and keep only the newest `keep` (0: all).

    `prefetched` holds rollouts already sampled for the next step (workers.prefetch): they were drawn from the
    weights before this step's update, which the checkpoint no longer has, so they are saved to resume exactly.
    With several processes every rank calls this (sharded weights are gathered) and only the `writer` writes.
    `rng_state`: torch's RNG as it was after `step` (default: as it is now); `loop_state`: what else the loop
    remembers across steps (JSON: the health checks' streaks), restored by `load_checkpoint`.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    optimizer_state = weights.optimizer_state(optimizer)  # gathered from every rank when sharded
    if not writer:
        weights.save(None)
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights.save(tmp / "policy")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state() if rng_state is None else rng_state}, tmp / "rng.pt")
    if prefetched is not None:
        save_file({key: value.contiguous() for key, value in prefetched.items()}, str(tmp / PREFETCH))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "loop": loop_state or {}}))
    (tmp / "config.yaml").write_text(OmegaConf.to_yaml(config))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for path in files:
        _fsync(path)
    manifest = {
        "step": step,
        "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / MANIFEST)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(root, keep)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder itself, or the newest complete checkpoint of a run folder."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"{path}: not a usable checkpoint: {problem}")
        return path
    candidates = sorted((path / CHECKPOINTS).glob(f"{PREFIX}*"), reverse=True)
    for candidate in candidates:
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        warnings.warn(f"skipping checkpoint {candidate}: {problem}", stacklevel=2)
    raise CheckpointError(f"{path}: no complete checkpoint found (neither a checkpoint nor a run folder holding one)")


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file the manifest lists is present with its size and hash, else what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return f"manifest unreadable ({err})"
    for name, expected in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            return f"{name} does not match its manifest entry"
    return None


def load_checkpoint(folder: Path, weights, optimizer, scheduler) -> tuple[int, dict[str, torch.Tensor] | None, dict]:
    """Restore weights, optimizer, scheduler and RNG in place.

    Returns the step the checkpoint was taken after, the prefetched rollout tensors (if it holds any) and the loop's
    own state.
    """
    weights.load(folder / "policy")
    weights.load_optimizer_state(optimizer, torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(folder / "rng.pt", weights_only=True)["torch"])
    state = json.loads((folder / "trainer_state.json").read_text())
    prefetched = load_file(folder / PREFETCH) if (folder / PREFETCH).is_file() else None
    return int(state["step"]), prefetched, state.get("loop", {})


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in sorted(root.glob(f"{PREFIX}*"), reverse=True)[keep:]:
        shutil.rmtree(old)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
