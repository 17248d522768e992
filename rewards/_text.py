"""Text targets and the two text metrics, shared by every reward that compares read-out text with a target.

One implementation, so that the OCR reward (whatever engine reads the image) and any evaluation scoring the same
text agree to the last digit. Both metrics first apply Unicode NFKC, which folds full-width letters, digits and
punctuation (`Ａ`, `１`, `，`) to their ASCII forms: OCR engines and VLMs disagree on which form they emit,
and a reward should not depend on that.

- `edit_reward`: flow_grpo's OCR reward. Both sides lower-cased with whitespace removed; 1 if the target is a
  substring of the recognised text, else `1 - min(levenshtein, len(target)) / len(target)`. Chinese compares
  characters (a Chinese string is a sequence of characters, so nothing else is needed).
- `text_accuracy`: LongText-Bench-style. Keep CJK characters, latin letters, digits and spaces; a target that
  contains CJK is compared as a multiset of characters (spaces ignored), otherwise as a multiset of lower-cased
  words; score = matched units / expected units.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any, Sequence

# CJK unified ideographs (with extension A) and compatibility ideographs.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_HAS_CJK = re.compile(f"[{_CJK}]")
# Applied after lower-casing: deleted (not replaced by a space), as LongText-Bench's scorer does, so "Single-Use" is
# one word; accented Latin letters (U+00C0..U+024F) are letters and stay.
_DROP = re.compile(f"[^{_CJK}a-z0-9\u00c0-\u024f\\s]")
# Straight double quotes, curly double quotes and CJK corner brackets: how prompts mark the text to render.
_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|「([^」]+)」|『([^』]+)』')

def normalize(text: str) -> str:
    """NFKC: full-width forms and compatibility characters to their canonical ASCII/CJK forms."""
    return unicodedata.normalize("NFKC", text)


def join_target(target: str | Sequence[str]) -> str:
    """A target given as several strings is read as one, in the given order."""
    return target if isinstance(target, str) else " ".join(target)


def quoted_spans(prompt: str) -> list[str]:
    """The quoted spans of a prompt, in order: `a sign that says "OPEN"` -> ["OPEN"]."""
    return [next(g for g in match.groups() if g is not None) for match in _QUOTED.finditer(prompt)]


def target_text(prompt: str, meta: dict[str, Any], key: str = "text") -> str | list[str] | None:
    """The text a sample should show: `meta[key]` (a string or a list of strings), else the prompt's quoted spans.

    None when there is neither (the sample has no text to check: its score is NaN, not 0).
    """
    if key in meta and meta[key] is not None:
        value = meta[key]
        if isinstance(value, str) or (
            isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        ):
            return value if isinstance(value, str) else list(value)
        raise ValueError(f"metadata[{key!r}] must be a string or a list of strings, got {value!r}")
    spans = quoted_spans(prompt)
    return spans or None


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


def _units(text: str, chinese: bool) -> Counter[str]:
    kept = _DROP.sub("", normalize(text).lower())
    if chinese:
        return Counter(ch for ch in kept if not ch.isspace())
    return Counter(kept.split())


def text_accuracy_counts(recognized: str, target: str | Sequence[str]) -> tuple[int, int]:
    """(matched units, expected units): the numerator and denominator of `text_accuracy`, for micro-averaging."""
    expected_text = join_target(target)
    chinese = bool(_HAS_CJK.search(normalize(expected_text)))
    expected = _units(expected_text, chinese)
    seen = _units(recognized, chinese)
    matched = sum((expected & seen).values())  # multiset intersection: min count per unit
    return matched, sum(expected.values())


def text_accuracy(recognized: str, target: str | Sequence[str]) -> float:
    """Matched / expected units in [0, 1]; NaN when the target has no letters, digits or CJK characters."""
    matched, expected = text_accuracy_counts(recognized, target)
    return matched / expected if expected else float("nan")


METRICS = {"edit": edit_reward, "accuracy": text_accuracy}
