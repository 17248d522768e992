"""A progress bar for long work outside a training run (sampling, scoring, reading folders of images).

A live bar on a terminal; on a pipe or in CI, a plain line every 10% so that logs stay short.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable


@contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar for `total` items: a live bar on a terminal, a plain line every 10% otherwise.

    Yields `advance(k)`, to call as items complete.
    """
    if sys.stdout.isatty():
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        with Progress(TextColumn(label), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                      TextColumn("eta"), TimeRemainingColumn()) as bar:
            task = bar.add_task(label, total=total)
            yield lambda k: bar.advance(task, k)
        return
    started, done, every = time.perf_counter(), 0, max(1, total // 10)

    def advance(k: int) -> None:
        nonlocal done
        before, done = done, done + k
        if done // every != before // every or done == total:
            print(f"{label}: {done}/{total} ({time.perf_counter() - started:.1f} s)", flush=True)

    yield advance
