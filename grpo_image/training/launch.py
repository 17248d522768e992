"""`grpo-image launch`: a run on one node, its GPUs split between the training processes and the reward workers.

A training process that starts Ray itself hands it every GPU it sees, and Ray puts a reward worker on the lowest
free GPU: with 8 processes, 8 Rays each put their worker on GPU 0, beside rank 0's policy. `launch` decides the
placement once, from the recipe's `hardware:` and `workers:` sections:

1. the visible GPUs: CUDA_VISIBLE_DEVICES, else every device CUDA counts;
2. the first `hardware.gpus` of them train, one process each; the next ones hold the reward workers: each training
   process starts `workers.num_workers` actors of `workers.num_gpus` GPUs (fractions share a GPU: 0.5 puts two on
   one); a recipe that does not fit is refused in one line before anything starts;
3. a Ray head of this launch only (a free port, a temp dir and an authentication token of its own) sees the reward
   GPUs alone, and as many CPUs as the workers reserve;
4. torchrun starts the training processes on the training GPUs, each pointed at that head (`workers.ray_address`);
5. the exit code is torchrun's, and the head is stopped whatever happens: a failed step, Ctrl-C, SIGTERM; if the
   launcher itself is killed, the kernel sends SIGTERM to the head and to torchrun (Linux).
"""

from __future__ import annotations

import ctypes
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from grpo_image.base.config import RecipeError, load_recipe
from grpo_image.training.preflight import preflight

HEAD_START_S = 180.0  # a Ray head starts in seconds; allow minutes on a busy node
GRACE_S = 60.0  # time the head and the training processes get to exit after SIGTERM, before SIGKILL
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a child gets when its parent dies


class LaunchFailed(Exception):
    """The node could not run the launch (the Ray head did not start): not a fault of the recipe."""


@dataclass(frozen=True)
class Placement:
    """Which of the node's GPUs (as CUDA names them) each part of the run gets."""

    training: list[str]  # one per training process, in rank order
    rewards: list[str]  # the Ray head's GPUs
    idle: list[str]  # visible, used by neither
    actors: int  # reward workers in all: training processes x workers.num_workers

    def describe(self, cfg: DictConfig) -> str:
        w = cfg.workers
        line = f"training on GPUs {','.join(self.training)} ({len(self.training)} processes, hardware.gpus)"
        if w.backend == "ray":
            where = f"GPUs {','.join(self.rewards)}" if self.rewards else "no GPU"
            line += (f"; {self.actors} reward workers on {where} ({len(self.training)} processes x workers.num_workers "
                     f"{w.num_workers} x workers.num_gpus {w.num_gpus:g})")
        return line + (f"; idle: {','.join(self.idle)}" if self.idle else "")


