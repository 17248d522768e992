"""Work done inside each of two gloo processes started by tests/test_distributed.py (spawned: importable here)."""

import grpo_image  # noqa: F401  first, as in conftest: torchvision's compatibility shim

import os

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from grpo_image.distributed import World
from grpo_image.types import ScoredBatch

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
    from grpo_image import distributed
    from grpo_image.train import rank_advantages

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
    dist.destroy_process_group()


def sharded_policy_on_rank(rank: int, port: int, out: str) -> None:
    """Shard a tiny policy's layers with FSDP; record the shard sizes and the codes sampled with whole weights."""
    from torch.distributed.tensor import DTensor

    from grpo_image.fsdp import ShardedFullWeights
    from grpo_image.policies.tiny import tiny_policy
    from grpo_image.sampling import SamplingSettings, sample_codes

    world = join(rank, port)
    policy = tiny_policy(num_codes=16, grid=(2, 2), hidden_size=32, num_layers=2, seed=0)
    weights = ShardedFullWeights(policy, keep_reference=True)
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
    dist.destroy_process_group()
