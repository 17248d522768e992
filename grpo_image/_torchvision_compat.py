"""Let PyPI's torchvision import next to a CPU-only build of the same torch.

PyPI ships torchvision as a CUDA build. Next to a CPU torch its C++ extension cannot load, and its import then
fails on `operator torchvision::nms does not exist` (it registers fake kernels for ops the extension would have
defined). Once that broken torchvision is installed, transformers' imports that probe it (CLIP, image processors)
fail too. open_clip needs torchvision's transforms, which are pure Python, so the vision extra installs it, and
this module defines the two op schemas the import expects. The C++ ops themselves (nms) stay unavailable; nothing
in this project uses them. Where torchvision imports normally (a matching build, a GPU machine) this does nothing.
"""

from __future__ import annotations

import importlib.util
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # kept alive: the op definitions live as long as this object


def ensure_torchvision_importable() -> str:
    """Returns "absent", "native" or "compat" (the schemas had to be defined first)."""
    global _library
    if importlib.util.find_spec("torchvision") is None:
        return "absent"
    try:
        import torchvision  # noqa: F401
        return "native"
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _library.define(schema)
    import torchvision  # noqa: F401

    return "compat"
