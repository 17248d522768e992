"""`grpo-image eval`: sample a prompt set with one or two models, score every image, summarise, report.

A run of eval is models x seeds x prompt sets. Each (model, seed, set) gets a folder of images
(`images/<model>/seed_<s>/<set>/{id:04d}_{k}.png`, or a folder the user gives), every image is scored, and each
(model, seed) gets one number per metric:

- `reward/<name>`: the mean raw score of a recipe reward over the images of the `--prompts` set (NaN left out),
  `reward/<name>/nan` how many were NaN, `reward/total` the mean weighted total (as in training's metrics);
- `text_accuracy/<group>`: LongText-style text accuracy of the `--longtext` sets (`grpo_image.evaluation.longtext`).

The summary is each metric's mean over seeds with its spread (sample std, ddof=1, with 2+ seeds). Comparing two
models (`--compare`) pairs them seed by seed (same seeds, same prompts: the same sampling uniforms), so the delta
of a metric is computed per seed and its spread is the std of those per-seed deltas.
Outputs: eval.json (everything above), scores.jsonl (one line an image), eval.md, report.html, grids/.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from grpo_image.base.config import RecipeError, instantiate, reward_specs, validate_components
from grpo_image.evaluation.generate import generate_images, load_decoder, load_policy, load_prompt_set
from grpo_image.core.advantages import weighted_total
from grpo_image.base.image_files import folder_batches
from grpo_image.evaluation.longtext import TextBenchError, build_reader, read_text_prompts, score_folder, summarize
from grpo_image.core.types import PromptRecord
from grpo_image.scoring.score import score_images  # the trainer's reward rules


@dataclass
class PromptSet:
    name: str  # folder name and report heading (the file's stem)
    path: Path
    kind: str  # "rewards" (the recipe's rewards) or "text" (text accuracy)
    items: list[tuple[int, PromptRecord]]
    images: dict[tuple[str, int], Path] = field(default_factory=dict)  # (model, seed) -> folder


def prompt_sets(prompts: str | None, longtext: list[str]) -> list[PromptSet]:
    sets, names = [], set()
    for path, kind in [*([(prompts, "rewards")] if prompts else []), *[(p, "text") for p in longtext]]:
        path = Path(path)
        name = path.stem if path.stem not in names else f"{path.stem}_{len(names)}"
        names.add(name)
        items = load_prompt_set(path) if kind == "rewards" else read_text_prompts(path)
        sets.append(PromptSet(name, path, kind, items))
    if not sets:
        raise TextBenchError("nothing to evaluate: give --prompts FILE and/or --longtext FILE ...")
    return sets


def select_rewards(cfg: DictConfig, choice: list[str] | None) -> list[dict]:
    """The recipe's rewards, a subset of them by name, or the `rewards:` list of a YAML file (a recipe fragment)."""
    from grpo_image.base.config import load_recipe

    if choice and len(choice) == 1 and choice[0].endswith((".yaml", ".yml")):
        return reward_specs(load_recipe(choice[0]))
    specs = reward_specs(cfg)
    if not choice:
        return specs
    unknown = [name for name in choice if name not in {s["name"] for s in specs}]
    if unknown:
        raise RecipeError(f"--rewards: {unknown} not in the recipe's rewards {[s['name'] for s in specs]}")
    return [spec for spec in specs if spec["name"] in choice]


def score_rewards(specs: list[dict], rewards: list, items, folder: Path, *, batch_size: int, allow_missing: bool,
                  label: str) -> list[dict[str, Any]]:
    """Score every image of a folder with each reward; required/optional/NaN exactly as in training's workers."""
    weights = [spec["weight"] for spec in specs]
    rows, first = [], 0
    for batch, images in folder_batches(items, folder, batch_size, allow_missing, label):  # uint8 [b, H, W, 3]
        scores, _ = score_images(specs, rewards, images, [r.prompt for _, r, _ in batch],
                                 [r.metadata for _, r, _ in batch], first_row=first)  # [b, K], training's rules
        totals = weighted_total(scores, weights)  # [b]
        for (prompt_id, _, path), row, total in zip(batch, scores, totals):
            rows.append({"prompt_id": prompt_id, "file": path.name, "total": _number(total),
                         "scores": {s["name"]: _number(v) for s, v in zip(specs, row)}})
        first += len(batch)
    return rows


