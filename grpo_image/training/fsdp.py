"""FSDP for full fine-tuning: each decoder layer's weights, gradients and Adam moments are split over the ranks.

What is sharded: every layer of the policy's decoder (the children of each ModuleList named `...layers`), which
hold nearly all the weights of a 7B policy. Embeddings, final norms and heads stay whole on every rank and their
gradients are averaged like DDP's (`average_replicated_gradients`): the policy code reads head rows directly
(`image_logits` slices the image rows), which a sharded parameter would not allow.

The reference for the KL term is a frozen copy sharded the same way, so it costs 1/W of its weights per rank; its
teacher-forced pass is one forward per minibatch, for which FSDP's gather-one-layer-at-a-time is what we want.
Sampling is different: hundreds of one-token forwards, and gathering each layer's weights for every one of them
would spend the rollout on communication, so `gathered` holds the whole weights for the length of the rollout
(one gather per layer per step) and shards them again afterwards.

Checkpoints (FullWeights.save and load) hold each rank's shards and name-keyed optimizer state in a DCP folder,
which torch reshards: a run saved with W ranks resumes with any other number of processes, FSDP or not.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from grpo_image.training.distributed import World
from grpo_image.policies.causal_lm import CausalLMPolicy
from grpo_image.training.weights import FullWeights


def shard_layers(model: nn.Module, compute_dtype: torch.dtype | None = None) -> list[nn.Module]:
    """Shard each decoder layer of `model` over the process group; return the sharded layers.

    With a compute dtype, the fp32 shards are the master weights and FSDP2's MixedPrecisionPolicy all-gathers them
    in that dtype for compute and reduce-scatters gradients in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = [
        layer
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers"
        for layer in module
    ]
    if not layers:
        raise ValueError("train.fsdp: the policy's model has no decoder layers to shard (no ModuleList named 'layers')")
    precision = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else None
    for layer in layers:
        fully_shard(layer, mp_policy=precision) if precision else fully_shard(layer)
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
    """FullWeights with the policy's layers (and the reference copy's) sharded by FSDP."""

    def __init__(
        self, policy: CausalLMPolicy, keep_reference: bool, init_from: str | Path | None = None, world: World = World()
    ):
        super().__init__(policy, keep_reference, init_from, world)
        self.layers = shard_layers(policy.model, self.compute_dtype)
        reference = self.reference_policy
        self.reference_layers = shard_layers(reference.model, self.compute_dtype) if reference else []

    @contextlib.contextmanager
    def rollout_weights(self) -> Iterator[None]:
        with gathered(self.layers), self.compute():
            yield
