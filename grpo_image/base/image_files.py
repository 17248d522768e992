"""Folders of generated images: how they are named, found, read and written.

One naming scheme for every folder this project writes or reads: image k (1-based) of prompt `id` is
`{id:04d}_{k}.png`, LongText-Bench's layout (`0000_1.png` ... `0199_4.png`). A prompt's id is its `prompt_id` in
a LongText-format file and its 0-based line index among the prompts of any other prompt set. Folders written by
other tools are read leniently, as the benchmark's own scorer reads them: `<int>_<anything>.<ext>` and
`<int>.<ext>` both belong to prompt `<int>`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from grpo_image.base.progress import progress

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_NAME = re.compile(r"^(\d+)(?:_(.*))?$")


def image_name(prompt_id: int, k: int) -> str:
    """The file name of image k (1-based) of a prompt: image_name(7, 2) == '0007_2.png'."""
    if k < 1:
        raise ValueError(f"image numbers start at 1, got k={k}")
    return f"{prompt_id:04d}_{k}.png"


def find_images(folder: str | Path, ids: list[int]) -> tuple[dict[int, list[Path]], list[Path]]:
    """The images of each prompt id in a folder, and the image files that belong to no id in `ids`.

    Files of one prompt are ordered by their number when the part after `_` is one (`0003_2` before `0003_10`),
    then by name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found")
    wanted = set(ids)
    found: dict[int, list[Path]] = {i: [] for i in ids}
    unmatched: list[Path] = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        match = _NAME.match(path.stem)
        if match is None or int(match.group(1)) not in wanted:
            unmatched.append(path)
            continue
        found[int(match.group(1))].append(path)
    for paths in found.values():
        paths.sort(key=lambda p: (_number(p), p.name))
    return found, unmatched


def _number(path: Path) -> int:
    rest = _NAME.match(path.stem).group(2)
    return int(rest) if rest is not None and rest.isdigit() else -1


def image_batches(paths: list[Path], batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index of the first, uint8 RGB [b, H, W, 3]) over consecutive files, at most `batch_size` a batch.

    A batch is one array, so a file of another size than the previous one (folders made by other tools may mix
    sizes) starts a new batch.
    """
    start, batch = 0, []
    for index, path in enumerate(paths):
        image = np.asarray(Image.open(path).convert("RGB"))  # uint8 [H, W, 3]
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield start, np.stack(batch)
            start, batch = index, []
        batch.append(image)
    if batch:
        yield start, np.stack(batch)


class MissingImages(ValueError):
    """A folder that lacks every image of some prompts: the message names the folder and the first such prompt."""


def folder_batches(
    items: list[tuple[int, object]], folder: str | Path, batch_size: int, allow_missing: bool, label: str
) -> Iterator[tuple[list[tuple[int, object, Path]], np.ndarray]]:
    """Every image of every (prompt id, record) in `folder`, a batch at a time with a progress bar:
    ([(prompt id, record, path)] of the batch, uint8 RGB [b, H, W, 3]). Evaluation and LongText scoring read
    folders this one way.

    A prompt with no image is an error unless `allow_missing`; files that belong to no prompt are reported once.
    """
    found, unmatched = find_images(folder, [prompt_id for prompt_id, _ in items])
    empty = [prompt_id for prompt_id, _ in items if not found[prompt_id]]
    if empty and not allow_missing:
        raise MissingImages(
            f"{folder}: {len(empty)} of {len(items)} prompts have no image (e.g. prompt_id {empty[0]}: expected "
            f"{image_name(empty[0], 1)}); generate them, or allow missing images to score the rest"
        )
    if unmatched:
        print(f"{folder}: {len(unmatched)} image file(s) belong to no prompt and are ignored, "
              f"e.g. {unmatched[0].name}", flush=True)
    jobs = [(prompt_id, record, path) for prompt_id, record in items for path in found[prompt_id]]
    with progress(len(jobs), label) as advance:
        for start, images in image_batches([path for _, _, path in jobs], batch_size):
            yield jobs[start : start + len(images)], images
            advance(len(images))


def save_images(images: np.ndarray, paths: list[Path]) -> None:
    """Write uint8 RGB [n, H, W, 3] as PNG files (lossless: a saved image scores as the one in memory)."""
    for image, path in zip(images, paths):
        Image.fromarray(image).save(path)
