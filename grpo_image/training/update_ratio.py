"""How far one training step moved the policy: `train/update_ratio`, the update's norm over the weights' norm.

Adam's steps are about `lr` per element whatever the gradient's scale, so this is the figure that says whether a
learning rate is large enough for the weights it trains: the loss and the gradient norm look the same at lr 1e-6 and
1e-5, the update ratio differs tenfold.

- Full weights: ||theta' - theta|| / ||theta|| over every trained parameter (the step's update, all of its
  minibatches and inner epochs together, over the weights before it).
- LoRA: what moves is the effective weight W + s B A of each adapted layer (s = alpha / r), so the ratio is
  ||s (B'A' - BA)|| / ||W|| summed over the adapted layers. The adapters' own norm says nothing (B starts at 0, A is
  random). B'A' - BA = dB A' + B dA (dB = B' - B, dA = A' - A), so its squared Frobenius norm is
  tr((dB^T dB)(A' A'^T)) + 2 tr((dB^T B)(dA A'^T)) + tr((B^T B)(dA dA^T)): r x r products only, never the
  [out, in] matrices. Every term is of the size of the change, unlike the expansion
  ||B'A'||^2 - 2<B'A', BA> + ||BA||^2, whose terms are of the size of BA and cancel once the adapter has grown; and
  it is computed in float64.
  Trainable parameters outside peft's LoRA layers (none in the shipped recipes) count as full weights.

With several processes each rank adds up the parameters it holds: its shards of FSDP's sharded parameters, and
every W-th of the replicated ones (equal on every rank, so each is counted once, and the copies below are spread
evenly over the ranks rather than piled on one); one all-reduce sums the squares, so every rank gets the global
ratio. The weights before the step are copied to host memory (this rank's share of the trained parameters: adapters,
or its fp32 master shards and its W-th of the replicated ones) and compared a chunk at a time on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from grpo_image.training.distributed import World

CHUNK_ELEMENTS = 1 << 24  # elements compared at once on the device: bounds the temporaries (128 MB in float64)


@dataclass
class _Adapted:
    """One LoRA-adapted layer: its factors (trained) and the host copy of them from before the step."""

    lora_a: nn.Parameter  # [r, in]
    lora_b: nn.Parameter  # [out, r]
    scaling: float
    base: torch.Tensor  # the frozen weight W the adapter adds s B A to
    a_before: torch.Tensor  # [r, in] on the host
    b_before: torch.Tensor  # [out, r] on the host


class UpdateRatio:
    """Snapshot the trained weights before a step's updates (`UpdateRatio(model, world)`); `ratio()` after them."""

    def __init__(self, model: nn.Module, world: World = World()):
        self.world = world
        layers = _lora_layers(model)
        in_adapters = {id(p) for a, b, _, _ in layers for p in (a, b)}
        self.adapted = [_Adapted(a, b, s, base, _host_copy(a), _host_copy(b)) for index, (a, b, s, base)
                        in enumerate(layers) if self._counts(index)]
        replicated = [p for p in model.parameters() if p.requires_grad and id(p) not in in_adapters
                      and not _is_sharded(p)]
        sharded = [p for p in model.parameters() if p.requires_grad and _is_sharded(p)]
        self.full = [(p, _host_copy(_local(p))) for p in sharded] + [
            (p, _host_copy(p)) for index, p in enumerate(replicated) if self._counts(index)]

    def _counts(self, index: int) -> bool:
        """Whether this rank counts the index-th replicated tensor: every rank holds it alike, so one counts it."""
        return not self.world.distributed or index % self.world.size == self.world.rank

    def ratio(self) -> float:
        """||update|| / ||weights before it||, over every rank's parameters; the same value on every rank."""
        device = self.world.device
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # [squared update, squared weights]
        for param, before in self.full:
            change, size = _squared_change(_local(param).detach(), before)
            sums += torch.stack([change, size]).to(device)
        for layer in self.adapted:
            sums += torch.stack([_squared_lora_change(layer), _squared_norm(layer.base)]).to(device)
        if self.world.distributed:
            dist.all_reduce(self.world.collective_tensor(sums))
        update, weights = sums.tolist()
        return (update / weights) ** 0.5 if weights > 0 else 0.0


def _lora_layers(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter, float, torch.Tensor]]:
    """(A [r, in], B [out, r], scaling, base weight) of every trained adapter of peft's LoRA layers in `model`."""
    from peft.tuners.lora import LoraLayer

    found = []
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.lora_A:
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            if a.requires_grad or b.requires_grad:
                found.append((a, b, float(module.scaling[name]), module.get_base_layer().weight))
    return found


def _is_sharded(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: its shard when FSDP shards it, else the whole tensor."""
    return param.to_local() if _is_sharded(param) else param


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def _squared_change(now: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||now - before||^2, ||before||^2) in float64, a chunk at a time on `now`'s device."""
    change = torch.zeros((), dtype=torch.float64, device=now.device)
    size = torch.zeros((), dtype=torch.float64, device=now.device)
    for current, old in zip(now.reshape(-1).split(CHUNK_ELEMENTS), before.reshape(-1).split(CHUNK_ELEMENTS)):
        old = old.to(now.device, torch.float64)
        change += (current.double() - old).square().sum()
        size += old.square().sum()
    return change, size


def _squared_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||^2 in float64, a chunk at a time (the base weight is bf16 in the real recipes)."""
    return sum((chunk.double().square().sum() for chunk in weight.detach().reshape(-1).split(CHUNK_ELEMENTS)),
               torch.zeros((), dtype=torch.float64, device=weight.device))


def _squared_lora_change(layer: _Adapted) -> torch.Tensor:
    """||s (B'A' - BA)||_F^2 from r x r products (see the module docstring), in float64."""
    device = layer.lora_b.device
    b_old = layer.b_before.to(device, torch.float64).reshape(layer.b_before.shape[0], -1)  # [out, r]
    a_new = layer.lora_a.detach().double().reshape(b_old.shape[1], -1)  # [r, in]
    d_b = layer.lora_b.detach().double().reshape(b_old.shape) - b_old  # [out, r]
    d_a = a_new - layer.a_before.to(device, torch.float64).reshape(a_new.shape)  # [r, in]
    a_gram, cross, d_a_gram = a_new @ a_new.mT, d_a @ a_new.mT, d_a @ d_a.mT  # [r, r] each
    squared = _trace_of_product(d_b.mT @ d_b, a_gram) + 2 * _trace_of_product(d_b.mT @ b_old, cross) \
        + _trace_of_product(b_old.mT @ b_old, d_a_gram)
    return layer.scaling**2 * squared.clamp(min=0.0)  # a squared norm; rounding can take a near-zero one below 0


def _trace_of_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """tr(left @ right) for [r, r] matrices without forming the product."""
    return (left * right.mT).sum()
