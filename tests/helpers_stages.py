"""An adapter set to an update of a chosen size, as a run of a few hundred RL steps leaves one."""

from __future__ import annotations

import torch

from grpo_image.training.saved_weights import TRAINED_ADAPTER


def small_update(weights, seed: int, relative: float) -> None:
    """Set the trained adapter to a random update of `relative` of each adapted weight (lora_A as peft made it)."""
    generator = torch.Generator().manual_seed(seed)
    model = weights.policy.model
    for name, module in model.named_modules():
        if not hasattr(module, "lora_B") or TRAINED_ADAPTER not in module.lora_B:
            continue
        a, b = module.lora_A[TRAINED_ADAPTER].weight, module.lora_B[TRAINED_ADAPTER].weight  # [r, in], [out, r]
        direction = torch.randn(b.shape, generator=generator)
        delta = module.scaling[TRAINED_ADAPTER] * direction @ a.detach()  # [out, in]
        size = relative * module.base_layer.weight.float().norm() / delta.norm()
        with torch.no_grad():
            b.copy_(direction * size)
