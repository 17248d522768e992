"""Pickle a model-backed reward as its constructor arguments, and rebuild it (reloading its weights) on unpickle.

A reward crosses a process boundary as a config, not as tensors: shipping a 2 GB HPS model or an onnxruntime
session (which does not pickle at all) to a worker that can load the same local files is slower and more fragile
than loading them there. Classes that keep a model set `self._init_args` in `__init__` and inherit this.
"""

from __future__ import annotations

from typing import Any


class RebuildOnUnpickle:
    """`__getstate__` keeps only `self._init_args`; `__setstate__` calls `__init__(**init_args)` again."""

    _init_args: dict[str, Any]

    def __getstate__(self) -> dict[str, Any]:
        return {"init_args": dict(self._init_args)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["init_args"])  # type: ignore[misc]
