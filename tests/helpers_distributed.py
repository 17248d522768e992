"""Work done inside each of two gloo processes started by tests/test_distributed.py (spawned: importable here)."""

import grpo_image  # noqa: F401  first, as in conftest: torchvision's compatibility shim

import os

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from grpo_image.training.distributed import World
from grpo_image.core.types import ScoredBatch

LOOPBACK = "lo"  # gloo talks over the loopback interface: the test needs no network and no resolvable hostname
GROUP_SIZE = 3
# Two groups of three rollouts, one reward: group 0 on rank 0, group 1 on rank 1.
SCORES = np.array([[1.0], [2.0], [3.0], [0.0], [0.0], [3.0]], dtype=np.float32)  # [N=6, K=1]
ADVANTAGES_CFG = OmegaConf.create({
    "data": {"group_size": GROUP_SIZE}, "advantages": {"scale": "batch", "aggregation": "sum_then_normalize", "eps": 1e-6},
})


def join(rank: int, port: int) -> World:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    return World(rank, 2)


def collectives_on_rank(rank: int, port: int, out: str) -> None:
    """Advantages from this rank's scores only, and gradients averaged over ranks in several small buckets."""
    from grpo_image.training import distributed
    from grpo_image.training.train import rank_advantages

    world = join(rank, port)
    rows = world.rows(len(SCORES))
    mine = ScoredBatch(SCORES[rows], ["r"], np.zeros((0, 1, 1, 3), np.uint8), [])
    _, _, advantages, _ = rank_advantages(world, mine, [1.0], ADVANTAGES_CFG)
    distributed.BUCKET_ELEMENTS = 5  # parameters of 3, 4 and 2 values: buckets [3, 4] and [2]
    params = [torch.nn.Parameter(torch.zeros(size)) for size in (3, 4, 2)]
    for param in params:
        param.grad = (rank + 1) * torch.arange(float(param.numel()))  # rank 0: 0, 1, ...; rank 1: twice that
    distributed.average_replicated_gradients(world, params)
    torch.save({"advantages": advantages, "grads": [p.grad for p in params]}, f"{out}/rank{rank}.pt")
    dist.barrier()  # no rank tears the group down while a peer's last collective is in flight
    dist.destroy_process_group()


def sharded_policy_on_rank(rank: int, port: int, out: str) -> None:
    """Shard a tiny policy's layers with FSDP; record the shard sizes and the codes sampled with whole weights."""
    from torch.distributed.tensor import DTensor

    from grpo_image.training.fsdp import ShardedFullWeights
    from grpo_image.policies.tiny import tiny_policy
    from grpo_image.core.sampling import SamplingSettings, sample_codes

    world = join(rank, port)
    policy = tiny_policy(num_codes=16, grid=(2, 2), hidden_size=32, num_layers=2, seed=0)
    weights = ShardedFullWeights(policy, keep_reference=True, world=world)
    layer_params = [p for layer in weights.layers for p in layer.parameters()]
    shards = {
        "all_dtensor": all(isinstance(p, DTensor) for p in layer_params),
        "local": sum(p.to_local().numel() for p in layer_params),
        "whole": sum(p.numel() for p in layer_params),
    }
    with weights.rollout_weights():
        codes, logprobs = sample_codes(policy, ["red", "blue"], torch.tensor([3, 4]), SamplingSettings(cfg_scale=2.0))
    still_sharded = all(isinstance(p, DTensor) for p in layer_params)
    torch.save({**shards, "still_sharded": still_sharded, "codes": codes, "logprobs": logprobs}, f"{out}/rank{rank}.pt")
    dist.barrier()  # no rank tears the group down while a peer's last collective is in flight
    dist.destroy_process_group()


RECIPE_OVERRIDES = [  # the demo recipe at test size, as tests/test_distributed.py's SMALL, in-process rewards
    "data.prompts=prompts/tiny_colors.jsonl", "data.batch_size=4", "data.group_size=4", "train.minibatches=1",
    "policy.hidden_size=32", "policy.num_layers=2", "policy.grid=[2,2]", "sample_every=0",
]


def whole_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}


