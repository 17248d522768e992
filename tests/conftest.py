"""Shared fixtures: one Ray session for the whole test run (starting Ray costs seconds)."""

import pytest

import grpo_image  # noqa: F401  first, so that torchvision (vision extra) imports on a CPU torch; see its compat module


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
