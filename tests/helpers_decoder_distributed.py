"""Work done inside each of two gloo processes started by tests/test_decoder_distributed.py (spawned: importable
here): decoder GRPO (train.target decoder | both) trained by `train()` on rank `rank` of 2, with what each rank holds
recorded along the way."""

import grpo_image  # noqa: F401  first, as in conftest: torchvision's compatibility shim

import os

import torch
import torch.distributed as dist

from tests.helpers_distributed import LOOPBACK


def resident_kib() -> int:
    """This process's resident memory now (Linux VmRSS)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _join_and_load(rank: int, port: int, recipe: str, overrides: list[str]):
    """The process group `train()` joins (as a launcher would leave it), and the recipe. One thread: as the
    single-process runs the results are compared with, which run in a test module on one thread."""
    from grpo_image.base.config import load_recipe

    torch.set_num_threads(1)
    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)})
    os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    return load_recipe(recipe, overrides)


def adapters_each_step_on_rank(rank: int, port: int, out: str, recipe: str, overrides: list[str]) -> None:
    """`train()` on this rank; the decoder's adapters as this rank holds them after each step go to rank{rank}.pt."""
    from grpo_image.decoders.flow_lora import adapter_state
    from grpo_image.training import train as train_module

    cfg = _join_and_load(rank, port, recipe, overrides)
    step_function, adapters = train_module.grpo_step, []

    def recorded_step(trainer, step):
        result = step_function(trainer, step)
        adapters.append({name: value.detach().clone()
                         for name, value in adapter_state(trainer.decoder.flow.transformer).items()})
        return result

    train_module.grpo_step = recorded_step
    train_module.train(cfg)  # joins the group made above and leaves it at the end
    torch.save({"adapters": adapters}, f"{out}/rank{rank}.pt")


def trimmed_resident_kib() -> int:
    """Resident KiB once the C allocator has returned its free pages to the system (glibc's malloc_trim): what is
    still in use, without the freed memory an allocator keeps for reuse (on a GPU, torch's caching allocator keeps
    it too, and its allocated bytes are what a leak grows)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return resident_kib()


def tensor_bytes(value, seen: set[int] | None = None) -> int:
    """Bytes of the tensors and arrays `value` holds (through lists, dataclasses and plain objects' attributes), each
    storage once; modules are not followed (the decoder's weights belong to the run, not to a step)."""
    import dataclasses

    import numpy as np

    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(value, np.ndarray):
        return 0 if id(value) in seen or seen.add(id(value)) else value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item, seen) for item in value)
    if isinstance(value, torch.nn.Module) or id(value) in seen:
        return 0
    seen.add(id(value))
    if dataclasses.is_dataclass(value):
        return sum(tensor_bytes(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    if hasattr(value, "__dict__"):
        return sum(tensor_bytes(item, seen) for item in vars(value).values())
    return 0


def memory_on_rank(rank: int, port: int, out: str, recipe: str, overrides: list[str], keep: bool = False) -> None:
    """`train()` on this rank; this rank's resident KiB after each phase of every step (the decoder's rollout, the
    policy's update, the decoder's update, the step's end) and the bytes of what a step decodes (its images, windows
    and conditioning), to rank{rank}.pt. `keep`: the step's images and decoder batches are kept past the step (a
    trainer that forgot to release them), to show the measurement sees such a leak."""
    from grpo_image.training import train as train_module

    cfg = _join_and_load(rank, port, recipe, overrides)
    phases: dict[str, list[int]] = {}
    step_bytes: list[dict[str, int]] = []
    kept: list = []

    def after(name: str, function):
        def measured(*args, **kwargs):
            result = function(*args, **kwargs)
            phases.setdefault(name, []).append(trimmed_resident_kib())
            return result

        return measured

    build = train_module.build_trainer

    def build_and_measure(*args, **kwargs):
        trainer = build(*args, **kwargs)
        decoder = trainer.decoder
        rollout = decoder.rollout

        def rollout_and_count(*args, **kwargs):
            images, chunks = rollout(*args, **kwargs)
            step_bytes.append({"images": images.nbytes,
                               "windows": tensor_bytes([c.window for c in chunks]),
                               "conditioning": tensor_bytes([c.velocity for c in chunks])})
            if keep:
                kept.append((images, chunks))
            return images, chunks

        decoder.rollout = after("decode", rollout_and_count)
        decoder.update = after("decoder_update", decoder.update)
        return trainer

    train_module.build_trainer = build_and_measure
    train_module.update_policy = after("update", train_module.update_policy)
    train_module.grpo_step = after("step", train_module.grpo_step)
    train_module.train(cfg)
    torch.save({"phases": phases, "step_bytes": step_bytes}, f"{out}/rank{rank}.pt")