def replicas_on_rank(rank: int, port: int, out: str) -> None:
    """Each rank builds its policy from another seed; after start every replica must be rank 0's (LoRA, FSDP), and
    a bf16 FSDP run from a previous stage (`out`/stage, fp32 weights) must start from that stage's fp32 weights."""
    from grpo_image.base.config import load_recipe
    from grpo_image.training.train import build_trainer

    world = join(rank, port)
    result = {}
    stage = ["policy.dtype=bfloat16", f"train.init_from={out}/stage"]
    for mode, extra in (("lora", []), ("fsdp", ["train.fsdp=true"]), ("stage", ["train.fsdp=true", *stage])):
        cfg = load_recipe("recipes/tiny_cpu.yaml", [*RECIPE_OVERRIDES, f"policy.seed={rank}", *extra,
                                                    f"train.mode={'lora' if mode == 'lora' else 'full'}",
                                                    f"output_dir={out}/{mode}"])
        torch.manual_seed(100 + rank)  # LoRA's initialisation draws from the global RNG: make it differ too
        trainer = build_trainer(cfg, world)
        result[mode] = whole_parameters(trainer.policy.model)
        if mode != "lora":
            result[f"{mode} reference"] = whole_parameters(trainer.weights.reference_policy.model)
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.barrier()  # no rank tears the group down while a peer's last collective is in flight
    dist.destroy_process_group()


def bf16_fsdp_step_on_rank(rank: int, port: int, out: str) -> None:
    """One bf16 FSDP step at lr 1e-6: count the master-weight elements that have a gradient and those that moved."""
    from torch.distributed.tensor import DTensor

    from grpo_image.base.config import load_recipe
    from grpo_image.training.train import build_trainer, grpo_step

    world = join(rank, port)
    cfg = load_recipe("recipes/tiny_cpu.yaml", [*RECIPE_OVERRIDES, "policy.dtype=bfloat16", "train.mode=full",
                                                "train.fsdp=true", "train.lr=1e-6", f"output_dir={out}/run"])
    trainer = build_trainer(cfg, world)
    params = dict(trainer.policy.model.named_parameters())
    local = {name: (p.to_local() if isinstance(p, DTensor) else p) for name, p in params.items()}
    before = {name: value.detach().clone() for name, value in local.items()}
    metrics, _ = grpo_step(trainer, 1)
    with_grad = moved = 0
    for name, param in params.items():
        if param.grad is None:
            continue
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        stepped = grad != 0
        with_grad += int(stepped.sum())
        moved += int((stepped & (local[name].detach() != before[name])).sum())
    dtypes = sorted({str(value.dtype) for value in local.values()})
    torch.save({"with_grad": with_grad, "moved": moved, "dtypes": dtypes, "metrics": metrics}, f"{out}/rank{rank}.pt")
    dist.barrier()  # no rank tears the group down while a peer's last collective is in flight
    dist.destroy_process_group()


# Checkpoints at real size, rehearsed: a collective timeout turned down from NCCL's 10 minutes, a slow disk, a kill.
COLLECTIVE_TIMEOUT_S = 2  # the training process group's timeout in the slow-writer rehearsal
SLOW_FLUSH_S = 5  # rank 0's first flush to disk of a checkpoint takes this long: more than the timeout
SHARDED = ["train.mode=full", "train.fsdp=true", "keep_checkpoints=0", "logging.tensorboard=false"]


def train_in_group(rank: int, port: int, out: str, overrides: list[str], timeout_s: float | None = None) -> dict:
    """`grpo_image.training.train.train` on rank `rank` of 2, in a process group made here; with `timeout_s`, its
    collectives time out after that long from the first step on (building the trainer keeps the default, so that
    ranks that start unevenly on a loaded machine do not fail before the rehearsal begins)."""
    from datetime import timedelta

    from torch.distributed.distributed_c10d import _set_pg_timeout

    from grpo_image.base.config import load_recipe
    from grpo_image.training import train as train_module

    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)})
    os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if timeout_s is not None:
        build = train_module.build_trainer

        def build_then_shorten(*args, **kwargs):
            trainer = build(*args, **kwargs)
            _set_pg_timeout(timedelta(seconds=timeout_s))
            return trainer

        train_module.build_trainer = build_then_shorten
    cfg = load_recipe("recipes/tiny_cpu.yaml", [*RECIPE_OVERRIDES, *SHARDED, f"output_dir={out}/run", *overrides])
    return train_module.train(cfg)  # joins the group made above and leaves it at the end


