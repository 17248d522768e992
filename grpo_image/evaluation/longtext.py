"""LongText-Bench: its prompt files, and its text-accuracy score by language, category and length.

The published files (X-Omni's `textbench/text_prompts.jsonl` and `text_prompts_zh.jsonl`) hold one JSON object a
line: `category` (sign, label, print, webpage, slide, poster, caption, dialogue), `length` (short / long), `prompt`,
`text` (the strings the image must show), `text_length` and `prompt_id`. Images are `{prompt_id:04d}_{k}.png`
(`grpo_image.base.image_files`). A project prompt set whose records carry `metadata["text"]` is scored the same way,
with `lang`, `category` and `length` read from its metadata where present.

Score: a reader, built from a component node (by default one of `text_readers.yaml`: the OCR reward with rapidocr,
or a VLM server as the benchmark uses), reads each image; the phrases a VLM emits instead of text are removed; the
reader's `text_counts` counts matched and expected units with LongText-Bench's published metric (words for
English, characters for Chinese; the OCR reward's, so that the benchmark and the reward count alike); a group's
score is its matched units over its expected units (micro-average, as published). A LongText file is scored in one
language, as the published scorer scores a file with one `--mode`: Chinese when any of its targets has a CJK
character; a project prompt set's language is each prompt's `metadata["lang"]`, else its target's.

Two bugs of the published scorer are not reproduced: its clean-up loop keeps only the last replacement (so
"addCriterion" stays in the read-out), and its summary reads `results.json` while its eval writes
`results.jsonl`. Here every phrase is removed, and the per-image rows and the summary come from one program.
A prompt without any image is reported (the published scorer silently leaves it out of the denominator).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from grpo_image.base.config import instantiate
from grpo_image.training.data import load_prompts
from grpo_image.base.image_files import folder_batches
from grpo_image.core.types import PromptRecord, text_language

LONGTEXT_KEYS = ("category", "length", "prompt", "text", "text_length", "prompt_id")
READERS = Path(__file__).with_name("text_readers.yaml")  # the readers `--ocr NAME` builds
# What VLM readers write that is not text in the image: the benchmark's list (longest form first).
HALLUCINATIONS = ("addCriterion", "No text recognized.", "No text recognized")


class TextBenchError(ValueError):
    """A text prompt file or image folder that cannot be scored: the message names the file, line or prompt."""


def is_longtext_file(path: str | Path) -> bool:
    """True when the first non-blank line of a .jsonl file is a LongText-Bench record."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and set(LONGTEXT_KEYS) <= set(first)
    return False


def read_longtext(path: str | Path) -> list[tuple[int, PromptRecord]]:
    """A LongText-format file as (prompt_id, record) pairs; the fields go to the record's metadata."""
    path = Path(path)
    if not path.is_file():
        raise TextBenchError(f"{path}: LongText prompt file not found")
    items, seen = [], set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise TextBenchError(f"{where}: invalid JSON ({err.msg})") from err
        missing = [key for key in LONGTEXT_KEYS if key not in obj] if isinstance(obj, dict) else list(LONGTEXT_KEYS)
        if missing:
            raise TextBenchError(f"{where}: a LongText record needs {list(LONGTEXT_KEYS)}; missing {missing}")
        text, prompt_id = obj["text"], obj["prompt_id"]
        if not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
            raise TextBenchError(f"{where}: 'text' must be a non-empty list of strings, got {text!r}")
        if not isinstance(prompt_id, int) or isinstance(prompt_id, bool) or prompt_id < 0 or prompt_id in seen:
            raise TextBenchError(f"{where}: 'prompt_id' must be a unique integer >= 0, got {prompt_id!r}")
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise TextBenchError(f"{where}: 'prompt' must be a non-empty string")
        seen.add(prompt_id)
        metadata = {"text": text, "category": str(obj["category"]),
                    "length": str(obj["length"]), "text_length": obj["text_length"], "prompt_id": prompt_id}
        items.append((prompt_id, PromptRecord(obj["prompt"], metadata)))
    if not items:
        raise TextBenchError(f"{path}: no prompts")
    lang = "zh" if any(text_language(r.metadata["text"]) == "zh" for _, r in items) else "en"  # one --mode a file
    return [(prompt_id, PromptRecord(r.prompt, {**r.metadata, "lang": lang})) for prompt_id, r in items]


