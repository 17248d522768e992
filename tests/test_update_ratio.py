"""`train/update_ratio`: how far a step moved the trained weights, for full weights and for LoRA's effective weight.

Hand-derived values on a 2 x 2 layer; then the metric of a real GRPO step on the tiny policy against the
brute-force computation (every adapted layer's W + s B A materialised before and after, in float64); then two gloo
processes, FSDP-sharded and replicated, against the whole tensors.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from grpo_image.base.config import load_recipe
from grpo_image.training.distributed import World
from grpo_image.training.train import build_trainer, grpo_step
from grpo_image.training.update_ratio import UpdateRatio

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SMALL = [  # the colour demo at test size: N = 2 * 4 rollouts of 2 x 2 codes, a 1-layer model, in-process rewards
    f"data.prompts={REPO / 'prompts' / 'tiny_colors.jsonl'}", "data.batch_size=2", "data.group_size=4",
    "policy.hidden_size=32", "policy.num_layers=1", "policy.grid=[2,2]", "sample_every=0",
    "logging.tensorboard=false",
]

# Both sides compute in float64 from the same fp32 numbers: they differ by float64 rounding over a few thousand
# terms (about 1e-13 relative); 1e-9 leaves room and still catches any wrong term (a missing cross term or scaling
# changes the result by far more than 1e-3).
RTOL = 1e-9


def layer_2x2(lora: bool) -> nn.Module:
    """A bias-free 2 x 2 linear layer with weight diag(3, 4) (norm 5), as full weights or under a rank-1 LoRA of
    alpha 2 (scaling s = alpha / r = 2)."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=1, lora_alpha=2, target_modules=["0"]))


def set_factors(model: nn.Module, a: list[float], b: list[float]) -> None:
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor([a]))  # [r=1, in=2]
        layer.lora_B["default"].weight.copy_(torch.tensor(b).reshape(2, 1))  # [out=2, r=1]


def test_full_weights_ratio_is_the_update_norm_over_the_weight_norm():
    model = layer_2x2(lora=False)
    moved = UpdateRatio(model)
    with torch.no_grad():
        model[0].weight += torch.tensor([[0.0, 0.375], [0.5, 0.0]])  # binary fractions: exact in fp32
    # ||update|| = sqrt(0.375^2 + 0.5^2) = 0.625, ||W|| = sqrt(3^2 + 4^2) = 5
    assert moved.ratio() == pytest.approx(0.125, rel=RTOL)


def test_lora_ratio_is_the_change_of_the_effective_weight_over_the_base_weight():
    model = layer_2x2(lora=True)
    set_factors(model, a=[1.0, 0.0], b=[0.0, 0.0])  # B = 0 as peft starts it: the effective weight is W
    moved = UpdateRatio(model)
    set_factors(model, a=[1.0, 0.0], b=[0.125, 0.25])
    # s B'A' - s BA = 2 [[0.125, 0], [0.25, 0]]: norm 2 sqrt(0.078125); the base weight's norm is 5
    assert moved.ratio() == pytest.approx(2 * math.sqrt(0.078125) / 5, rel=RTOL)

    set_factors(model, a=[1.0, 0.0], b=[1.0, 0.0])
    moved = UpdateRatio(model)
    set_factors(model, a=[1.0, 1.0], b=[1.0, 1.0])  # both factors move: the cross term counts
    # BA = [[1, 0], [0, 0]] -> B'A' = [[1, 1], [1, 1]]: the change [[0, 1], [1, 1]] has norm sqrt(3), times s = 2
    assert moved.ratio() == pytest.approx(2 * math.sqrt(3) / 5, rel=RTOL)


def test_a_factorisation_that_changes_but_keeps_the_product_moves_nothing():
    model = layer_2x2(lora=True)
    set_factors(model, a=[1.0, 2.0], b=[0.5, 0.25])
    moved = UpdateRatio(model)
    set_factors(model, a=[2.0, 4.0], b=[0.25, 0.125])  # B/2 times 2A: the same product, adapters moved by far
    assert moved.ratio() == pytest.approx(0.0, abs=1e-12)  # float64 rounding of terms of size 1 cancelling


