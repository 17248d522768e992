"""One step of a flow-matching decoder as a Gaussian policy: what GRPO needs to train a diffusion decoder.

A flow-matching sampler (diffusers' `FlowMatchEulerDiscreteScheduler`, which X-Omni's FLUX-based decoder and
GLM-Image's DiT use) moves a latent x from noise level sigma to the next, smaller sigma' along the predicted
velocity v: the deterministic Euler step x' = x + (sigma' - sigma) v. It has no likelihood. Flow-GRPO (Liu et al.,
2025) replaces it with a stochastic step that has the same marginals, x' ~ N(mean(x, v), std^2), whose log-density
the policy-gradient ratio needs. Two such steps, `kind`:

- "sde" (Flow-GRPO's reverse-time SDE): with dt = sigma' - sigma < 0 and s = a sqrt(sigma / (1 - sigma)) (a: the
  noise level; at sigma = 1 the scheduler's next-largest sigma stands in for sigma in the denominator),
      mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt,   std = s sqrt(-dt);
  the log-density is the Gaussian's, element by element.
- "cps" (coefficients-preserving sampling): std = sigma' sin(a pi / 2); with the predicted clean latent
  x0 = x - sigma v and noise x1 = x + (1 - sigma) v,
      mean = (1 - sigma') x0 + sqrt(sigma'^2 - std^2) x1;
  the log-density keeps only -(x' - mean)^2, its constants dropped.

In both the log-prob is averaged over a sample's elements (one number per sample), in fp32, as flow_grpo computes
it, so that its published clip ranges (ratios of exp of such means) carry over. At noise level 0 both steps are the
Euler step (a deterministic step, whose log-density is not finite).
"""

from __future__ import annotations

import math

import torch

KINDS = ("sde", "cps")


def step_sigmas(scheduler, timestep: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(sigma, the next sigma, each [B, 1, ...] broadcastable over `ndim` dims; the schedule's second sigma).

    The sigmas are the scheduler's own, shifted as the pipeline set them (`set_timesteps`); each sample may be at its
    own timestep. The second sigma is what the "sde" step divides by at sigma = 1, as flow_grpo does.
    """
    index = torch.tensor([scheduler.index_for_timestep(t) for t in timestep.reshape(-1)])  # [B]
    sigmas = scheduler.sigmas.float()
    shape = (-1,) + (1,) * (ndim - 1)
    return sigmas[index].view(shape), sigmas[index + 1].view(shape), float(sigmas[1])


def sde_step(
    scheduler,
    velocity: torch.Tensor,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    *,
    noise_level: float,
    kind: str = "sde",
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stochastic step from `sample` at `timestep` with the predicted `velocity` (both [B, ...]).

    Draws the next sample (or scores the given `prev_sample`, as the training pass does with the rollout's) and
    returns (prev_sample [B, ...], log-prob [B], mean [B, ...], std broadcastable to [B, ...]), all fp32.
    `timestep` [B]: each sample's timestep among the scheduler's. `generator`: one for the batch, or one per sample
    (a rollout's noise then does not depend on the batch it was drawn in).
    """
    if kind not in KINDS:
        raise ValueError(f"sde_step: kind must be one of {KINDS}, got {kind!r}")
    if noise_level < 0:
        raise ValueError(f"sde_step: noise_level must be >= 0, got {noise_level}")
    velocity, sample = velocity.float(), sample.float()  # [B, ...]; bf16 overflows in the mean
    sigma, sigma_next, sigma_max = step_sigmas(scheduler, timestep, sample.ndim)
    dt = sigma_next - sigma  # < 0
    if kind == "sde":
        s = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma)))
        mean = sample * (1 + s**2 * dt / (2 * sigma)) + velocity * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        std = s * torch.sqrt(-dt)
    else:
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        clean, noise = sample - sigma * velocity, sample + (1 - sigma) * velocity
        mean = (1 - sigma_next) * clean + torch.sqrt(sigma_next**2 - std**2) * noise
    if prev_sample is None:  # at noise level 0 the Euler step: no draw (it would move a generator for nothing)
        prev_sample = mean + std * standard_noise(sample, generator) if noise_level > 0 else mean
    prev_sample = prev_sample.float().detach()
    if kind == "sde":
        density = -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    else:
        density = -((prev_sample - mean) ** 2)
    logprob = density.mean(dim=tuple(range(1, density.ndim)))  # [B]
    return prev_sample, logprob, mean, std


def standard_noise(like: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """fp32 N(0, 1) noise shaped like `like` [B, ...]: from one generator, or row by row from one per sample."""
    if isinstance(generator, (list, tuple)):  # drawn where each generator lives (CPU ones for seeds), then moved
        rows = [torch.randn(like.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
        return torch.stack(rows).to(like.device)  # [B, ...]
    where = like.device if generator is None else generator.device
    return torch.randn(like.shape, generator=generator, device=where, dtype=torch.float32).to(like.device)


def step_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two steps from the same sample with the same std, per element averaged over a sample: [B].

    Two Gaussians of one variance differ only by their means: KL = (m - m_ref)^2 / (2 std^2).
    """
    kl = (mean.float() - reference_mean.float()) ** 2 / (2 * std.float() ** 2)  # [B, ...]
    return kl.mean(dim=tuple(range(1, kl.ndim)))  # [B]
