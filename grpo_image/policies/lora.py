"""The one place where training LoRA adapters differs from training full weights.

Both modes answer the same three questions for the trainer: which parameters the optimizer updates, how to run
the reference policy for the KL term, and how to save and restore the trained weights. LoRA's reference is the
same model with its adapters disabled (no second copy); full fine-tuning keeps a frozen copy, and none at all
when the KL weight is 0.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

from grpo_image.policies.causal_lm import CausalLMPolicy

ADAPTER_FILE = "adapter_model.safetensors"
FULL_WEIGHTS_FILE = "model.safetensors"


class _TrainedWeights:
    """What both modes share: optimizer state and the weights the rollouts are sampled with.

    Optimizer state is keyed by parameter name, not position: the same file restores a plain, a DDP or an FSDP
    optimizer, so a checkpoint resumes with a different number of processes.
    """

    policy: CausalLMPolicy

    def rollout_weights(self) -> contextlib.AbstractContextManager:
        """A context in which the policy samples; the weights are whole already (FSDP gathers them here)."""
        return contextlib.nullcontext()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.policy.model, optimizer, options=whole_state_options())

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.policy.model, optimizer, state, options=whole_state_options())


def whole_state_options():
    """Whole (unsharded) state, gathered to the CPU of rank 0 when sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


class LoraWeights(_TrainedWeights):
    """Train peft LoRA adapters on the policy's model; the reference is the base model (adapters off)."""

    def __init__(self, policy: CausalLMPolicy, r: int, alpha: int, dropout: float, target_modules: list[str] | str):
        """`target_modules`: module-name suffixes (a list), or one regex over full module names (a string)."""
        from peft import LoraConfig, get_peft_model

        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        policy.model = get_peft_model(policy.model, config)
        self.policy = policy

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[CausalLMPolicy]:
        with self.policy.model.disable_adapter():
            yield self.policy

    def save(self, folder: Path | None) -> None:
        """The adapter in peft's standard format (adapter_config.json + adapter_model.safetensors).

        None: another rank writes the checkpoint and this one has nothing to contribute.
        """
        if folder is not None:
            self.policy.model.save_pretrained(folder)

    def load(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.policy.model, load_file(Path(folder) / ADAPTER_FILE))
        lora_missing = [key for key in result.missing_keys if "lora_" in key]
        if lora_missing:
            raise ValueError(f"{folder}: the adapter lacks {len(lora_missing)} LoRA tensors, e.g. {lora_missing[0]}")


class FullWeights(_TrainedWeights):
    """Train every weight; the reference is a frozen copy made before the first update (none when beta is 0)."""

    def __init__(self, policy: CausalLMPolicy, keep_reference: bool):
        self.policy = policy
        self.reference_policy = None
        if keep_reference:
            frozen = copy.deepcopy(policy.model).requires_grad_(False).eval()
            self.reference_policy = copy.copy(policy)
            self.reference_policy.model = frozen

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[CausalLMPolicy]:
        if self.reference_policy is None:
            raise RuntimeError("no reference model is kept when train.beta is 0")
        yield self.reference_policy

    def save(self, folder: Path | None) -> None:
        """The whole model with its tokenizer: the folder loads as a policy checkpoint by itself (None: see LoRA)."""
        if folder is not None:
            self.policy.save_pretrained(folder)

    def load(self, folder: Path) -> None:
        state = load_file(Path(folder) / FULL_WEIGHTS_FILE)
        self.policy.model.load_state_dict(state, strict=False)
        missing = set(self.policy.model.state_dict()) - set(state)
        if missing - _tied_names(self.policy.model):
            raise ValueError(f"{folder}: the checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[0]}")


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Weights that save_pretrained leaves out because they are tied to another one."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if model.config.tie_word_embeddings else set()


def load_initial_weights(policy: CausalLMPolicy, folder: str | Path) -> None:
    """Start from a previous run's weights (`train.init_from`): a checkpoint folder, or its `policy/` folder.

    An adapter is merged into the base weights, so that this run's reference (adapters disabled, or the frozen
    copy) is the model it starts from, as when a Chinese RL stage continues from an English RL checkpoint. Full
    weights are loaded in place (a sharded full checkpoint: point `policy.path` at it instead).
    """
    folder = Path(folder)
    folder = folder / "policy" if (folder / "policy").is_dir() else folder
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        policy.model = PeftModel.from_pretrained(policy.model, folder).merge_and_unload()
        policy.model.requires_grad_(True)  # peft froze the base while the adapter was attached
    elif (folder / FULL_WEIGHTS_FILE).is_file():
        FullWeights(policy, keep_reference=False).load(folder)
    else:
        raise FileNotFoundError(f"train.init_from: {folder} holds neither a LoRA adapter nor {FULL_WEIGHTS_FILE}")


def make_weights(policy: CausalLMPolicy, train_cfg) -> LoraWeights | FullWeights:
    """Build the recipe's training mode (`train.mode`: lora or full) around the policy."""
    if train_cfg.mode == "lora":
        lora = train_cfg.lora
        targets = lora.target_regex if lora.target_regex else list(lora.target_modules)
        return LoraWeights(policy, lora.r, lora.alpha, lora.dropout, targets)
    if train_cfg.mode == "full":
        return FullWeights(policy, keep_reference=train_cfg.beta > 0)
    raise ValueError(f"train.mode must be lora or full, got {train_cfg.mode!r}")

