"""Shared fixtures: one Ray session for the whole test run (starting Ray costs seconds)."""

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
