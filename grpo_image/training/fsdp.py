"""FSDP for full fine-tuning: each decoder layer's weights, gradients and Adam moments are split over the ranks.

What is sharded: every layer of the policy's decoder (the children of each ModuleList named `...layers`), which
hold nearly all the weights of a 7B policy. Embeddings, final norms and heads stay whole on every rank and their
gradients are averaged like DDP's (`average_replicated_gradients`): the policy code reads head rows directly
(`image_logits` slices the image rows), which a sharded parameter would not allow.

How: each layer is one FSDP unit, and the module that holds a stack of layers (the decoder the policy calls:
Qwen2Model, X-Omni's model, GLM-Image's text model, Janus's language model) is the FSDP root over them, owning no
parameter of its own: its embeddings and norms are `ignored_params`, whole on every rank like the heads outside it.
FSDP never frees a root's gathered weights after its forward (they would be needed first in the backward), so the
layers must not be roots: under the root, each layer frees its gathered weights after its forward and again after its
backward, and a pass that has no backward (the reference's) leaves nothing gathered. A layer sharded on its own would
be a root, and after the first reference pass every rank would hold the whole reference.

The reference for the KL term is a frozen copy sharded the same way, its layers in the compute dtype (what the
policy's layers are gathered in: the copy computes exactly what the policy does before the first update); its
teacher-forced pass gathers one layer at a time. Sampling is different: hundreds of one-token forwards, and gathering
each layer's weights for every one of them would spend the rollout on communication, so `gathered` holds the whole
weights for the length of the rollout (one gather per layer per step) and shards them again afterwards.

Start-up never holds the whole model on the GPU: the model is loaded on the host, the parts outside the layers go to
the GPU first, then each layer in turn is moved, turned into fp32 masters, made rank 0's, copied for the reference and
sharded (`ShardedFullWeights`). The GPU's peak is the sharded weights plus a layer or two in flight
(`grpo-image plan`'s start-up phase).

Checkpoints (FullWeights.save and load) hold each rank's shards and name-keyed optimizer state in a DCP folder,
which torch reshards: a run saved with W ranks resumes with any other number of processes, FSDP or not.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from grpo_image.training.distributed import World, broadcast_in_place_from_rank0
from grpo_image.policies.causal_lm import CausalLMPolicy
from grpo_image.training.saved_weights import load_stages
from grpo_image.training.weights import (
    FullWeights, frozen_copy, master_compute_dtype, reference_dtype, upcast_masters,
)


def decoder_stacks(model: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
    """(holder, layers) for each ModuleList named `layers` in `model`: the holder becomes the FSDP root over them."""
    stacks = [
        (holder, list(child))
        for holder in model.modules()
        for name, child in holder.named_children()
        if isinstance(child, nn.ModuleList) and name == "layers" and len(child)
    ]
    if not stacks:
        raise ValueError("train.fsdp: the policy's model has no decoder layers to shard (no ModuleList named 'layers')")
    return stacks


def precision_policy(compute_dtype: torch.dtype | None):
    """FSDP2's mixed precision over fp32 master shards: gather in the compute dtype, reduce gradients in fp32.

    The layers' inputs are not cast (`cast_forward_inputs`): the residual stream stays in the dtype autocast gives
    it (fp32), as without FSDP.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_layer(layer: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """One decoder layer as one FSDP unit, freeing its gathered weights after each forward and backward."""
    from torch.distributed.fsdp import fully_shard

    return fully_shard(layer, reshard_after_forward=True, mp_policy=precision_policy(compute_dtype))


def shard_roots(model: nn.Module, compute_dtype: torch.dtype | None = None) -> list[nn.Module]:
    """Make each stack's holder the FSDP root over its (already sharded) layers; return every layer.

    The holder's own parameters (embeddings, norms) are ignored by FSDP: they stay whole, as the heads do.
    """
    from torch.distributed.fsdp import fully_shard

    layers = []
    for holder, stack in decoder_stacks(model):
        inside = {id(p) for layer in stack for p in layer.parameters()}
        ignored = {p for p in holder.parameters() if id(p) not in inside}
        fully_shard(holder, ignored_params=ignored, mp_policy=precision_policy(compute_dtype))
        layers += stack
    return layers


@contextlib.contextmanager
def gathered(layers: list[nn.Module]) -> Iterator[None]:
    """Whole weights in every sharded layer for the duration (no gradients flow: sampling and reference passes)."""
    for layer in layers:
        layer.unshard()
        layer.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(True)
            layer.reshard()


class ShardedFullWeights(FullWeights):
    """FullWeights with the policy's layers (and the reference copy's) sharded by FSDP, built without ever holding
    the whole model on this process's device.

    Order: the model arrives on the host as loaded. Rank 0 alone reads `init_from`, into fp32 masters on the host
    (the others' weights become rank 0's below). The parts outside the layers go to the device, become fp32 masters
    and rank 0's. Then each layer in turn: to the device, fp32 masters, rank 0's, a frozen copy in the compute dtype
    for the reference, both sharded. Last, the reference's remaining parts are copied (`frozen_copy`) and each stack's
    holder becomes the root over its layers, in the policy and in the reference.
    """

    def __init__(
        self, policy: CausalLMPolicy, keep_reference: bool, init_from: str | Path | None = None, world: World = World()
    ):
        self.policy = policy
        self.compute_dtype = master_compute_dtype(policy.model)
        if init_from and world.is_main:
            upcast_masters(policy.model.parameters())  # the previous stage's fp32 weights are not rounded
            load_stages(policy, init_from, merge=True)
        model = policy.model
        dtype_of = reference_dtype(model, self.compute_dtype, policy.image_head())
        layers = [layer for _, stack in decoder_stacks(model) for layer in stack]
        inside = {id(m) for layer in layers for m in layer.modules()}
        outside = [m for m in model.modules() if id(m) not in inside]
        for module in outside:  # embeddings, norms, heads (and frozen towers): whole on every rank
            _to_device(module, world.device)
        self._as_masters_of_rank0([p for m in outside for p in m.parameters(recurse=False)]
                                  + [b for m in outside for b in m.buffers(recurse=False)], world)
        reference_layers = {}
        for layer in layers:
            layer.to(world.device)
            self._as_masters_of_rank0([*layer.parameters(), *layer.buffers()], world)
            if keep_reference:  # every layer parameter in the dtype the policy's layer is gathered in
                reference = frozen_copy(layer, lambda p: self.compute_dtype or p.dtype, share_frozen=False)
                reference_layers[layer] = shard_layer(reference)
            shard_layer(layer, self.compute_dtype)
        self.reference_policy = None
        self.reference_layers: list[nn.Module] = []
        if keep_reference:
            self.reference_policy = copy.copy(policy)
            self.reference_policy.model = frozen_copy(model, dtype_of, replacing=reference_layers)
            self.reference_layers = shard_roots(self.reference_policy.model)
        self.layers = shard_roots(model, self.compute_dtype)

    def _as_masters_of_rank0(self, tensors: list[torch.Tensor], world: World) -> None:
        """Trainable parameters among `tensors` become fp32 masters, then every tensor becomes rank 0's."""
        if self.compute_dtype is not None:
            upcast_masters([t for t in tensors if isinstance(t, nn.Parameter)])
        broadcast_in_place_from_rank0(world, tensors)

    @contextlib.contextmanager
    def rollout_weights(self) -> Iterator[None]:
        with gathered(self.layers), self.compute():
            yield


def _to_device(module: nn.Module, device: torch.device) -> None:
    """`module`'s own parameters and buffers (not its children's) onto `device`, in place."""
    for param in module.parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buffer in module.named_buffers(recurse=False):
        setattr(module, name, buffer.to(device))
