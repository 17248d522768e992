"""The two text metrics and target extraction (rewards/_text.py) on hand-made English and Chinese cases, and the edit
reward against flow_grpo's OCR reward re-stated from its source."""

from __future__ import annotations

import math

import pytest

from rewards._text import edit_reward, quoted_spans, target_text, text_accuracy, text_accuracy_counts

# ---------------------------------------------------------------- edit reward (flow_grpo)


@pytest.mark.parametrize(
    "recognized, target, expected",
    [
        ("Hello World", "hello world", 1.0),  # both squash to "helloworld"
        ("A big sign: HELLO WORLD!!", "Hello World", 1.0),  # "helloworld" is a substring of "abigsign:helloworld!!"
        ("Helo World", "Hello World", 0.9),  # levenshtein("heloworld", "helloworld") = 1, over 10 letters
        ("hello world", "Hello, World", 1 - 1 / 11),  # punctuation is kept: "hello,world" has 11 chars, 1 edit
        ("", "abc", 0.0),  # 3 insertions, capped at len 3
        ("completely unrelated text", "abc", 0.0),  # distance far above 3, capped at 3: 1 - 3/3
        ("Hello", "Hello World", 0.5),  # 5 missing letters of 10
        ("Hello World", ["Hello", "World"], 1.0),  # a list target is read in order: "helloworld"
        ("你好世界", "你好世界", 1.0),
        ("你好世介", "你好世界", 0.75),  # one character substituted of 4
        ("你好", "你好世界", 0.5),  # two characters missing of 4
        ("ＨＥＬＬＯ\u3000ＷＯＲＬＤ", "hello world", 1.0),  # NFKC folds full-width letters and the ideographic space
        ("你好，世界", "你好,世界", 1.0),  # NFKC folds the full-width comma to ","
    ],
)
def test_edit_reward(recognized, target, expected):
    assert edit_reward(recognized, target) == pytest.approx(expected, abs=1e-12)  # one float64 division


def test_full_width_case_needs_nfkc():
    # The full-width comma case above is 1.0 only because of NFKC: raw, the strings are 1 edit apart (0.8).
    from rapidfuzz.distance import Levenshtein

    assert Levenshtein.distance("你好，世界", "你好,世界") == 1
    assert edit_reward("你好，世界", "你好,世界") == 1.0


@pytest.mark.parametrize("target", ["", "   ", []])
def test_edit_reward_empty_target_is_nan(target):
    assert math.isnan(edit_reward("anything", target))


def flow_grpo_ocr_reward(recognized: str, prompt: str) -> float:
    """flow_grpo's OcrScorer.__call__ for one image (yifan123/flow_grpo flow_grpo/ocr.py), re-stated: the target is
    `prompt.split('"')[1]`; both sides without spaces and lower-cased; distance 0 if the target is a substring, else
    the Levenshtein distance, capped at the target's length; reward 1 - distance / len(target). (Its recognised text
    joins PaddleOCR's boxes with "", which removing spaces makes the same as our engines' " ".)"""
    from rapidfuzz.distance import Levenshtein

    target = prompt.split('"')[1].replace(" ", "").lower()
    seen = recognized.replace(" ", "").lower()
    distance = 0 if target in seen else min(Levenshtein.distance(seen, target), len(target))
    return 1 - distance / len(target)


@pytest.mark.parametrize(
    "prompt, recognized",
    [
        ('a wall with "Hello World" painted on it', "Helo World"),  # 1 edit of 10
        ('a sign "OPEN" above a sign "CLOSED"', "OPEN"),  # several spans: flow_grpo reads the first
        ('a sign "OPEN" above a sign "CLOSED"', "CLOSED"),  # the second span read alone: 4 edits of "open" (0.0)
        ('a label "Café 50%"', "cafe 50%"),  # é and e differ by one substitution of 7 characters
        ('a mug "NO. 1 DAD"', "no 1 dad"),  # the full stop missing: 1 of 7
        ('a poster "GRPO"', "A POSTER THAT SAYS GRPO TODAY"),  # a substring: 1
        ('a poster "GRPO"', ""),  # nothing read: capped at the length, 0
        ('a sign "Ａ"', "Ａ"),  # the same full-width letter on both sides: 1 either way
    ],
)
def test_edit_reward_equals_flow_grpo_on_the_first_span(prompt, recognized):
    target = target_text(prompt, {}, spans="first_span")
    assert edit_reward(recognized, target) == pytest.approx(flow_grpo_ocr_reward(recognized, prompt), abs=1e-12)


def test_edit_reward_differs_from_flow_grpo_only_where_documented():
    # Full-width text read as ASCII: NFKC first here (1.0); flow_grpo compares code points, 4 substitutions of 4 (0.0).
    assert edit_reward("OPEN", target_text('a sign "ＯＰＥＮ"', {}, spans="first_span")) == 1.0
    assert flow_grpo_ocr_reward("OPEN", 'a sign "ＯＰＥＮ"') == 0.0
    # Curly quotes: read here; flow_grpo's split('"') finds no straight quote and fails on the prompt.
    assert edit_reward("OPEN", target_text("a sign “OPEN”", {}, spans="first_span")) == 1.0
    with pytest.raises(IndexError):
        flow_grpo_ocr_reward("OPEN", "a sign “OPEN”")
    # Every whitespace is removed here, only spaces there: a line break in a read-out costs flow_grpo one edit.
    assert edit_reward("OPEN\nLATE", "OPEN LATE") == 1.0
    assert flow_grpo_ocr_reward("OPEN\nLATE", 'a sign "OPEN LATE"') == pytest.approx(1 - 1 / 8)


