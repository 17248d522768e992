"""The human-readable outputs of `grpo-image eval`: eval.md (tables and grid images), report.html, grids/*.png.

Both documents are built from eval.json's content and the per-image rows of scores.jsonl, so they never show a
number that the JSON does not hold. The HTML page links the images themselves by relative path (keep it next to
its `images/` folder), shows each model's images of the same prompt side by side, and captions every image with
its scores.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from grpo_image.base.image_files import find_images
from grpo_image.base.grids import make_grid
from grpo_image.evaluation.longtext import table as text_table

THUMB_PX = 192  # longest side of an image in the Markdown grids
SMALL_PX = 128  # images narrower than this are shown enlarged, pixel for pixel


def _fmt(value: float | None, signed: bool = False) -> str:
    return "-" if value is None else (f"{value:+.4f}" if signed else f"{value:.4f}")


def _pm(entry: dict) -> str:
    return _fmt(entry["mean"]) + ("" if entry["std"] is None else f" ± {entry['std']:.4f}")


def metric_rows(result: dict, prefix: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the table of every metric starting with `prefix`: each model, then the deltas."""
    models = list(result["models"])
    keys = sorted({k for s in result["summary"].values() for k in s if k.startswith(prefix) and not k.endswith("/nan")})
    header = ["metric", *[f"{m} (mean ± std over seeds)" for m in models]]
    comparison = result["comparison"]
    if comparison:
        header += ["delta (after - before) ± std", "per-seed deltas"]
    rows = []
    for key in keys:
        row = [key, *[_pm(result["summary"][m][key]) if key in result["summary"][m] else "-" for m in models]]
        if comparison and key in comparison:
            c = comparison[key]
            row += [_fmt(c["delta"], True) + ("" if c["delta_std"] is None else f" ± {c['delta_std']:.4f}"),
                    ", ".join(_fmt(d, True) for d in c["per_seed_delta"])]
        rows.append(row)
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text_summary(result: dict) -> dict[str, dict[str, float]]:
    return {m: {k.split("/", 1)[1]: v["mean"] for k, v in s.items() if k.startswith("text_accuracy/")
                and v["mean"] is not None} for m, s in result["summary"].items()}


def _header(result: dict) -> list[str]:
    lines = [f"recipe: {result['recipe'] or '-'}; seeds: {result['seeds']}; images per prompt: {result['n']}"]
    base = "the recipe's policy (no checkpoint)"
    lines += [f"{m}: {info['checkpoint'] or base}" for m, info in result["models"].items()]
    lines += [f"prompt set {name}: {info['file']} ({info['prompts']} prompts, {info['kind']})"
              for name, info in result["sets"].items()]
    return lines


def _captions(rows: list[dict]) -> dict[tuple, str]:
    """(model, seed, set, file) -> a one-line caption of the image's scores."""
    out = {}
    for row in rows:
        if "scores" in row:
            text = "  ".join(f"{k} {_fmt(v)[:5]}" for k, v in row["scores"].items())
        else:
            text = f"accuracy {_fmt(row['accuracy'])[:5]}, read: {row['read'][:80] or '(nothing)'}"
        out[(row["model"], row["seed"], row["set"], row["file"])] = text
    return out


def _images(s, model: str, seed: int, prompts: int) -> list[tuple[int, str, list[Path]]]:
    """(prompt id, prompt, image paths) of the first `prompts` prompts of a set for one model and seed."""
    folder = s.images[(model, seed)]
    found, _ = find_images(folder, [i for i, _ in s.items[:prompts]])
    return [(i, record.prompt, found[i]) for i, record in s.items[:prompts]]


def write_grids(result: dict, sets, rows: list[dict], out: Path, prompts: int) -> list[tuple[str, Path]]:
    """One captioned grid a (set, model) of the first seed: a row a prompt, a column an image."""
    captions, seed, written = _captions(rows), result["seeds"][0], []
    (out / "grids").mkdir(exist_ok=True)
    for s in sets:
        for model in result["models"]:
            entries = [(i, path) for i, _, paths in _images(s, model, seed, prompts) for path in paths]
            if not entries:
                continue
            size = _thumb_size(Image.open(entries[0][1]).size)
            images = np.stack([np.asarray(Image.open(p).convert("RGB").resize(size)) for _, p in entries])
            texts = [f"{i:04d}  {captions.get((model, seed, s.name, p.name), '')}" for i, p in entries]
            columns = max(len(paths) for _, _, paths in _images(s, model, seed, prompts))
            path = out / "grids" / f"{s.name}_{model}.png"
            make_grid(images, texts, columns=columns).save(path)
            written.append((f"{s.name}, {model}", path))
    return written


