"""Text targets and the two text metrics, shared by every reward that compares read-out text with a target.

One implementation, so that the OCR reward (whatever engine reads the image) and the LongText evaluation, which
asks its reader for these counts, agree to the last digit.

- `target_text`: what a sample should show: `metadata["text"]`, else the prompt's quoted spans, all of them joined
  (`all_spans`) or the first only (`first_span`, flow_grpo's `prompt.split('"')[1]`, which reads straight quotes
  only: curly quotes and CJK brackets count here too).
- `edit_reward`: flow_grpo's OCR reward (flow_grpo/ocr.py), with one deliberate difference: Unicode NFKC first (OCR
  engines and VLMs disagree on whether they emit full-width `Ａ`, `１`, `，` or ASCII, and a reward should not depend
  on that; flow_grpo compares code points, so `ＯＰＥＮ` read as `OPEN` scores 0 there and 1 here). Both sides
  lower-cased with whitespace removed (flow_grpo removes spaces only); 1 if the target is a substring of the
  recognised text, else `1 - min(levenshtein, len(target)) / len(target)`. Chinese compares characters.
- `text_accuracy`: LongText-Bench's published metric (X-Omni `textbench/summary_scores.py`), character for character
  and without NFKC, so that a score can be compared with the paper's table. Every character but CJK ideographs
  (U+4E00..U+9FA5), ASCII letters and digits, whitespace and the French accented letters àâäéèêëîïôöùûüç (and
  capitals) is deleted. English compares lower-cased words as multisets; Chinese compares the kept characters as a
  multiset, *not* lower-cased (the published Chinese mode: "ABC" read as "abc" counts 0 of 3; `case_fold=True`
  folds them, a variant for those who want it). The language is the target's (`grpo_image.core.types.text_language`)
  unless given; score = matched units / expected units, micro-averaged over samples by whoever sums the counts.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any, Sequence

from grpo_image.core.types import CJK, text_language

_ACCENTS = "àâäéèêëîïôöùûüçÀÂÄÉÈÊËÎÏÔÖÙÛÜÇ"  # the accented letters LongText-Bench's scorer keeps
# Deleted, not replaced by a space, as the published scorer does: "Single-Use" is one word.
_DROP_EN = re.compile(f"[^{CJK}a-zA-Z0-9\\s{_ACCENTS}]")
_UNIT_ZH = re.compile(f"[{CJK}a-zA-Z0-9{_ACCENTS}]")
# Straight double quotes, curly double quotes and CJK corner brackets: how prompts mark the text to render.
_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|「([^」]+)」|『([^』]+)』')
SPANS = ("first_span", "all_spans")  # which quoted spans of a prompt are the target


def normalize(text: str) -> str:
    """NFKC: full-width forms and compatibility characters to their canonical ASCII/CJK forms."""
    return unicodedata.normalize("NFKC", text)


def join_target(target: str | Sequence[str]) -> str:
    """A target given as several strings is read as one, in the given order."""
    return target if isinstance(target, str) else " ".join(target)


def quoted_spans(prompt: str) -> list[str]:
    """The quoted spans of a prompt, in order: `a sign that says "OPEN"` -> ["OPEN"]."""
    return [next(g for g in match.groups() if g is not None) for match in _QUOTED.finditer(prompt)]


def target_text(
    prompt: str, meta: dict[str, Any], key: str = "text", spans: str = "all_spans"
) -> str | list[str] | None:
    """The text a sample should show: `meta[key]` (a string or a list of strings, all of it), else the prompt's quoted
    spans (`spans`: "all_spans" in order, or "first_span").

    None when there is neither (the sample has no text to check: its score is NaN, not 0).
    """
    if key in meta and meta[key] is not None:
        value = meta[key]
        if isinstance(value, str) or (
            isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        ):
            return value if isinstance(value, str) else list(value)
        raise ValueError(f"metadata[{key!r}] must be a string or a list of strings, got {value!r}")
    if spans not in SPANS:
        raise ValueError(f"spans must be one of {SPANS}, got {spans!r}")
    found = quoted_spans(prompt)
    if not found:
        return None
    return found[0] if spans == "first_span" else found


def _squash(text: str) -> str:
    return "".join(normalize(text).lower().split())


def edit_reward(recognized: str, target: str | Sequence[str]) -> float:
    """flow_grpo's OCR reward in [0, 1]; NaN when the target has no characters left after normalisation."""
    from rapidfuzz.distance import Levenshtein

    expected = _squash(join_target(target))
    seen = _squash(recognized)
    if not expected:
        return float("nan")
    if expected in seen:
        return 1.0
    distance = min(Levenshtein.distance(seen, expected), len(expected))
    return 1.0 - distance / len(expected)


def _units(text: str, lang: str, case_fold: bool) -> Counter[str]:
    if lang == "en":
        return Counter(_DROP_EN.sub("", text).lower().split())
    kept = "".join(_UNIT_ZH.findall(text))
    return Counter(kept.lower() if case_fold else kept)


def text_accuracy_counts(
    recognized: str, target: str | Sequence[str], lang: str | None = None, case_fold: bool = False
) -> tuple[int, int]:
    """(matched units, expected units) of LongText-Bench's metric: the numerator and denominator of `text_accuracy`.

    `lang` ('en' words, 'zh' characters) defaults to the target's language; `case_fold` lower-cases Chinese mode too.
    """
    expected_text = join_target(target)
    lang = lang or text_language(expected_text)
    expected = _units(expected_text, lang, case_fold)
    seen = _units(recognized, lang, case_fold)
    matched = sum((expected & seen).values())  # multiset intersection: min count per unit
    return matched, sum(expected.values())


def text_accuracy(recognized: str, target: str | Sequence[str]) -> float:
    """Matched / expected units in [0, 1]; NaN when the target has no letters, digits or CJK characters."""
    matched, expected = text_accuracy_counts(recognized, target)
    return matched / expected if expected else float("nan")


METRICS = {"edit": edit_reward, "accuracy": text_accuracy}
