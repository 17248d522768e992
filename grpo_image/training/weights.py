"""The one place where training LoRA adapters differs from training full weights, precision included.

Both modes answer the same questions for the trainer: which parameters the optimizer updates, in which precision
the policy computes, how to run the reference policy for the KL term, and how to save and restore the trained
weights. LoRA's reference is the same model with its adapters disabled (no second copy); full fine-tuning keeps a
frozen copy, and none at all when the KL weight is 0.

Precision (docs/algorithm.md, "Precision"): the policy's dtype (`policy.dtype` in a recipe) is the compute
precision, and what the optimizer updates is always fp32. An AdamW step of lr 1e-6 is below half a bf16 ULP of most
weights, so bf16 parameters would round most updates away.
- LoRA: the base stays in its dtype and frozen; peft keeps the adapters in fp32 (`autocast_adapter_dtype`), and
  with them their gradients and AdamW moments.
- Full: trainable bf16 parameters are turned into fp32 once; they are the master weights and the optimizer state is
  fp32. Every policy forward (rollouts, teacher-forced, reference) runs under `torch.autocast` in bf16, so the
  matrix multiplies use the bf16 rounding of the masters, as a bf16 model would, while updates accumulate in fp32.
  Checkpoints hold the fp32 masters, so resume is exact.
- The reference copy (full fine-tuning with a KL term) holds each weight in the precision the policy computes with
  it (`reference_dtype`): a Linear's weight in bf16, which is exactly what autocast rounds the master to for every
  matrix multiply; the weights autocast leaves in their own dtype (embeddings, norms) and the image head's rows, which
  the policy reads in fp32 (`fp32_head`), as fp32 copies; frozen weights
  not copied at all but shared, since nothing ever changes them. Its log-probs before the first update are the
  policy's bit for bit, at about half the memory of an fp32 copy.

Saving and restoring (grpo_image/training/checkpoint.py): an adapter is written whole by rank 0 in peft's format;
full weights and every optimizer state go through torch.distributed.checkpoint, each rank writing and reading its
own shard. Saved weights that do not fit the recipe's model are refused first (grpo_image/training/checkpoint_fit.py).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors.torch import load_file
from torch import nn

from grpo_image.training.checkpoint import is_first, read_sharded, saved_keys, write_sharded
from grpo_image.training.checkpoint_fit import ADAPTER_FILE, refuse_other_mode, refuse_unless_fits
from grpo_image.training.saved_weights import TRAINED_ADAPTER, load_stages, peft_quietly
from grpo_image.training.distributed import World, broadcast_from_rank0
from grpo_image.policies.causal_lm import CausalLMPolicy

LOW_PRECISION = (torch.bfloat16, torch.float16)


class _TrainedWeights:
    """What both modes share: optimizer state, the compute precision and the weights the rollouts are sampled with.

    Optimizer state is keyed by parameter name, not position, and saved in shards: the same folder restores a plain,
    a DDP or an FSDP optimizer, so a checkpoint resumes with a different number of processes.
    """

    policy: CausalLMPolicy
    compute_dtype: torch.dtype | None = None  # autocast dtype; None: the parameters are the compute precision

    def compute(self) -> contextlib.AbstractContextManager:
        """The context every policy forward runs in: autocast to the compute dtype over fp32 master weights."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.policy.device.type, dtype=self.compute_dtype)

    @contextlib.contextmanager
    def rollout_weights(self) -> Iterator[None]:
        """A context in which the policy samples; the weights are whole already (FSDP gathers them here)."""
        with self.compute():
            yield

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.model.parameters() if p.requires_grad]

    def save_optimizer_state(self, optimizer: torch.optim.Optimizer, folder: Path, group) -> None:
        """Every rank writes the moments of the parameters it holds (its FSDP shards) into a DCP folder."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        write_sharded(get_optimizer_state_dict(self.policy.model, optimizer), folder, group)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, folder: Path, group) -> None:
        """Every rank reads the moments of the parameters it holds, into the optimizer's own state tensors.

        A trainable parameter that never had a gradient (X-Omni's text head: image codes never reach it) has no
        AdamW state in the checkpoint, as it had none in the run that wrote it; it gets none here either (neither a
        missing-key error nor zero moments that an uninterrupted run would not hold).
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict,
        )

        state = get_optimizer_state_dict(self.policy.model, optimizer)  # AdamW's state made (zero), to be filled
        saved = saved_keys(folder)
        trained = {name: param for name, param in self.policy.model.named_parameters() if param.requires_grad}
        stateless = [name for name in trained if f"state.{name}.step" not in saved]
        for name in stateless:
            state["state"].pop(name, None)
        read_sharded(state, folder, group)
        set_optimizer_state_dict(self.policy.model, optimizer, state, options=StateDictOptions(strict=not stateless))
        for name in stateless:
            optimizer.state.pop(trained[name], None)