def _thumb_size(size: tuple[int, int]) -> tuple[int, int]:
    w, h = size
    scale = min(1.0, THUMB_PX / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def write_markdown(result: dict, grids: list[tuple[str, Path]], out: Path) -> Path:
    parts = ["# Evaluation", "", *[f"- {line}" for line in _header(result)], ""]
    for title, prefix in (("Rewards", "reward/"), ("Text accuracy", "text_accuracy/")):
        header, rows = metric_rows(result, prefix)
        if rows:
            parts += [f"## {title}", "", _markdown_table(header, rows), ""]
    text = _text_summary(result)
    if any(text.values()):
        parts += ["### Text accuracy by language, length and category (mean over seeds)", "", text_table(text), ""]
    if grids:
        parts += ["## Samples (first seed)", ""]
        parts += [f"![{title}]({path.relative_to(out).as_posix()})" for title, path in grids] + [""]
    path = out / "eval.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_html(result: dict, sets, rows: list[dict], out: Path, prompts: int) -> Path:
    captions, seed = _captions(rows), result["seeds"][0]
    body = ["<h1>Evaluation</h1><ul>", *[f"<li>{html.escape(line)}</li>" for line in _header(result)], "</ul>"]
    for title, prefix in (("Rewards", "reward/"), ("Text accuracy", "text_accuracy/")):
        header, table_rows = metric_rows(result, prefix)
        if table_rows:
            body.append(f"<h2>{title}</h2>" + _html_table(header, table_rows))
    for s in sets:
        shown = min(prompts, len(s.items))
        body.append(f"<h2>Samples: {html.escape(s.name)} (seed {seed}, first {shown} prompts)</h2>")
        targets = {i: r.metadata.get("text") for i, r in s.items}
        per_model = {m: _images(s, m, seed, prompts) for m in result["models"]}
        for index, (prompt_id, prompt, _) in enumerate(next(iter(per_model.values()))):
            target = targets.get(prompt_id)
            shown = f" — text: {target}" if s.kind == "text" and target else ""
            body.append(f'<div class="prompt"><p><b>{prompt_id:04d}</b> {html.escape(prompt + shown)}</p>')
            for model, entries in per_model.items():
                cells = [_figure(p, captions.get((model, seed, s.name, p.name), ""), out) for p in entries[index][2]]
                body.append(f'<div class="row"><span class="model">{html.escape(model)}</span>{"".join(cells)}</div>')
            body.append("</div>")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>grpo-image evaluation</title><style>
body {{ font-family: sans-serif; margin: 16px; background: #fff; color: #111; }}
table {{ border-collapse: collapse; margin: 8px 0; }} th, td {{ border: 1px solid #bbb; padding: 3px 8px; }}
.row {{ display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; margin: 4px 0; }}
.model {{ width: 70px; font-weight: bold; }} figure {{ margin: 0; }}
figcaption {{ font-size: 11px; max-width: 256px; }}
img {{ max-width: 256px; }} img.small {{ width: {SMALL_PX}px; image-rendering: pixelated; }}
</style></head><body>
{chr(10).join(body)}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _figure(path: Path, caption: str, out: Path) -> str:
    width = Image.open(path).size[0]
    src = html.escape(Path(os.path.relpath(path.resolve(), out.resolve())).as_posix())
    small = ' class="small"' if width < SMALL_PX else ""
    return (f'<figure><img src="{src}"{small} alt="{html.escape(path.name)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def write_reports(result: dict, sets, rows: list[dict], out: Path, prompts: int) -> dict[str, Any]:
    grids = write_grids(result, sets, rows, out, prompts)
    return {"markdown": write_markdown(result, grids, out), "html": write_html(result, sets, rows, out, prompts)}
