"""LongText-Bench: the text-accuracy metric by hand, the published file format, image names, the score table.

The metric is the one the OCR reward uses, reached the way eval reaches it: through its reader's `text_counts`
(the OCR reward's, built from text_readers.yaml). Images are rendered with system fonts and read for real by
rapidocr's shipped models, or by a reader with canned answers where the test is about the arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from grpo_image.evaluation import longtext
from grpo_image.base.image_files import find_images, image_name
from tests.helpers_eval import RECIPE, SMALL, cli, write_jsonl

READER = longtext.build_reader()  # the default reader: the OCR reward with rapidocr


def METRIC(read: str, target, lang: str | None = None) -> tuple[int, int]:
    return READER.text_counts(read, target, lang)
DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
WQY = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"

EN = [  # the published format, key for key (X-Omni textbench/text_prompts.jsonl), with prompt ids that skip
    {"category": "sign", "length": "short", "prompt": 'A shop sign that reads "OPEN DAILY".',
     "text": ["OPEN DAILY"], "text_length": 2, "prompt_id": 0},
    {"category": "poster", "length": "long", "prompt": 'A poster: "SUMMER SALE" over "FIFTY PERCENT OFF".',
     "text": ["SUMMER SALE", "FIFTY PERCENT OFF"], "text_length": 5, "prompt_id": 7},
    {"category": "label", "length": "short", "prompt": 'A bottle labelled "FRESH MILK".',
     "text": ["FRESH MILK"], "text_length": 2, "prompt_id": 123},
]
ZH = [
    {"category": "sign", "length": "short", "prompt": "面包店招牌写着“新鲜面包”",
     "text": ["新鲜面包"], "text_length": 4, "prompt_id": 0},
    {"category": "print", "length": "short", "prompt": "贺卡上写着“生日快乐”", "text": ["生日快乐"],
     "text_length": 4, "prompt_id": 5},
]


def test_text_accuracy_english_compares_lower_cased_word_multisets():
    # Target units: {fresh: 2, bread: 1, daily: 1} = 4 words; the list is read as one text.
    assert METRIC("FRESH bread", ["Fresh Bread", "Daily Fresh"]) == (2, 4)  # fresh 1 of 2, bread 1 of 1
    assert METRIC("fresh FRESH fresh bread daily", ["Fresh Bread", "Daily Fresh"]) == (4, 4)  # a 3rd fresh: no extra
    assert METRIC("world hello", "hello world") == (2, 2)  # order does not matter
    assert METRIC("Hello, World!", "hello world") == (2, 2)  # case and punctuation at word edges do not matter
    assert METRIC("helloworld", "hello world") == (0, 2)  # words, not letters
    assert METRIC("", "hello world") == (0, 2)


def test_text_accuracy_chinese_compares_character_multisets():
    # "中央公园 - 2公里" keeps 中 央 公 园 2 公 里: 7 units, 公 twice; spaces and the dash are dropped.
    target = "中央公园 - 2公里"
    assert METRIC("中央公园2公里", target) == (7, 7)
    assert METRIC("里公2园公央中", target) == (7, 7)  # order does not matter
    assert METRIC("中央公园", target) == (4, 7)  # one 公 read: one of the two counts
    assert METRIC("公园公园", target) == (3, 7)  # 公 twice (2 of 2), 园 twice but 1 expected (1 of 1)
    assert METRIC("中央公园２公里", target) == (6, 7)  # full-width ２ is not 2: deleted, as the published scorer does


def test_latin_letters_inside_chinese_targets_keep_their_case_as_published():
    # Target "欢迎来到ABC咖啡馆" in Chinese mode keeps 欢 迎 来 到 A B C 咖 啡 馆: 10 units, case as written.
    target = "欢迎来到ABC咖啡馆"
    assert METRIC("欢迎来到ABC咖啡馆", target) == (10, 10)
    assert METRIC("欢迎来到abc咖啡馆", target) == (7, 10)  # a, b, c are not A, B, C in Chinese mode: 7 of 10
    assert METRIC("欢迎来到Abc咖啡馆", target) == (8, 10)
    folded = longtext.build_reader(node={"_component_": "rewards.ocr.OCR", "case_fold": True})
    assert folded.text_counts("欢迎来到abc咖啡馆", target, None) == (10, 10)  # the case-folded variant, an option
    # English mode folds case: one word "abc" in both
    assert METRIC("welcome to abc", "Welcome to ABC") == (3, 3)
    # A LongText file is scored in one language: a Latin-only target of the Chinese file counts characters
    assert METRIC("ABC", "ABC", "zh") == (3, 3) and METRIC("ab", "ABC", "zh") == (0, 3)


def test_only_the_published_accented_letters_are_kept():
    # é and ç are kept (the scorer's list), ñ and á are deleted: "niño" -> "nio", "café" stays, "ça" stays
    assert METRIC("nio cafe ça", "niño café ça") == (2, 3)  # nio and ça match, cafe is not café


def test_micro_average_by_language_category_and_length():
    rows = [  # per image: matched / expected units
        {"lang": "en", "category": "sign", "length": "short", "matched": 3, "expected": 4},
        {"lang": "en", "category": "poster", "length": "long", "matched": 1, "expected": 6},
        {"lang": "zh", "category": "sign", "length": "short", "matched": 5, "expected": 10},
    ]
    summary = longtext.summarize(rows)
    # each is a ratio of integer counts, one float64 division: pytest.approx's default relative 1e-6 is all slack
    assert summary["en"] == pytest.approx(4 / 10)  # (3 + 1) / (4 + 6): not the mean of 0.75 and 0.167
    assert summary["all"] == pytest.approx(9 / 20)
    assert summary["en/sign"] == pytest.approx(3 / 4) and summary["en/long"] == pytest.approx(1 / 6)
    assert summary["zh/short"] == pytest.approx(0.5) and "zh/long" not in summary
    table = longtext.table({"model": summary})
    assert "| model | lang | overall | short | long | poster | sign |" in table
    assert "| model | en | 0.4000 | 0.7500 | 0.1667 | 0.1667 | 0.7500 |" in table


def test_every_hallucination_phrase_is_removed():
    # The published clean-up keeps only its last replacement, so "addCriterion" would stay and count as a word.
    raw = "addCriterion\nOPEN DAILY\nNo text recognized."
    assert longtext.clean_reading(raw) == "OPEN DAILY"
    assert longtext.clean_reading("No text recognized") == ""


def test_reads_the_published_format_and_names_images_as_the_benchmark(tmp_path):
    path = write_jsonl(tmp_path / "text_prompts.jsonl", EN)
    assert longtext.is_longtext_file(path)
    items = longtext.read_longtext(path)
    assert [i for i, _ in items] == [0, 7, 123]
    assert items[1][1].metadata == {"text": ["SUMMER SALE", "FIFTY PERCENT OFF"], "lang": "en", "category": "poster",
                                    "length": "long", "text_length": 5, "prompt_id": 7}
    assert longtext.read_longtext(write_jsonl(tmp_path / "zh.jsonl", ZH))[0][1].metadata["lang"] == "zh"
    assert image_name(0, 1) == "0000_1.png" and image_name(199, 4) == "0199_4.png"
    broken = write_jsonl(tmp_path / "broken.jsonl", [EN[0], {k: v for k, v in EN[1].items() if k != "text"}])
    with pytest.raises(longtext.TextBenchError, match=r"broken.jsonl:2: .*missing \['text'\]"):
        longtext.read_longtext(broken)


def test_sample_writes_four_images_per_prompt_id(tmp_path):
    prompts = write_jsonl(tmp_path / "text_prompts.jsonl", EN)
    assert cli("sample", RECIPE, *SMALL, "--prompts", prompts, "--out", tmp_path / "out") == 0
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == sorted(f"{i:04d}_{k}.png" for i in (0, 7, 123) for k in (1, 2, 3, 4))
    manifest = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert {(row["prompt_id"], row["k"]) for row in manifest} == {(i, k) for i in (0, 7, 123) for k in (1, 2, 3, 4)}


def render(lines: list[str], font: str, width: int = 320) -> np.ndarray:
    image = Image.new("RGB", (width, 160), (245, 240, 230))
    draw = ImageDraw.Draw(image)
    face = ImageFont.truetype(font, 30)
    for i, line in enumerate(lines):
        draw.text(((width - draw.textlength(line, font=face)) / 2, 30 + 50 * i), line, fill=(20, 20, 60), font=face)
    return np.asarray(image)


def save(folder: Path, name: str, image: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / name)


def test_scores_a_folder_from_another_tool_with_real_ocr(tmp_path):
    """rapidocr reads these renderings exactly (pinned below), so every number follows by hand."""
    for font in (DEJAVU, WQY):
        if not Path(font).exists():
            pytest.fail(f"missing {font}: `make test` installs fonts-dejavu-core and fonts-wqy-microhei")
    en_dir, zh_dir = tmp_path / "en", tmp_path / "zh"
    save(en_dir, "0_1.png", render(["OPEN DAILY"], DEJAVU))  # unpadded ids are read too: 2/2
    save(en_dir, "0000_2.png", render(["OPEN"], DEJAVU))  # 1/2
    save(en_dir, "0007_1.png", render(["SUMMER SALE", "FIFTY PERCENT OFF"], DEJAVU))  # 5/5
    save(en_dir, "0123.png", render(["FRESH JUICE"], DEJAVU, width=400))  # another size; fresh of {fresh, milk}: 1/2
    save(en_dir, "cover.png", render(["COVER"], DEJAVU))  # belongs to no prompt: ignored
    save(zh_dir, "0000_1.png", render(["新鲜面包"], WQY))  # 4/4
    save(zh_dir, "0005_1.png", render(["生日"], WQY))  # 2/4
    en, zh = write_jsonl(tmp_path / "text_prompts.jsonl", EN), write_jsonl(tmp_path / "text_prompts_zh.jsonl", ZH)
    found, unmatched = find_images(en_dir, [0, 7, 123])
    assert [p.name for p in found[0]] == ["0_1.png", "0000_2.png"] and [p.name for p in unmatched] == ["cover.png"]
    out = tmp_path / "eval"
    assert cli("eval", "--longtext", en, zh, "--images", en_dir, zh_dir, "--out", out) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {row["file"]: row["read"] for row in rows}["0007_1.png"] == "SUMMER SALE FIFTY PERCENT OFF"
    summary = {k: v["mean"] for k, v in json.loads((out / "eval.json").read_text())["summary"]["images"].items()}
    # ratios of integer counts (one float64 division each): pytest.approx's default relative 1e-6 is all slack
    assert summary["text_accuracy/en"] == pytest.approx(9 / 11)  # (2 + 1 + 5 + 1) / (2 + 2 + 5 + 2)
    assert summary["text_accuracy/en/short"] == pytest.approx(4 / 6)  # prompts 0 and 123
    assert summary["text_accuracy/en/long"] == pytest.approx(1.0)
    assert summary["text_accuracy/en/sign"] == pytest.approx(3 / 4)
    assert summary["text_accuracy/en/label"] == pytest.approx(1 / 2)
    assert summary["text_accuracy/zh"] == pytest.approx(6 / 8)
    assert summary["text_accuracy/all"] == pytest.approx(15 / 19)
    markdown = (out / "eval.md").read_text(encoding="utf-8")
    assert "| model | lang | overall | short | long | label | poster | print | sign |" in markdown
    assert "| images | en | 0.8182 | 0.6667 | 1.0000 | 0.5000 | 1.0000 | - | 0.7500 |" in markdown
    assert "| images | zh | 0.7500 | 0.7500 | - | - | - | 0.5000 | 1.0000 |" in markdown
    assert (out / "report.html").is_file()


def test_reader_from_config_missing_images_and_clean_up(tmp_path):
    answers = ["addCriterion OPEN DAILY No text recognized.", "SUMMER SALE"]
    config = tmp_path / "reader.yaml"
    config.write_text(f"_component_: tests.helpers_eval.CannedReader\ntexts: {json.dumps(answers)}\n")
    images = tmp_path / "images"
    save(images, "0000_1.png", np.zeros((8, 8, 3), np.uint8))  # marker 0: answers[0]
    save(images, "0007_1.png", np.ones((8, 8, 3), np.uint8))  # marker 1: answers[1]
    prompts = write_jsonl(tmp_path / "text_prompts.jsonl", EN)
    # Prompt 123 has no image: refused, naming it, unless missing images are allowed.
    assert cli("eval", "--longtext", prompts, "--images", images, "--ocr-config", config, "--out", tmp_path / "a") == 2
    out = tmp_path / "b"
    assert cli("eval", "--longtext", prompts, "--images", images, "--ocr-config", config, "--out", out,
               "--allow-missing") == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [row["read"] for row in rows] == ["OPEN DAILY", "SUMMER SALE"]
    summary = json.loads((out / "eval.json").read_text())["summary"]["images"]
    assert summary["text_accuracy/en"]["mean"] == pytest.approx((2 + 2) / (2 + 5))  # integer counts: approx's 1e-6 is slack


def test_missing_image_message_names_the_prompt(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "text_prompts.jsonl", EN)
    (tmp_path / "empty").mkdir()
    assert cli("eval", "--longtext", prompts, "--images", tmp_path / "empty", "--out", tmp_path / "o") == 2
    assert "3 of 3 prompts have no image (e.g. prompt_id 0: expected 0000_1.png)" in capsys.readouterr().err


def test_vlm_reader_asks_the_benchmark_question(tmp_path):
    """--ocr vlm: one request an image to an OpenAI-compatible server, with the benchmark's question."""
    from tests.rewards_servers import ChatServer, Reply, completion

    images = tmp_path / "images"
    for k, marker in ((1, 0), (2, 1)):
        save(images, f"0000_{k}.png", np.full((8, 8, 3), marker, np.uint8))
    answers = {0: "OPEN DAILY\naddCriterion", 1: "No text recognized."}  # Qwen2.5-VL's habits
    prompts = write_jsonl(tmp_path / "text_prompts.jsonl", EN[:1])
    with ChatServer(lambda seen, hit: Reply(completion(answers[int(seen.image[0, 0, 0])]))) as server:
        out = tmp_path / "out"
        assert cli("eval", "--longtext", prompts, "--images", images, "--ocr", "vlm", "--out", out,
                   "--ocr-option", f"base_url={server.base_url}",
                   "--ocr-option", "model=Qwen/Qwen2.5-VL-7B-Instruct") == 0
    assert not server.errors and len(server.seen) == 2
    question = ("Recognize the text in the image, only reply with the text content, but avoid repeating previously "
                "mentioned content. If no text is recognized, please reply with 'No text recognized'.")
    assert {seen.text for seen in server.seen} == {question}  # LongText-Bench's question, word for word
    assert server.seen[0].body["model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and server.seen[0].body["max_tokens"] == 1024
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [row["read"] for row in rows] == ["OPEN DAILY", ""]
    summary = json.loads((out / "eval.json").read_text())["summary"]["images"]
    assert summary["text_accuracy/en"]["mean"] == pytest.approx(2 / 4)  # 2 of 2 words, then 0 of 2: exact counts
