"""Work done inside each of two gloo processes started by tests/test_fsdp_memory.py (spawned: importable here).

FSDP full fine-tuning of a bf16 tiny policy, measured the way a GPU's memory would be: the start-up's peak
allocation, then what each rank holds after every phase of several steps and at the worst moment inside each.
"""

import grpo_image  # noqa: F401  first, as in conftest: torchvision's compatibility shim

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.helpers_distributed import join

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
OVERRIDES = [  # the demo recipe at test size: 4 layers of width 64 in bf16, the real full recipes' FSDP settings
    f"data.prompts={REPO / 'prompts' / 'tiny_colors.jsonl'}", "data.batch_size=4", "data.group_size=4",
    "train.minibatches=2", "policy.hidden_size=64", "policy.num_layers=4", "policy.grid=[2,2]",
    "policy.dtype=bfloat16", "train.mode=full", "train.fsdp=true", "train.gradient_checkpointing=true",
    "train.micro_batch_size=1", "train.lr=1e-3", f"steps={STEPS}", "sample_every=0", "logging.tensorboard=false",
]  # fmt: skip


def peak_allocation(build):
    """(what `build()` returns, the most bytes its allocations held at once): torch's profiler records every
    allocation and free of the CPU allocator with the running total (as tests/test_memory_plan.py measures)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = build()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [e["args"] for e in json.loads(path.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return result, max(e["Total Allocated"] for e in events) - start


def local_bytes(tensors) -> int:
    """Bytes of this rank's part of each tensor (a DTensor's local shard), each tensor once."""
    unique = {id(t): t for t in tensors if t is not None}.values()
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in unique)


def gathered_bytes(layers) -> int:
    """What FSDP holds unsharded for `layers` now: the storage of their all-gather outputs (torch 2.13's FSDPParam;
    freed, to size 0, when a layer is resharded)."""
    return sum(output.untyped_storage().nbytes() for layer in layers
               for group in layer._get_fsdp_state()._fsdp_param_groups for fsdp_param in group.fsdp_params
               for output in fsdp_param.all_gather_outputs)  # fmt: skip


def held(trainer) -> dict:
    """This rank's resident bytes by the plan's names, and what is left gathered, in the policy and the reference."""
    weights = trainer.weights
    policy = list(trainer.policy.model.parameters())
    mine = {id(p) for p in policy}
    reference = [p for p in weights.reference_policy.model.parameters() if id(p) not in mine]  # frozen: shared
    moments = [value for state in trainer.optimizer.state.values() for key, value in state.items() if key != "step"]
    layers = {"policy": weights.layers, "reference": weights.reference_layers}
    return {
        "weights": local_bytes(policy), "reference": local_bytes(reference),
        "gradients": local_bytes(p.grad for p in policy), "optimizer": local_bytes(moments),
        **{f"{name} gathered": gathered_bytes(stack) for name, stack in layers.items()},
        **{f"{name} layers not sharded": sum(not isinstance(p, DTensor) for layer in stack for p in layer.parameters())
           for name, stack in layers.items()},
    }  # fmt: skip


class PhaseRecorder:
    """What each rank holds after every phase, and the most FSDP held gathered inside each phase.

    After a phase: the trainer's own context managers (rollout weights, reference) are wrapped to measure on exit;
    the update is measured after `grpo_step` returns. Inside: hooks on every layer of both models measure at each
    layer's forward (after FSDP's pre-forward gathered it, before its post-forward frees it) and when the gradient
    of each layer's output arrives in the backward.
    """

    def __init__(self, trainer) -> None:
        self.trainer, self.step, self.phase, self.after, self.inside = trainer, 0, "update", [], {}
        weights = trainer.weights
        for layer in [*weights.layers, *weights.reference_layers]:
            layer.register_forward_pre_hook(lambda module, args: self.sample())
            layer.register_forward_hook(self._on_output, prepend=True)
        self._wrap("rollout_weights", "rollout")
        self._wrap("reference", "reference")

    def sample(self) -> None:
        weights = self.trainer.weights
        gathered = gathered_bytes(weights.layers) + gathered_bytes(weights.reference_layers)
        self.inside[self.phase] = max(self.inside.get(self.phase, 0), gathered)

    def _on_output(self, module, args, output) -> None:
        self.sample()
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: self.sample())

    def _wrap(self, name: str, phase: str) -> None:
        inner = getattr(self.trainer.weights, name)

        @contextmanager
        def measured():
            self.phase = phase
            with inner() as value:
                self.sample()  # the rollout's whole weights are gathered on entry
                yield value
            self.after.append((self.step, phase, held(self.trainer)))
            self.phase = "update"  # what follows the rollout and the reference passes in a step

        setattr(self.trainer.weights, name, measured)

    def run(self, step: int) -> dict:
        from grpo_image.training.train import grpo_step

        self.step = step
        metrics, _ = grpo_step(self.trainer, step)
        self.after.append((step, "update", held(self.trainer)))
        return metrics


def fsdp_memory_on_rank(rank: int, port: int, out: str) -> None:
    """The start-up's peak, the reference's log-probs before the first update, then STEPS steps phase by phase."""
    from grpo_image.base.config import instantiate, load_recipe
    from grpo_image.core.logprobs import teacher_forced_logprobs
    from grpo_image.planning.memory_plan import plan_recipe, weight_casts
    from grpo_image.training.train import build_trainer, sample_rollout
    from grpo_image.training.weights import make_weights

    world = join(rank, port)
    cfg = load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [*OVERRIDES, f"output_dir={out}/run"])
    plan = plan_recipe(cfg, gpus=2)
    # Start-up: the policy as loaded stands for the host's copy; what building the weights allocates on top is what a
    # GPU would receive, except tensors that keep their storage (here the rotary buffers), moved for free on a CPU.
    policy = instantiate(cfg.policy)
    loaded = [t.detach() for t in [*policy.model.parameters(), *policy.model.buffers()]]  # kept alive: not counted
    weights, allocated = peak_allocation(lambda: make_weights(policy, cfg.train, world))
    storages = {t.untyped_storage().data_ptr() for t in loaded}
    kept = [t for t in [*policy.model.parameters(), *policy.model.buffers()]
            if not isinstance(t, DTensor) and t.untyped_storage().data_ptr() in storages]  # fmt: skip
    startup = allocated + local_bytes(kept)
    del weights, policy, loaded

    trainer = build_trainer(cfg, world)
    recorder = PhaseRecorder(trainer)
    rollout = sample_rollout(trainer, 1)  # step 1's own rollout (seeded by step): the policy before any update
    with torch.no_grad():
        with trainer.weights.reference() as reference_policy:
            reference = teacher_forced_logprobs(reference_policy, rollout.prompts, rollout.codes, trainer.settings)
        with trainer.weights.compute():
            policy_logprobs = teacher_forced_logprobs(trainer.policy, rollout.prompts, rollout.codes, trainer.settings)
    before_update = held(trainer)
    recorder.after.clear()
    metrics = [recorder.run(step) for step in range(1, STEPS + 1)]
    torch.save({
        "planned": {"held": plan.held, "resident": plan.resident, "phases": plan.phases,
                    "gathered": dict(zip(("rollout", "layer"), weight_casts(plan.policy, plan.setup))),
                    "layer": plan.policy.largest_layer_params, "bytes": plan.policy.dtype_bytes},
        "startup": startup, "after": recorder.after, "inside": recorder.inside, "before_update": before_update,
        "same_logprobs": bool(torch.equal(reference, policy_logprobs)), "metrics": metrics,
        "rollout": (rollout.prompts, rollout.codes, policy_logprobs),
    }, f"{out}/rank{rank}.pt")  # fmt: skip
    dist.barrier()  # no rank tears the group down while a peer's last collective is in flight
    dist.destroy_process_group()