def visible_gpus(environ=os.environ) -> list[str]:
    """The node's GPUs as CUDA names them: the entries of CUDA_VISIBLE_DEVICES (indices, UUIDs or MIG names), else
    the indices of every device CUDA counts."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [name.strip() for name in environ["CUDA_VISIBLE_DEVICES"].split(",") if name.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def reward_gpus(cfg: DictConfig) -> tuple[int, int]:
    """(reward workers in all, GPUs they need): every training process starts its own `workers.num_workers` actors,
    and Ray packs whole actors onto a GPU (0.3 GPU each: three to a GPU, never 3.33)."""
    w, processes = cfg.workers, cfg.hardware.gpus
    if w.backend != "ray":
        return 0, 0
    actors = processes * w.num_workers
    if w.num_gpus == 0:
        return actors, 0
    if w.num_gpus < 1:
        per_gpu = math.floor(1 / w.num_gpus + 1e-9)  # the epsilon absorbs the rounding of 1 / num_gpus (1 / (1/3))
        return actors, math.ceil(actors / per_gpu)
    if w.num_gpus != int(w.num_gpus):
        raise RecipeError(f"'workers.num_gpus' above 1 must be a whole number of GPUs (Ray's rule), got {w.num_gpus:g}")
    return actors, actors * int(w.num_gpus)


def plan_placement(cfg: DictConfig, visible: list[str]) -> Placement:
    """The first hardware.gpus visible GPUs train, the next ones hold the reward workers; refused if they do not fit."""
    processes = cfg.hardware.gpus
    if processes < 1:
        raise RecipeError("'hardware.gpus' is 0: launch starts one training process per GPU it names (e.g. hardware.gpus=8)")
    actors, needed = reward_gpus(cfg)
    if processes + needed > len(visible):
        w = cfg.workers
        raise RecipeError(
            f"the recipe needs {processes + needed} GPUs on this node, {processes} training (hardware.gpus) and {needed} "
            f"for its {actors} reward workers ({processes} processes x workers.num_workers {w.num_workers} x "
            f"workers.num_gpus {w.num_gpus:g}), but {len(visible)} are visible ({','.join(visible) or 'none'}); lower hardware.gpus, workers.num_workers or workers.num_gpus, or give the "
            f"reward workers a node of their own (README: Several GPUs and nodes)"
        )
    return Placement(visible[:processes], visible[processes:processes + needed], visible[processes + needed:], actors)


def launch(recipe: str, overrides: list[str]) -> int:
    """Place, check, start the Ray head and the training processes; the training processes' exit code."""
    cfg = load_recipe(recipe, overrides)
    if cfg.workers.ray_address:
        raise RecipeError(
            f"'workers.ray_address' is set ({cfg.workers.ray_address}): launch starts a Ray of its own on this node's "
            f"reward GPUs; drop the key, or start the training processes yourself (README: Several GPUs and nodes)"
        )
    placement = plan_placement(cfg, visible_gpus())
    uses_ray = cfg.workers.backend == "ray"
    port = free_port() if uses_ray else None
    run_overrides = [*overrides, f"workers.ray_address=127.0.0.1:{port}"] if uses_ray else list(overrides)
    preflight(load_recipe(recipe, run_overrides), processes=len(placement.training))
    reserved_cpus = math.ceil(placement.actors * cfg.workers.num_cpus)
    print(f"grpo-image launch: {placement.describe(cfg)}", file=sys.stderr, flush=True)
    with _sigterm_as_exit():
        if not uses_ray:
            return run_training(recipe, run_overrides, placement.training, reserved_cpus=0, ray_env={})
        # the head and its drivers (the training processes) share a token of this launch: an explicit address never
        # picks up a token by itself, and no other Ray user of the node can join the head
        ray_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        head = RayHead(placement.rewards, num_cpus=reserved_cpus, port=port, ray_env=ray_env)
        try:
            head.start()
            return run_training(recipe, run_overrides, placement.training, reserved_cpus=reserved_cpus, ray_env=ray_env)
        finally:
            head.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RayHead:
    """A Ray head of this launch only: its own port and temp dir, the reward GPUs alone visible to it.

    `ray start --block` runs in a session of its own (Ctrl-C at the terminal reaches the training processes, and the
    head is stopped after them); on SIGTERM it stops every Ray process it started.
    """

    def __init__(self, gpus: list[str], num_cpus: int, port: int, ray_env: dict[str, str]) -> None:
        self.gpus, self.num_cpus, self.port, self.ray_env = gpus, num_cpus, port, ray_env
        self.process: subprocess.Popen | None = None
        self.temp_dir = Path(tempfile.mkdtemp(prefix="grpo-ray-", dir="/tmp"))  # short: Ray's socket paths are bounded

    def start(self) -> None:
        env = {**os.environ, **self.ray_env, "CUDA_VISIBLE_DEVICES": ",".join(self.gpus),
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stop at once on SIGTERM: there is nothing to drain
        env.pop("RAY_ADDRESS", None)
        command = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={self.port}",
            f"--num-gpus={len(self.gpus)}", f"--num-cpus={self.num_cpus}", f"--temp-dir={self.temp_dir}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            "--include-dashboard=false", "--disable-usage-stats",
        ]
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        print(f"grpo-image launch: Ray head at 127.0.0.1:{self.port} on GPUs {','.join(self.gpus) or 'none'}, "
              f"{self.num_cpus} CPUs (log: {self.log_path})", file=sys.stderr, flush=True)
        deadline = time.monotonic() + HEAD_START_S
        while not (self.temp_dir / "ray_current_cluster").exists():  # written once the head's node is up
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise LaunchFailed(f"the Ray head did not start within {HEAD_START_S:g} s; its log: {self.log_path}")
            time.sleep(0.2)

    @property
    def log_path(self) -> Path:
        return self.temp_dir / "head.log"

    def stop(self) -> None:
        """SIGTERM (the head stops its Ray processes), SIGKILL to its session after the grace; its temp dir goes."""
        if self.process is not None:
            _stop(self.process, signal.SIGTERM)
            _kill_session(self.process.pid)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def run_training(recipe: str, overrides: list[str], gpus: list[str], reserved_cpus: int, ray_env: dict[str, str]) -> int:
    """torchrun, one process per training GPU, none of the reward GPUs visible to it; its exit code."""
    env = {**os.environ, **ray_env, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    env.pop("RAY_ADDRESS", None)
    if "OMP_NUM_THREADS" not in env:  # the CPUs the reward workers do not reserve, shared by the training processes
        env["OMP_NUM_THREADS"] = str(max(1, ((os.cpu_count() or 1) - reserved_cpus) // len(gpus)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={len(gpus)}",
               "-m", "grpo_image", "train", recipe, *overrides]
    process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
    try:
        return process.wait()
    except BaseException:  # Ctrl-C, SIGTERM: torchrun stops its processes on SIGTERM
        _stop(process, signal.SIGTERM)
        raise


def _stop(process: subprocess.Popen, signum: int) -> None:
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _kill_session(leader: int) -> None:
    """SIGKILL whatever is left of the session `leader` started (its id is the leader's pid: only its own processes)."""
    try:
        os.killpg(leader, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:
    """In a child before it runs: SIGTERM when the launcher dies, even by SIGKILL (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextmanager
def _sigterm_as_exit():
    """SIGTERM to the launcher unwinds like Ctrl-C, so that the head and torchrun are stopped on the way out."""
    def leave(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