def brute_force_ratio(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], scaling: float | None) -> float:
    """The ratio from whole state dicts, every effective weight materialised in float64.

    Full weights (`scaling` None): every tensor in `before` is trained. LoRA: each `...lora_A.default.weight`
    names a layer whose effective weight is base + scaling * B @ A.
    """
    if scaling is None:
        update = sum(float((after[k].double() - before[k].double()).square().sum()) for k in before)
        return math.sqrt(update / sum(float(v.double().square().sum()) for v in before.values()))
    update = weights = 0.0
    for key in before:
        if not key.endswith("lora_A.default.weight"):
            continue
        prefix = key.removesuffix("lora_A.default.weight")
        base = before[prefix + "base_layer.weight"].double()  # [out, in]

        def effective(state):
            return base + scaling * state[prefix + "lora_B.default.weight"].double() @ state[key].double()

        update += float((effective(after) - effective(before)).square().sum())
        weights += float(base.square().sum())
    return math.sqrt(update / weights)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_metric_of_a_grpo_step_equals_the_materialised_computation(mode, tmp_path):
    cfg = load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [*SMALL, f"output_dir={tmp_path}", f"train.mode={mode}", "train.minibatches=2",
                               "train.lr=1e-2", "train.lora.r=4", "train.lora.alpha=8"])
    trainer = build_trainer(cfg)
    model = trainer.policy.model
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    keep = (lambda name: name in trained) if mode == "full" else (lambda name: "lora_" in name or "base_layer" in name)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if keep(name)}
    metrics, _ = grpo_step(trainer, 1)
    after = {name: p.detach().clone() for name, p in model.named_parameters() if keep(name)}
    expected = brute_force_ratio(before, after, 8 / 4 if mode == "lora" else None)
    assert expected > 1e-4  # two AdamW steps of lr 1e-2 moved the weights
    assert metrics["train/update_ratio"] == pytest.approx(expected, rel=RTOL)


# ---------------------------------------------------------------- two processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def whole(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters() if p.requires_grad or "base_layer" in name}


def move_every_trained_tensor(model: nn.Module, rank: int) -> None:
    """A known change: replicated parameters alike on both ranks (as after an averaged update), each shard its own."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for index, param in enumerate(p for p in model.parameters() if p.requires_grad):
            sharded = isinstance(param, DTensor)
            local = param.to_local() if sharded else param
            draw = torch.Generator().manual_seed(1000 * index + (rank if sharded else 0))
            local += 0.01 * torch.randn(local.shape, generator=draw)


def ratios_on_rank(rank: int, port: int, out: str) -> None:
    """For FSDP full weights and for replicated LoRA adapters: the metric on this rank and the brute-force value."""
    from grpo_image.policies.tiny import tiny_policy
    from grpo_image.training.fsdp import ShardedFullWeights
    from grpo_image.training.weights import LoraWeights

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    world = World(rank, 2)
    result = {}
    for mode in ("fsdp", "lora"):
        torch.manual_seed(0)  # LoRA's A draws from the global RNG: replicas start alike, as after build_trainer
        policy = tiny_policy(num_codes=16, grid=(2, 2), hidden_size=32, num_layers=2, seed=0)
        if mode == "fsdp":
            ShardedFullWeights(policy, keep_reference=False, world=world)
        else:
            LoraWeights(policy, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
        before = whole(policy.model)
        moved = UpdateRatio(policy.model, world)
        move_every_trained_tensor(policy.model, rank)
        result[mode] = {"ratio": moved.ratio(), "copies": len(moved.full) + len(moved.adapted),
                        "expected": brute_force_ratio(before, whole(policy.model), 2.0 if mode == "lora" else None)}
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.barrier()  # no rank tears the group down while a peer's last collective is in flight
    dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_across_processes_the_ratio_is_global_and_replicas_count_once(tmp_path):
    mp.start_processes(ratios_on_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for mode in ("fsdp", "lora"):
        for rank in ranks:
            assert rank[mode]["ratio"] == pytest.approx(rank[mode]["expected"], rel=RTOL), mode
        assert ranks[1][mode]["ratio"] == ranks[0][mode]["ratio"]  # one all-reduce: the same number everywhere
    # replicated tensors are copied and counted once, every other one on each rank: 2 layers x (q, v) adapters give
    # 4 (A, B) pairs, 2 on each rank; FSDP: every rank its shards and half the replicated parameters
    assert ranks[0]["lora"]["copies"] == ranks[1]["lora"]["copies"] == 2
    assert abs(ranks[0]["fsdp"]["copies"] - ranks[1]["fsdp"]["copies"]) <= 1
