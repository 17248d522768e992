"""How far a GRPO step moves a 7B-sized layer: `train/update_ratio` for LoRA and full weights at a few learning rates.

The figures behind `health.update_ratio_min` (grpo_image/base/defaults.yaml) and the LoRA learning rates of the
recipes (docs/recipes.md, "Learning rates"). One layer of Qwen2.5-7B's shape (X-Omni's LM; 3584 x 3584, a q_proj)
with weights drawn at rms 0.02, trained by AdamW (betas 0.9, 0.999, no weight decay) through 8 optimizer steps a
GRPO step, as the shipped recipes do (`train.minibatches: 8`); the ratio is the project's own `UpdateRatio` on a
peft LoRA layer (r 64, peft's default initialisation: B = 0, A uniform) or on the full weight. Two gradient
sequences bracket what a run sees: `noise` draws an independent gradient for every optimizer step (nothing for
Adam's momentum to add up: the smallest motion), `coherent` repeats one gradient (every step pushes the same way:
the largest). Only the gradient's direction matters to Adam, not its scale.

    python bench/update_ratio.py [--steps 3] [--json bench/results/update_ratio.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

import grpo_image  # noqa: F401  (before peft: the torchvision compatibility shim)
from grpo_image.training.update_ratio import UpdateRatio

SIZE, RANK, WEIGHT_RMS, OPTIMIZER_STEPS = 3584, 64, 0.02, 8
RUNS = [  # (label, LoRA alpha or None for full weights, lr)
    ("full weights, lr 1e-6 (X-Omni paper)", None, 1e-6),
    ("LoRA r 64 alpha 32, lr 1e-6", 32, 1e-6),
    ("LoRA r 64 alpha 32, lr 1e-5 (recipes)", 32, 1e-5),
    ("LoRA r 64 alpha 128, lr 1e-6 (recipes before)", 128, 1e-6),
    ("LoRA r 64 alpha 128, lr 1e-5", 128, 1e-5),
]


def layer(alpha: int | None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(SIZE, SIZE, bias=False))
    nn.init.normal_(model[0].weight, std=WEIGHT_RMS)
    if alpha is None:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=alpha, target_modules=["0"]))


def gradient(kind: str, index: int) -> torch.Tensor:
    """d loss / d W [SIZE, SIZE] of optimizer step `index`: a fresh draw (noise) or always the same (coherent)."""
    seed = 7 if kind == "coherent" else 1000 + index
    return torch.randn(SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def ratios(alpha: int | None, lr: float, kind: str, steps: int) -> list[float]:
    model = layer(alpha)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    found = []
    for step in range(steps):
        moved = UpdateRatio(model)
        for index in range(step * OPTIMIZER_STEPS, (step + 1) * OPTIMIZER_STEPS):
            optimizer.zero_grad()
            linear_loss(model, gradient(kind, index)).backward()
            optimizer.step()
        found.append(moved.ratio())
    return found


def linear_loss(model: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """<grad, W_eff>, whose gradient with respect to the effective weight is `grad`: for LoRA
    tr(grad^T s B A) = s <grad^T B, A^T>, computed without the [SIZE, SIZE] product."""
    if not hasattr(model, "base_model"):
        return (grad * model[0].weight).sum()
    lora = model.base_model.model[0]
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight  # [r, in], [out, r]
    return lora.scaling["default"] * ((grad.T @ b) * a.T).sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps per run (8 optimizer steps each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the ratios here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    print(f"train/update_ratio per GRPO step ({OPTIMIZER_STEPS} AdamW steps), a {SIZE} x {SIZE} layer of rms "
          f"{WEIGHT_RMS}; steps 1..{args.steps}")
    for label, alpha, lr in RUNS:
        results[label] = {kind: ratios(alpha, lr, kind, args.steps) for kind in ("noise", "coherent")}
        shown = "  ".join(f"{kind} " + " ".join(f"{r:.2e}" for r in values) for kind, values in results[label].items())
        print(f"{label:<48} {shown}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"size": SIZE, "rank": RANK, "weight_rms": WEIGHT_RMS, "optimizer_steps": OPTIMIZER_STEPS,
                       "ratios": results}, out, indent=1)


if __name__ == "__main__":
    main()