class LoraWeights(_TrainedWeights):
    """Train peft LoRA adapters (fp32) on the policy's model; the reference is the model with them off.

    On a run that continues earlier stages, their adapters are attached frozen (`frozen`, by `load_stages`) and stay
    on in the reference, which is then the model the run started from; the trained adapter is peft's "default".
    """

    def __init__(
        self,
        policy: CausalLMPolicy,
        *,
        r: int,
        alpha: int,
        dropout: float,
        target_modules: list[str] | str,
        frozen: list[str] = (),
    ):
        """`target_modules`: module-name suffixes (a list), or one regex over full module names (a string)."""
        from peft import LoraConfig, get_peft_model

        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        with peft_quietly():  # autocast_adapter_dtype (peft's default) keeps bf16/fp16 bases' adapters in fp32
            if frozen:
                policy.model.add_adapter(TRAINED_ADAPTER, config, autocast_adapter_dtype=True)
            else:
                policy.model = get_peft_model(policy.model, config, autocast_adapter_dtype=True)
        self.policy, self.frozen = policy, list(frozen)
        if self.frozen:  # every adapter on; only the new one trainable, as get_peft_model leaves a base
            policy.model.requires_grad_(False)
            policy.model.base_model.set_adapter([*self.frozen, TRAINED_ADAPTER])
            policy.model.base_model.set_requires_grad(self.frozen, False)

    def _activate(self, names: list[str]) -> None:
        """Only `names` active (their outputs add up); whether each parameter is trainable stays as it was."""
        trainable = [p.requires_grad for p in self.policy.model.parameters()]
        self.policy.model.base_model.set_adapter(names)
        for param, flag in zip(self.policy.model.parameters(), trainable):
            param.requires_grad_(flag)

    @contextlib.contextmanager
    def reference(self) -> Iterator[CausalLMPolicy]:
        if not self.frozen:
            with self.policy.model.disable_adapter():
                yield self.policy
            return
        self._activate(self.frozen)
        try:
            yield self.policy
        finally:
            self._activate([*self.frozen, TRAINED_ADAPTER])

    def save(self, folder: Path, group=None) -> None:
        """The adapter in peft's standard format (adapter_config.json + adapter_model.safetensors), written once by
        the first rank: it is small, and every rank holds the same."""
        if is_first(group):
            self.policy.model.save_pretrained(folder, selected_adapters=[TRAINED_ADAPTER])

    def load(self, folder: Path, group=None) -> None:
        """Every rank reads the adapter; one of another shape (model or rank r) is refused, naming its first tensor."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        refuse_other_mode(folder, "lora")
        wanted = {name: tuple(value.shape) for name, value in get_peft_model_state_dict(self.policy.model).items()}
        refuse_unless_fits(folder, wanted)
        set_peft_model_state_dict(self.policy.model, load_file(Path(folder) / ADAPTER_FILE))


class FullWeights(_TrainedWeights):
    """Train every weight in fp32 masters; the reference is a frozen copy made before the first update.

    `init_from` (a previous run's checkpoint) is loaded into the fp32 masters before the reference is copied, so
    the reference is the model the run starts from and a previous stage's fp32 weights are not rounded. With several
    processes, every rank's weights become rank 0's before the reference is copied. The whole model lives on this
    process's device (ShardedFullWeights places it there layer by layer instead).
    """

    def __init__(
        self, policy: CausalLMPolicy, keep_reference: bool, init_from: str | Path | None = None, world: World = World()
    ):
        self.policy = policy
        policy.model.to(world.device)  # this process's GPU (cuda:LOCAL_RANK) when there is one
        self.compute_dtype = keep_fp32_masters(policy.model)
        load_stages(policy, init_from, merge=True)  # adapters merged into the fp32 masters
        broadcast_from_rank0(world, policy.model)  # replicas (and their references) start as rank 0's
        self.reference_policy = None
        if keep_reference:
            self.reference_policy = copy.copy(policy)
            self.reference_policy.model = frozen_copy(
                policy.model, reference_dtype(policy.model, self.compute_dtype, policy.image_head())
            )

    @contextlib.contextmanager
    def reference(self) -> Iterator[CausalLMPolicy]:
        if self.reference_policy is None:
            raise RuntimeError("no reference model is kept when train.beta is 0")
        with self.compute():
            yield self.reference_policy

    def save(self, folder: Path, group=None) -> None:
        """The fp32 masters (and any frozen weights) into a DCP folder, every rank its own FSDP shards; `sample`,
        `eval` and `train.init_from` read it into the recipe's policy (see `saved_weights.py`)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        write_sharded(get_model_state_dict(self.policy.model), folder, group)

    def load(self, folder: Path, group=None) -> None:
        """Every rank reads its own shard (resharded for another number of processes) into the model's tensors."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        refuse_other_mode(folder, "full")
        state = get_model_state_dict(self.policy.model)  # this rank's tensors (DTensor shards under FSDP)
        refuse_unless_fits(folder, {name: tuple(value.shape) for name, value in state.items()})
        read_sharded(state, folder, group)
        set_model_state_dict(self.policy.model, state)


def master_compute_dtype(model: nn.Module) -> torch.dtype | None:
    """bf16 when trainable parameters are in bf16 (they become fp32 masters computing under bf16 autocast), else None.

    fp16 is refused: without loss scaling its gradients underflow, and every recipe here computes in bf16.
    """
    low = {p.dtype for p in model.parameters() if p.requires_grad and p.dtype in LOW_PRECISION}
    if not low:
        return None
    if torch.float16 in low:
        raise ValueError("full fine-tuning in float16 is not supported (it needs loss scaling): use dtype bfloat16")
    return torch.bfloat16


def upcast_masters(params: Iterable[nn.Parameter]) -> None:
    """Turn trainable parameters into fp32 in place (the master weights); frozen ones keep their dtype."""
    for param in params:
        if param.requires_grad:
            param.data = param.data.float()


def keep_fp32_masters(model: nn.Module) -> torch.dtype | None:
    """Turn trainable bf16 parameters into fp32 master weights in place; return bf16, the compute dtype (or None)."""
    compute_dtype = master_compute_dtype(model)
    if compute_dtype is not None:
        upcast_masters(model.parameters())
    return compute_dtype


def reference_dtype(
    model: nn.Module, compute_dtype: torch.dtype | None, image_head: Iterable[nn.Module] = ()
) -> Callable[[nn.Parameter], torch.dtype]:
    """The dtype in which the reference copy keeps each trained parameter of `model`: the one the policy computes in.

    Under autocast a Linear's weight and bias enter the matrix multiply rounded to the compute dtype (to nearest
    even, as a `.to(bfloat16)` copy is), so a bf16 copy computes exactly what the fp32 master does. An embedding
    lookup or a norm's scale is not cast by autocast: it runs in the weight's own dtype, fp32 for a master, so those
    keep the master's dtype (a bf16 embedding would also turn the whole residual stream to bf16). A parameter that
    anything but a Linear also reads (a head tied to the embedding) counts as the latter, and so do the Linears of
    the policy's `image_head`, whose weights `fp32_head` reads unrounded.
    """
    if compute_dtype is None:
        return lambda param: param.dtype
    rounded = rounded_by_autocast(model, image_head)
    return lambda param: compute_dtype if id(param) in rounded else param.dtype


def rounded_by_autocast(model: nn.Module, image_head: Iterable[nn.Module] = ()) -> set[int]:
    """The ids of the parameters of `model` that every forward sees rounded to the compute dtype: those only nn.Linear
    modules hold (a tied one held elsewhere too is not), other than the image head's (read in fp32)."""
    readers: dict[int, list[bool]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            readers.setdefault(id(param), []).append(isinstance(module, nn.Linear))
    unrounded = {id(param) for module in image_head for param in module.parameters()}
    return {key for key, linear in readers.items() if all(linear) and key not in unrounded}


def frozen_copy(
    module: nn.Module,
    dtype_of: Callable[[nn.Parameter], torch.dtype],
    *,
    share_frozen: bool = True,
    replacing: dict[nn.Module, nn.Module] | None = None,
) -> nn.Module:
    """A frozen copy of `module` in eval mode, made parameter by parameter: never a whole second copy in fp32.

    Each trainable parameter is copied in `dtype_of(param)`; each frozen one is shared (`share_frozen`: nothing
    updates it, so a second copy would only cost memory) or copied; buffers are copied. `replacing` maps submodules
    to what the copy holds in their place (FSDP's reference layers, each built and sharded beforehand).
    """
    replacing = replacing or {}
    memo: dict[int, object] = {id(old): new for old, new in replacing.items()}
    replaced = {id(p) for old in replacing for p in old.parameters()}
    for param in module.parameters():
        if id(param) in replaced:
            continue
        shared = share_frozen and not param.requires_grad
        memo[id(param)] = param if shared else nn.Parameter(
            param.detach().to(dtype_of(param), copy=True), requires_grad=False
        )
    return copy.deepcopy(module, memo).eval()


def make_weights(policy: CausalLMPolicy, train_cfg, world: World = World()) -> LoraWeights | FullWeights:
    """Build the recipe's training mode (`train.mode`: lora or full) around the policy, from `train.init_from`.

    With several processes, every replica (base and adapters, or full weights) starts as rank 0's. The model goes to
    this process's device here: whole for LoRA and plain full fine-tuning, layer by layer under FSDP.
    """
    if train_cfg.mode == "lora":
        policy.model.to(world.device)
        frozen = load_stages(policy, train_cfg.init_from, merge=False)  # earlier stages' adapters, under the new one
        lora = train_cfg.lora
        targets = lora.target_regex if lora.target_regex else list(lora.target_modules)
        weights = LoraWeights(
            policy, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=targets, frozen=frozen
        )
        broadcast_from_rank0(world, policy.model)
        return weights
    if train_cfg.mode != "full":
        raise ValueError(f"train.mode must be lora or full, got {train_cfg.mode!r}")
    keep_reference = train_cfg.beta > 0
    if train_cfg.fsdp:
        from grpo_image.training.fsdp import ShardedFullWeights

        return ShardedFullWeights(policy, keep_reference, train_cfg.init_from, world)
    return FullWeights(policy, keep_reference, train_cfg.init_from, world)