def reward_metrics(rows: list[dict], names: list[str]) -> dict[str, float | None]:
    metrics: dict[str, float | None] = {}
    for name in names:
        values = np.array([np.nan if r["scores"][name] is None else r["scores"][name] for r in rows], np.float64)
        metrics[f"reward/{name}"] = _number(np.nanmean(values)) if (~np.isnan(values)).any() else None
        metrics[f"reward/{name}/nan"] = int(np.isnan(values).sum())
    totals = [r["total"] for r in rows if r["total"] is not None]
    metrics["reward/total"] = float(np.mean(totals)) if totals else None
    return metrics


def spread(values: list[float | None]) -> dict[str, Any]:
    """Mean over seeds, sample std (None below 2 finite values), and the per-seed values."""
    finite = [v for v in values if v is not None]
    return {"mean": float(np.mean(finite)) if finite else None,
            "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else None, "per_seed": values}


def summarize_runs(runs: dict[str, dict[int, dict]], seeds: list[int]) -> dict[str, dict[str, dict]]:
    summary = {}
    for model, by_seed in runs.items():
        metrics = sorted({key for run in by_seed.values() for key in run})
        summary[model] = {key: spread([by_seed[s].get(key) for s in seeds]) for key in metrics}
    return summary


def compare(runs: dict[str, dict[int, dict]], seeds: list[int], before: str, after: str) -> dict[str, dict]:
    """Per metric: each model's mean over seeds, and the per-seed paired delta (after - before) with its spread."""
    out = {}
    for key in sorted(set(runs[before][seeds[0]]) & set(runs[after][seeds[0]])):
        if key.endswith("/nan"):
            continue
        deltas = [None if runs[after][s].get(key) is None or runs[before][s].get(key) is None
                  else runs[after][s][key] - runs[before][s][key] for s in seeds]
        d = spread(deltas)
        out[key] = {"before": spread([runs[before][s].get(key) for s in seeds])["mean"],
                    "after": spread([runs[after][s].get(key) for s in seeds])["mean"],
                    "delta": d["mean"], "delta_std": d["std"], "per_seed_delta": deltas}
    return out


def evaluate(cfg: DictConfig | None, sets: list[PromptSet], out: str | Path, *, checkpoint: str | None = None,
             compare_to: str | None = None, n: int = 4, seeds: list[int] | None = None, batch_size: int = 16,
             rewards: list[str] | None = None, images: list[str] | None = None, reader=None,
             allow_missing: bool = False, report_prompts: int = 12, recipe_path: str | None = None) -> dict:
    """Generate (unless `images` gives the folders), score, summarise; write every output into `out`."""
    from grpo_image.evaluation.report import write_reports

    out = Path(out)
    seeds = list(seeds) if seeds else [cfg.seed if cfg is not None else 0]
    models = _models(checkpoint, compare_to, images)
    specs = []
    if any(s.kind == "rewards" for s in sets):
        if cfg is None:
            raise RecipeError("scoring --prompts with rewards needs a recipe (its rewards, or --rewards)")
        specs = select_rewards(cfg, rewards)
        validate_components([s["scorer"] for s in specs], "rewards")
    scorers = [instantiate(spec["scorer"]) for spec in specs]  # built once and first: a bad one fails early
    if any(s.kind == "text" for s in sets) and reader is None:
        reader = build_reader()  # rapidocr
    if images is None:
        if cfg is None:
            raise RecipeError("generating images needs a recipe; to score existing images give --images DIR ...")
        validate_components(cfg.policy, "policy")
        validate_components(cfg.decoder, "decoder")
        _generate(cfg, sets, models, seeds, n, batch_size, out)
    else:
        if len(images) != len(sets):
            raise TextBenchError(f"--images: give one folder per prompt file ({len(sets)}), got {len(images)}")
        for s, folder in zip(sets, images):
            s.images = {("images", seeds[0]): Path(folder)}
        seeds = seeds[:1]  # a folder is one draw
    runs, rows = _score(sets, [label for label, _ in models], seeds, specs, scorers, reader, batch_size, allow_missing)
    before, after = (models[0][0], models[1][0]) if len(models) == 2 else (None, None)
    result = {
        "recipe": recipe_path, "n": n, "seeds": seeds,
        "models": {label: {"checkpoint": ckpt} for label, ckpt in models},
        "sets": {s.name: {"file": str(s.path), "kind": s.kind, "prompts": len(s.items),
                          "folders": {f"{m}/seed_{sd}": str(f) for (m, sd), f in s.images.items()}} for s in sets},
        "rewards": [{"name": s["name"], "weight": s["weight"]} for s in specs],
        "runs": {label: {str(seed): m for seed, m in by_seed.items()} for label, by_seed in runs.items()},
        "summary": summarize_runs(runs, seeds),
        "comparison": compare(runs, seeds, before, after) if before else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    with open(out / "scores.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_reports(result, sets, rows, out, report_prompts)
    return result


def _score(sets, labels, seeds, specs, scorers, reader, batch_size, allow_missing):
    """Every (model, seed)'s metrics, and one row an image."""
    runs: dict[str, dict[int, dict]] = {label: {} for label in labels}
    rows: list[dict] = []
    for label in labels:
        for seed in seeds:
            metrics, text_rows = {}, []
            for s in sets:
                folder, tag = s.images[(label, seed)], f"scoring {label} seed {seed} {s.name}"
                if s.kind == "rewards":
                    got = score_rewards(specs, scorers, s.items, folder, batch_size=batch_size,
                                        allow_missing=allow_missing, label=tag)
                    metrics.update(reward_metrics(got, [spec["name"] for spec in specs]))
                else:
                    got = score_folder(s.items, folder, reader, batch_size, allow_missing=allow_missing, label=tag)
                    text_rows += got
                rows += [{"model": label, "seed": seed, "set": s.name, **row} for row in got]
            if text_rows:
                metrics.update({f"text_accuracy/{k}": v for k, v in summarize(text_rows).items()})
            runs[label][seed] = metrics
    return runs, rows


def _models(checkpoint: str | None, compare_to: str | None, images: list[str] | None) -> list[tuple[str, str | None]]:
    """(label, checkpoint) of each model, the baseline first: `--compare base` is the recipe's own weights."""
    if images is not None:
        if compare_to is not None or checkpoint is not None:
            raise TextBenchError("--images scores existing folders: it takes neither --checkpoint nor --compare")
        return [("images", None)]
    if compare_to is None:
        return [("model", checkpoint)]
    before = None if compare_to == "base" else compare_to
    if before == checkpoint:
        raise TextBenchError("--compare names the same model as --checkpoint: nothing to compare")
    return [("before", before), ("after", checkpoint)]


def _generate(cfg, sets, models, seeds, n, batch_size, out: Path) -> None:
    from grpo_image.core.sampling import SamplingSettings, resolve_checkpoint_sampling

    for label, checkpoint in models:
        policy = load_policy(cfg, checkpoint)
        decoder = load_decoder(cfg, checkpoint)  # a run that trained the decoder decodes with its adapters
        resolve_checkpoint_sampling(cfg.sampling, policy)  # null keys: the first model's checkpoint's, kept for all
        settings = SamplingSettings.from_config(cfg.sampling)
        for seed in seeds:
            for s in sets:
                folder = out / "images" / label / f"seed_{seed}" / s.name
                generate_images(policy, decoder, settings, s.items, folder, n=n, seed=seed, batch_size=batch_size,
                                label=f"sampling {label} seed {seed} {s.name}", extra={"checkpoint": checkpoint})
                s.images[(label, seed)] = folder
        del policy, decoder


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
