"""How much probability mass the sampling filters remove: the bias of computing log-probs on the unfiltered policy.

    python bench/filtered_mass.py                  # X-Omni's 16,384 codes, three head sharpnesses, four settings
    python bench/filtered_mass.py --codes 16384 --spreads 1 4 --seeds 0 1 2

The ratios and the KL are computed on the tempered, unfiltered distribution while codes are drawn from the filtered
one (docs/algorithm.md). At each position the sampling distribution is the tempered one renormalised over what the
filters keep, so a sampled code's log-prob there is its unfiltered log-prob minus log(1 - m), m the removed mass: m
is the size of the bias. This script samples a tiny X-Omni (hidden 64, 2 layers) with X-Omni's image vocabulary
and reports `sampling/filtered_mass` as a run logs it (mean over the sampled codes, and the max), for X-Omni's
min-p 0.03 and GLM-Image's published settings (temperature 0.9, top-p 0.75, with and without transformers'
default top-k 50). The head's rows are scaled to a given logit spread (the std of a position's logits): a random
model has no trained distribution's shape, so the spreads bracket one, from near uniform (0.25) to peaked (4).
"""

from __future__ import annotations

import argparse

import torch

from _common import print_header

SETTINGS = {
    "min-p 0.03 (X-Omni)": dict(min_p=0.03),
    "top-p 0.75, T 0.9 (GLM-Image card)": dict(top_p=0.75, temperature=0.9),
    "top-p 0.75 + top-k 50, T 0.9": dict(top_p=0.75, top_k=50, temperature=0.9),
    "top-k 50 alone": dict(top_k=50),
}
PROMPTS = ["a red square", "a long menu board reading Coffee 3 dollars", "x", "paint it all blue, edge to edge"]


def spread_head(policy, spread: float, codes: int) -> None:
    """Scale the image rows of the head so that a position's logits have about this standard deviation."""
    from grpo_image.core.sampling import left_pad, policy_rows

    ids, mask = left_pad(policy_rows(policy, PROMPTS, False), policy.pad_token_id, policy.device)
    with torch.no_grad():
        hidden, _ = policy.forward_hidden(ids, mask, policy.prefix_positions(mask))
        now = policy.image_logits(hidden[:, -1]).std(-1).mean()
        policy.model.mm_head.weight[:codes].mul_(spread / now)


def main() -> None:
    from grpo_image.core.sampling import SamplingSettings, sample_codes_with_mass
    from grpo_image.policies.xomni import tiny_xomni_policy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=16384)
    parser.add_argument("--spreads", type=float, nargs="+", default=[0.25, 1.0, 4.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--grid", type=int, default=8, help="codes per side: L = grid^2 positions per rollout")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print_header("filtered mass: what top-k / top-p / min-p remove from the tempered distribution", vars(args))
    print(f"{'logit spread':>12}  {'setting':<36} {'mean':>7} {'max':>7}   (over seeds {args.seeds})")
    for spread in args.spreads:
        for name, kwargs in SETTINGS.items():
            means, maxima = [], []
            for seed in args.seeds:
                policy = tiny_xomni_policy(grid=(args.grid, args.grid), image_vocab_size=args.codes, hidden_size=64,
                                           num_layers=2, seed=seed)  # fmt: skip
                spread_head(policy, spread, args.codes)
                seeds = torch.arange(len(PROMPTS)) + 100 * seed
                _, _, mass = sample_codes_with_mass(policy, PROMPTS, seeds, SamplingSettings(**kwargs))
                means.append(mass.mean().item())
                maxima.append(mass.max().item())
            print(f"{spread:>12}  {name:<36} {sum(means) / len(means):7.3f} {max(maxima):7.3f}")


if __name__ == "__main__":
    main()
