"""LoRA adapters on a flow-matching decoder's transformer, for decoder GRPO.

peft's adapters are injected into the transformer in place (no wrapper: the family's pipeline keeps calling its own
module), kept in fp32 under the transformer's bf16 compute as the policy's are, and switched off as a whole for the
reference decoder of the KL term. Their state is saved under peft's own names (`get_peft_model_state_dict`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def add_decoder_lora(transformer, *, r: int, alpha: int, targets: str) -> list[torch.nn.Parameter]:
    """LoRA adapters (fp32, B zero: the decoder unchanged until trained) on the modules whose full names match the
    regex `targets`, in place; the rest of the transformer is frozen. Returns the adapters' parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    transformer.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets), transformer)
    adapters = [p for name, p in transformer.named_parameters() if "lora_" in name]
    if not adapters:
        raise ValueError(f"decoder LoRA: no module of {type(transformer).__name__} matches {targets!r}")
    for param in adapters:
        param.data = param.data.float()
        param.requires_grad_(True)
    return adapters


@contextmanager
def adapters_disabled(transformer):
    """The transformer without its adapters (the reference decoder), restored on exit."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield transformer
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def adapter_state(transformer) -> dict[str, torch.Tensor]:
    """The adapters' tensors under peft's names (what `load_adapter_state` reads back)."""
    from peft import get_peft_model_state_dict

    return {name: value.detach().float().cpu().contiguous()
            for name, value in get_peft_model_state_dict(transformer).items()}  # fmt: skip


def load_adapter_state(transformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Saved adapters into the transformer's, refusing (naming the tensor) any that is missing or of another shape."""
    from peft import set_peft_model_state_dict

    mine = adapter_state(transformer)
    for name, value in mine.items():
        if name not in state or state[name].shape != value.shape:
            found = "missing" if name not in state else f"of shape {tuple(state[name].shape)}"
            raise ValueError(f"{source}: decoder adapter {name} is {found}, the recipe's is {tuple(value.shape)}")
    result = set_peft_model_state_dict(transformer, state)
    if result.unexpected_keys:
        raise ValueError(f"{source}: decoder adapters the recipe's decoder lacks: {result.unexpected_keys[:3]}")