def read_text_prompts(path: str | Path) -> list[tuple[int, PromptRecord]]:
    """A LongText file, or a project prompt set whose every record has `metadata["text"]`, as (id, record)."""
    if is_longtext_file(path):
        return read_longtext(path)
    items = []
    for index, record in enumerate(load_prompts(path)):
        text = record.metadata.get("text")
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
            raise TextBenchError(f"{path}: prompt {index + 1} ({record.prompt!r}) has no metadata['text'] to score")
        metadata = {**record.metadata, "text": text}
        metadata.setdefault("lang", text_language(text))
        items.append((index, PromptRecord(record.prompt, metadata)))
    return items


def clean_reading(text: str) -> str:
    """Remove every phrase of HALLUCINATIONS from an OCR read-out (each one, not only the last)."""
    for phrase in HALLUCINATIONS:
        text = text.replace(phrase, " ")
    return " ".join(text.split())


def build_reader(engine: str = "rapidocr", options: dict[str, Any] | None = None, node: dict | None = None):
    """The reader: a component node given by the user, else `engine`'s node of text_readers.yaml with `options`
    added to its engine options (for "vlm", the benchmark's question and 1024-token budget unless overridden)."""
    if node is None:
        readers = OmegaConf.to_container(OmegaConf.load(READERS), resolve=True)
        if engine not in readers:
            raise TextBenchError(f"unknown text reader {engine!r}; known: {sorted(readers)} ({READERS})")
        node = readers[engine]
        node["engine_options"] = {**node.get("engine_options", {}), **(options or {})}
    reader = instantiate(node)
    for method in ("read", "text_counts"):
        if not callable(getattr(reader, method, None)):
            raise TextBenchError(f"{node.get('_component_')}: a text reader needs read(images) -> list[str] and "
                                 "text_counts(read, target, lang) -> (matched, expected)")
    return reader


def score_folder(
    items: list[tuple[int, PromptRecord]], folder: str | Path, reader, batch_size: int = 8,
    allow_missing: bool = False, label: str = "reading",
) -> list[dict[str, Any]]:
    """Read every image of every prompt in `folder` and count its matched and expected units: one row an image."""
    rows = []
    for batch, images in folder_batches(items, folder, batch_size, allow_missing, label):
        for (prompt_id, record, path), raw in zip(batch, reader.read(images)):
            reading = clean_reading(raw)
            meta = record.metadata
            matched, expected = reader.text_counts(reading, meta["text"], meta["lang"])
            rows.append({
                "prompt_id": prompt_id, "file": path.name, "lang": meta["lang"], "category": meta.get("category"),
                "length": meta.get("length"), "read": reading, "matched": int(matched), "expected": int(expected),
                "accuracy": matched / expected if expected else None,
            })
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Micro-averaged accuracy of every group: 'all', '<lang>', '<lang>/<category>', '<lang>/<length>'.

    A prompt without a category or length (a project prompt set may have neither) counts in 'all' and '<lang>'.
    """
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        lang = row["lang"]
        extra = {f"{lang}/{row[key]}" for key in ("category", "length") if row.get(key) is not None}
        for group in ("all", lang, *sorted(extra)):
            counts[group][0] += row["matched"]
            counts[group][1] += row["expected"]
    return {group: matched / expected for group, (matched, expected) in sorted(counts.items()) if expected}


def table(summary_by_model: dict[str, dict[str, float]]) -> str:
    """A Markdown table: a row per (model, language); columns overall, short, long, then each category."""
    groups = {key for summary in summary_by_model.values() for key in summary}
    langs = sorted({key.split("/")[0] for key in groups if key != "all"})
    cats = sorted({key.split("/")[1] for key in groups if "/" in key} - {"short", "long"})
    columns = ["overall", "short", "long", *cats]
    lines = ["| model | lang | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 2)]
    for model, summary in summary_by_model.items():
        for lang in langs:
            cells = [summary.get(lang if c == "overall" else f"{lang}/{c}") for c in columns]
            lines.append(f"| {model} | {lang} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines)