def on_fsync(action) -> None:
    """Call action(path) before every flush to disk of this process (os.fsync), whoever flushes."""
    real = os.fsync

    def fsync(fd):
        action(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    os.fsync = fsync


def slow_writer_on_rank(rank: int, port: int, out: str) -> None:
    """Two FSDP steps, a checkpoint after each, under a 2 s collective timeout; rank 0's disk takes 5 s to flush the
    first file of each checkpoint (a slow or shared filesystem at real size)."""
    import time

    slowed = []
    if rank == 0:
        def slow_first_flush(path: str) -> None:
            step = path.split(".tmp-step_")[-1][:6] if ".tmp-step_" in path else None
            if step is not None and step not in slowed:
                slowed.append(step)
                time.sleep(SLOW_FLUSH_S)

        on_fsync(slow_first_flush)
    summary = train_in_group(rank, port, out, ["steps=2", "save_every=1"], timeout_s=COLLECTIVE_TIMEOUT_S)
    torch.save({"slowed": slowed, "summary": summary}, f"{out}/rank{rank}.pt")


def killed_while_writing_on_rank(rank: int, port: int, out: str) -> None:
    """Three FSDP steps, a checkpoint after each; rank 0 is killed (SIGKILL) while it writes step 2's."""
    import signal

    if rank == 0:
        def kill_in_step_2(path: str) -> None:
            if ".tmp-step_000002" in path:
                os.kill(os.getpid(), signal.SIGKILL)

        on_fsync(kill_in_step_2)
    train_in_group(rank, port, out, ["steps=3", "save_every=1"])


def resident_peak_kib() -> int:
    """This process's peak resident memory since the last `reset_resident_peak` (Linux VmHWM)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def reset_resident_peak() -> int:
    """Start a new peak-resident-memory measurement (Linux: clear_refs 5); returns the resident KiB now."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return resident_peak_kib()


# Layers hold 97% of the weights, as in a 7B model, in tensors of megabytes: torch.load's constant look-ahead of about
# 34 KB past each saved tensor (its zip reader) stays a small part of what a rank reads, as it is at real size.
RESUME_MODEL = ["policy.hidden_size=1024", "policy.num_layers=2"]


def resume_reads_on_rank(rank: int, port: int, out: str) -> None:
    """Save an FSDP checkpoint after one step, then resume from it: what each rank reads and its resident peak while
    the checkpoint is verified and loaded."""
    import gc

    import psutil

    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from grpo_image.base.config import load_recipe
    from grpo_image.training import train as train_module
    from grpo_image.training.stops import StepStart, save_step

    world = join(rank, port)
    run = f"{out}/run"
    cfg = load_recipe("recipes/tiny_cpu.yaml", [*RECIPE_OVERRIDES, *SHARDED, *RESUME_MODEL, f"output_dir={run}"])
    trainer = train_module.build_trainer(cfg, world)
    train_module.grpo_step(trainer, 1)
    save_step(trainer, run, 1, StepStart(torch.get_rng_state(), None))
    del trainer
    gc.collect()
    process, measured = psutil.Process(), {}

    def measure(name, function):
        def measured_call(*args, **kwargs):
            if name == "load":  # AdamW's moments: on a GPU the device's memory; here the host's, made and touched
                _, weights, optimizer, _ = args[:4]  # before measuring, so that only what passes through counts
                for state in get_optimizer_state_dict(weights.policy.model, optimizer)["state"].values():
                    for tensor in state.values():
                        tensor.fill_(0)
            resident, chars = reset_resident_peak(), process.io_counters().read_chars
            result = function(*args, **kwargs)
            measured[name] = {"read": process.io_counters().read_chars - chars,
                              "peak_growth": 1024 * (resident_peak_kib() - resident)}
            return result

        return measured_call

    train_module.find_checkpoint = measure("verify", train_module.find_checkpoint)
    train_module.load_checkpoint = measure("load", train_module.load_checkpoint)
    cfg.resume = run
    train_module.build_trainer(cfg, world)
    torch.save(measured, f"{out}/rank{rank}.pt")
    dist.barrier()  # no rank tears the group down while a peer's last collective is in flight
    dist.destroy_process_group()
