"""Shared fixtures: one Ray session for the whole test run (starting Ray costs seconds)."""

import pytest
import torch

import grpo_image  # noqa: F401  first, so that torchvision (vision extra) imports on a CPU torch; see its compat module


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Toy tensors gain nothing from threads, and on a busy two-core machine spinning threads make each op 10x
    slower: modules of toy models run single-threaded (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