# ---------------------------------------------------------------- LongText-style accuracy


@pytest.mark.parametrize(
    "recognized, target, expected",
    [
        ("the cat sat on the mat", "The cat sat on the mat", 1.0),  # 6 of 6 words
        ("the cat sat", "The cat sat on the mat", 0.5),  # the x1 (of 2), cat, sat: 3 of 6
        ("the the the the", "the cat", 0.5),  # "the" counts at most once: 1 of 2
        ("mat on sat cat the the", "the cat sat on the mat", 1.0),  # a multiset: order does not matter
        ("Hello, World!", "hello world", 1.0),  # punctuation dropped, case folded
        ("call 555 1234", "Call 555-1234", 0.5),  # "-" is deleted, as published: {call, 5551234}; only "call" read
        ("ＡＢＣ\u3000１２３", "abc 123", 0.0),  # no NFKC, as published: full-width letters are deleted
        ("hello", "hello world", 0.5),
        ("", "hello world", 0.0),
        ("你好世界", "你好世界", 1.0),  # Chinese compares characters: 4 of 4
        ("世界你好", "你好世界", 1.0),  # as a multiset
        ("你好你好", "你好世界", 0.5),  # 你 and 好 once each (of 2 read): 2 of 4
        ("你好，世界！", "你好世界", 1.0),  # punctuation dropped
        ("欢迎来到AI时代", "欢迎来到 AI 时代", 1.0),  # a CJK target compares characters; spaces ignored: 8 of 8
        ("欢迎来到时代", "欢迎来到 AI 时代", 0.75),  # A and I missing: 6 of 8
        ("欢迎来到ai时代", "欢迎来到 AI 时代", 0.75),  # Chinese mode keeps case, as published: a is not A
    ],
)
def test_text_accuracy(recognized, target, expected):
    assert text_accuracy(recognized, target) == pytest.approx(expected, abs=1e-12)  # one float64 division


def test_text_accuracy_counts_for_micro_averaging():
    assert text_accuracy_counts("the cat", "the cat sat") == (2, 3)
    assert text_accuracy_counts("你好", ["你好", "世界"]) == (2, 4)  # list items are read together
    # Micro-average over two samples: (2 + 2) / (3 + 4) = 4/7, not the mean of 2/3 and 1/2.
    pairs = [("the cat", "the cat sat"), ("你好", "你好世界")]
    matched, expected = map(sum, zip(*(text_accuracy_counts(r, t) for r, t in pairs)))
    assert matched / expected == pytest.approx(4 / 7)  # integer counts: the same float64 division


def test_text_accuracy_without_units_is_nan():
    assert math.isnan(text_accuracy("anything", "!!! ..."))


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize(
    "prompt, spans",
    [
        ('a neon sign that says "OPEN 24 HOURS" above a door', ["OPEN 24 HOURS"]),
        ('two signs: "A" and "B"', ["A", "B"]),
        ("a poster with “欢迎光临” and 「特价」", ["欢迎光临", "特价"]),
        ("a plain landscape", []),
        ('an unmatched "quote', []),
        ('“curly” then "straight" then 「corner」', ["curly", "straight", "corner"]),  # in the order they appear
    ],
)
def test_quoted_spans(prompt, spans):
    assert quoted_spans(prompt) == spans


@pytest.mark.parametrize(
    "prompt, first, every",
    [
        ('two signs: "A" and "B"', "A", ["A", "B"]),
        ("a poster with “欢迎光临” and 「特价」", "欢迎光临", ["欢迎光临", "特价"]),
        ('a sign "ＳＡＬＥ" and "５０％"', "ＳＡＬＥ", ["ＳＡＬＥ", "５０％"]),  # kept as written: the metric normalises
        ("a plain landscape", None, None),
    ],
)
def test_target_first_span_or_all_spans(prompt, first, every):
    assert target_text(prompt, {}, spans="first_span") == first
    assert target_text(prompt, {}, spans="all_spans") == every
    # metadata is the prompt set's explicit target: read whole whatever `spans` says
    assert target_text(prompt, {"text": ["x", "y"]}, spans="first_span") == ["x", "y"]
    with pytest.raises(ValueError, match="spans"):
        target_text(prompt, {}, spans="second_span")


def test_target_text_prefers_metadata_then_quotes():
    assert target_text('a sign "IGNORED"', {"text": "Sale"}) == "Sale"
    assert target_text("x", {"text": ["Sale", "50%"]}) == ["Sale", "50%"]
    assert target_text('a sign "OPEN"', {}) == ["OPEN"]
    assert target_text('a sign "OPEN"', {"text": None}) == ["OPEN"]
    assert target_text("no text here", {}) is None
    assert target_text("x", {"caption": "Hi"}, key="caption") == "Hi"
    with pytest.raises(ValueError, match="string or a list of strings"):
        target_text("x", {"text": 5})
