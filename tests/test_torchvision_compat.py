"""The vision extra's torchvision imports next to the CPU torch, and transformers and open_clip still import."""

import importlib.util
import subprocess
import sys

import pytest

SCRIPT = """
import grpo_image
from transformers import CLIPModel
import open_clip
import torchvision.transforms.functional as F
import torch
print(grpo_image.TORCHVISION, type(F.resize(torch.zeros(3, 8, 8), [4, 4])).__name__)
"""


def test_transformers_and_open_clip_import_with_the_vision_extra():
    if importlib.util.find_spec("open_clip") is None:
        pytest.fail("the vision extra is not installed: `make test` installs it (pip install -e '.[vision]')")
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)  # a fresh interpreter
    assert result.returncode == 0, result.stderr[-2000:]
    mode, tensor_type = result.stdout.split()
    assert mode in ("native", "compat") and tensor_type == "Tensor"
