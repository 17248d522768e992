"""The flow-matching step as a Gaussian policy (grpo_image/core/flow.py) against the scheduler and its formulas."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_image.core.flow import sde_step, step_kl

SHAPE = (3, 4, 6, 6)  # [B, C, H, W] latents


def scheduler(shift: float = 3.0, steps: int = 8):
    """FLUX's scheduler kind with shifted sigmas; the first sigma is 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    made = FlowMatchEulerDiscreteScheduler(shift=shift)
    made.set_timesteps(steps)
    return made


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)  # velocity, sample


@pytest.mark.parametrize("index", [0, 3, 7])
def test_noise_level_0_is_the_schedulers_euler_step(index):
    velocity, sample = inputs()
    timestep = scheduler().timesteps[index]
    euler = scheduler().step(velocity, timestep, sample).prev_sample  # a fresh scheduler: its step index is this one
    at = torch.full((SHAPE[0],), float(timestep))
    sde, _, _, _ = sde_step(scheduler(), velocity, sample, at, noise_level=0.0, kind="sde")
    assert torch.equal(sde, euler)  # x (1 + 0) + v (1 + 0) dt: the same two fp32 operations as x + dt v
    cps, _, _, _ = sde_step(scheduler(), velocity, sample, at, noise_level=0.0, kind="cps")
    # (1 - s') (x - s v) + s' (x + (1 - s) v) regroups x + (s' - s) v: a few fp32 roundings of terms up to
    # |x| + |v| (< 10 here), each at most 2^-24 of it: 8 of them bound the difference
    assert (cps - euler).abs().max() <= 8 * 2**-24 * (sample.abs() + velocity.abs()).max()


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_mean_and_std_are_the_formulas_on_shifted_sigmas_including_sigma_1(kind):
    made = scheduler()
    sigmas = made.sigmas.double()  # [steps + 1], the shifted schedule ending at 0
    assert sigmas[0] == 1 and sigmas[1] < 1
    velocity, sample = inputs(1)
    rows = torch.tensor([0, 2, 6])  # each sample at its own step; the first at sigma = 1
    at = made.timesteps[rows]
    _, _, mean, std = sde_step(made, velocity, sample, at, noise_level=0.7, kind=kind)
    s, s_next = sigmas[rows].view(-1, 1, 1, 1), sigmas[rows + 1].view(-1, 1, 1, 1)
    x, v, dt = sample.double(), velocity.double(), s_next - s
    if kind == "sde":
        denominator = 1 - torch.where(s == 1, sigmas[1], s)
        a = 0.7 * torch.sqrt(s / denominator)
        want_mean = x * (1 + a**2 * dt / (2 * s)) + v * (1 + a**2 * (1 - s) / (2 * s)) * dt
        want_std = a * torch.sqrt(-dt)
    else:
        want_std = s_next * math.sin(0.7 * math.pi / 2)
        want_mean = (1 - s_next) * (x - s * v) + torch.sqrt(s_next**2 - want_std**2) * (x + (1 - s) * v)
    # fp32 against float64: a handful of roundings of terms below 30 in size, each at most 2^-24 of it
    assert (mean.double() - want_mean).abs().max() <= 16 * 2**-24 * 30
    assert torch.allclose(std.double().expand_as(want_std), want_std, rtol=1e-6, atol=0)  # sqrt and sin in fp32


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_the_logprob_of_the_drawn_sample_recomputed_is_the_one_returned(kind):
    made = scheduler()
    velocity, sample = inputs(2)
    at = made.timesteps[torch.tensor([1, 4, 5])]
    drawn, logprob, _, _ = sde_step(made, velocity, sample, at, noise_level=0.7, kind=kind,
                                    generator=torch.Generator().manual_seed(3))
    _, again, _, _ = sde_step(made, velocity, sample, at, noise_level=0.7, kind=kind, prev_sample=drawn)
    assert torch.equal(again, logprob)  # on-policy, same batch: the ratio is exactly 1
    assert logprob.shape == (SHAPE[0],) and torch.isfinite(logprob).all()
    moved, _, _, _ = sde_step(made, velocity + 0.1, sample, at, noise_level=0.7, kind=kind, prev_sample=drawn)
    assert not torch.equal(moved, logprob)


def test_the_sde_logprob_is_the_gaussian_density_per_element_averaged():
    made = scheduler()
    velocity, sample = inputs(4)
    at = made.timesteps[torch.tensor([2, 3, 4])]
    drawn, logprob, mean, std = sde_step(made, velocity, sample, at, noise_level=0.7, kind="sde",
                                         generator=torch.Generator().manual_seed(5))
    density = torch.distributions.Normal(mean.double(), std.double().expand_as(mean)).log_prob(drawn.double())
    # fp32 against float64 of a log-density of a few units per element, averaged: 1e-5 is about 100 roundings
    assert torch.allclose(logprob.double(), density.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)


def test_the_kl_between_two_velocities_is_the_gaussians_closed_form():
    made = scheduler()
    velocity, sample = inputs(6)
    at = made.timesteps[torch.tensor([1, 2, 3])]
    _, _, mean, std = sde_step(made, velocity, sample, at, noise_level=0.7, kind="sde")
    _, _, reference, _ = sde_step(made, velocity + 0.05 * torch.randn(SHAPE), sample, at, noise_level=0.7, kind="sde")
    scale = std.double().expand_as(mean)
    closed = torch.distributions.kl_divergence(torch.distributions.Normal(mean.double(), scale),
                                               torch.distributions.Normal(reference.double(), scale))
    kl = step_kl(mean, reference, std)
    assert kl.shape == (SHAPE[0],) and (kl > 0).all()
    assert torch.allclose(kl.double(), closed.mean(dim=(1, 2, 3)), rtol=1e-5, atol=0)  # fp32 squares and a mean


def test_bad_arguments_are_refused():
    velocity, sample = inputs()
    at = scheduler().timesteps[:3]
    with pytest.raises(ValueError, match="kind must be one of"):
        sde_step(scheduler(), velocity, sample, at, noise_level=0.5, kind="ode")
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        sde_step(scheduler(), velocity, sample, at, noise_level=-0.1)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_the_drawn_sample_is_the_mean_plus_std_times_standard_noise(kind):
    made = scheduler()
    generator = torch.Generator().manual_seed(7)
    velocity, sample = torch.randn(2, 4, 64, 64, generator=generator), torch.randn(2, 4, 64, 64, generator=generator)
    at = made.timesteps[torch.tensor([2, 5])]
    drawn, _, mean, std = sde_step(made, velocity, sample, at, noise_level=0.7, kind=kind, generator=generator)
    noise = ((drawn - mean) / std).flatten(1)  # [B, n], n = 16,384 draws each
    n = noise.shape[1]
    # standard normal draws: their mean has std 1/sqrt(n), their variance std sqrt(2/n); 5 of each is a 1-in-a-million
    assert noise.mean(1).abs().max() <= 5 / math.sqrt(n)
    assert (noise.var(1) - 1).abs().max() <= 5 * math.sqrt(2 / n)
