"""Prompt set loading (txt / jsonl; errors name file and line) and the seeded, rank-aware group sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from grpo_image.training.data import GroupSampler, PromptSetError, load_prompts
from grpo_image.core.types import PromptRecord

REPO = Path(__file__).resolve().parents[1]


def _records(m: int) -> list[PromptRecord]:
    return [PromptRecord(prompt=f"p{i}", metadata={"i": i}) for i in range(m)]


def _indices(records: list[PromptRecord], group_size: int) -> list[int]:
    """The metadata index of each group's prompt (one entry per group)."""
    return [r.metadata["i"] for r in records[::group_size]]


# ---------------------------------------------------------------- loading


def test_txt_skips_blank_lines_and_gives_empty_metadata(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n   \n  a dog on a hill  \nlast line without newline", encoding="utf-8")
    records = load_prompts(path)
    assert records == [
        PromptRecord("a cat", {}),
        PromptRecord("a dog on a hill", {}),
        PromptRecord("last line without newline", {}),
    ]


def test_jsonl_reads_prompt_and_optional_metadata(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "a red square", "metadata": {"color": "#FF0000"}}\n'
        "\n"
        '{"prompt": "\\u732b"}\n',  # JSON escape for the CJK character U+732B
        encoding="utf-8",
    )
    records = load_prompts(str(path))
    assert records == [PromptRecord("a red square", {"color": "#FF0000"}), PromptRecord("\u732b", {})]


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"prompt": "x",}', "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"metadata": {}}', "'prompt' must be a non-empty string"),
        ('{"prompt": ""}', "'prompt' must be a non-empty string"),
        ('{"prompt": 3}', "'prompt' must be a non-empty string"),
        ('{"prompt": "x", "metadata": [1, 2]}', "'metadata' must be a JSON object"),
        ('{"prompt": "x", "metdata": {}}', "unknown key(s) ['metdata']"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, expected):
    # Line 1 is valid, line 2 blank, line 3 bad: the 1-based line number counts the blank line too.
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(PromptSetError) as info:
        load_prompts(path)
    message = str(info.value)
    assert f"{path}:3:" in message
    assert expected in message
    assert isinstance(info.value, ValueError)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(PromptSetError, match="nowhere.jsonl"):
        load_prompts(path)


def test_unknown_suffix_lists_supported_formats(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("a cat\n", encoding="utf-8")
    with pytest.raises(PromptSetError) as info:
        load_prompts(path)
    message = str(info.value)
    assert all(part in message for part in (".txt", ".jsonl", ".parquet", ".csv", "p.tsv"))


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_empty_prompt_set_is_an_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(PromptSetError, match=f"{name}.*empty"):
        load_prompts(path)


def test_shipped_tiny_colors_prompt_set():
    records = load_prompts(REPO / "prompts" / "tiny_colors.jsonl")
    # 8 colours x 3 phrasings; every prompt names its colour and is short (the tiny model reads bytes).
    assert len(records) == 24
    names = [r.metadata["color_name"] for r in records]
    assert set(names) == {"red", "lime", "blue", "yellow", "aqua", "fuchsia", "white", "black"}
    assert all(names.count(n) == 3 for n in set(names))
    for r in records:
        assert len(r.prompt) < 40
        assert r.metadata["color_name"] in r.prompt
        assert set(r.metadata) == {"color", "color_name"}


# ---------------------------------------------------------------- sampler


def test_sample_is_b_groups_of_g_contiguous_with_group_ids():
    records = _records(10)
    out, group_ids = GroupSampler(records, batch_size=3, group_size=4, seed=0).sample(0)
    assert len(out) == 12  # N = B * G = 3 * 4
    for g in range(3):
        assert len({id(r) for r in out[g * 4 : (g + 1) * 4]}) == 1  # one prompt record per group
    assert len({r.prompt for r in out[::4]}) == 3  # three distinct prompts (same epoch, no replacement)
    assert group_ids.dtype == torch.int64
    assert group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


def test_sample_follows_the_documented_epoch_permutations():
    # M = 5 records, B = 3: step 1 takes positions 3, 4, 5 of the concatenated epochs,
    # i.e. perm_0[3], perm_0[4] and then perm_1[0] (the first prompt of epoch 1).
    records = _records(5)
    perm0 = np.random.default_rng([7, 0]).permutation(5)
    perm1 = np.random.default_rng([7, 1]).permutation(5)
    out, _ = GroupSampler(records, batch_size=3, group_size=2, seed=7).sample(1)
    assert _indices(out, 2) == [perm0[3], perm0[4], perm1[0]]


def test_sample_depends_on_seed_and_step_alone():
    records = _records(24)
    a = GroupSampler(records, batch_size=4, group_size=2, seed=3)
    b = GroupSampler(records, batch_size=4, group_size=2, seed=3)
    for step in (0, 1, 2):  # advance `a`; a fresh sampler must still agree at step 5 (no hidden state)
        a.sample(step)
    out_a, ids_a = a.sample(5)
    out_b, ids_b = b.sample(5)
    assert out_a == out_b and torch.equal(ids_a, ids_b)
    assert _indices(a.sample(5)[0], 2) == _indices(out_a, 2)  # calling twice gives the same draw


def test_different_steps_and_seeds_draw_different_prompts():
    records = _records(24)
    sampler = GroupSampler(records, batch_size=4, group_size=2, seed=0)
    step0, step1 = _indices(sampler.sample(0)[0], 2), _indices(sampler.sample(1)[0], 2)
    assert not set(step0) & set(step1)  # consecutive steps of one epoch are disjoint
    other_seed = _indices(GroupSampler(records, batch_size=4, group_size=2, seed=1).sample(0)[0], 2)
    assert other_seed != step0


def test_each_epoch_visits_every_prompt_once_when_b_divides_the_count():
    records = _records(12)
    sampler = GroupSampler(records, batch_size=4, group_size=3, seed=11)
    epoch0 = [i for s in range(3) for i in _indices(sampler.sample(s)[0], 3)]  # steps 0..2 = 12 prompts
    epoch1 = [i for s in range(3, 6) for i in _indices(sampler.sample(s)[0], 3)]
    assert sorted(epoch0) == list(range(12))
    assert sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1  # a fresh permutation each epoch


def test_rank_slices_concatenate_to_the_single_process_batch():
    records = _records(10)
    full, full_ids = GroupSampler(records, batch_size=4, group_size=3, seed=5).sample(7)
    parts = [GroupSampler(records, batch_size=4, group_size=3, seed=5, rank=r, world_size=2).sample(7) for r in range(2)]
    assert len(parts[0][0]) == 6  # B/W * G = 2 * 3 records per rank
    assert parts[0][0] + parts[1][0] == full
    assert parts[1][1].tolist() == [2, 2, 2, 3, 3, 3]  # rank 1 holds global groups 2 and 3
    assert torch.equal(torch.cat([parts[0][1], parts[1][1]]), full_ids)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=3, group_size=2, world_size=2), "divisible by world_size"),
        (dict(batch_size=0, group_size=2), "batch_size"),
        (dict(batch_size=2, group_size=0), "group_size"),
        (dict(batch_size=2, group_size=2, rank=2, world_size=2), "rank"),
    ],
)
def test_sampler_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupSampler(_records(4), seed=0, **kwargs)


def test_jsonl_metadata_is_kept_as_written(tmp_path):
    # The loader keeps metadata exactly as written (no normalisation a reward could trip over).
    path = tmp_path / "p.jsonl"
    meta = {"color": [255, 0, 0], "nested": {"a": 1}}
    path.write_text(json.dumps({"prompt": "x", "metadata": meta}) + "\n", encoding="utf-8")
    assert load_prompts(path)[0].metadata == meta


def test_a_parquet_prompt_set_read_through_datasets_trains_like_the_same_prompts_in_jsonl(tmp_path):
    from datasets import Dataset

    from grpo_image.app.cli import main
    from grpo_image.base.logging import read_metrics
    from tests.test_cli_train import RECIPE, SMALL, comparable

    jsonl = Path(__file__).resolve().parents[1] / "prompts" / "tiny_colors.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    # a TRL-style table: the prompt under another name, metadata as plain columns, one column nobody reads
    table = [{"caption": r["prompt"], **r["metadata"], "source": "written"} for r in rows]
    Dataset.from_list(table).to_parquet(tmp_path / "colors.parquet")
    columns = ["data.prompt_column=caption", "data.metadata_columns=[color,color_name]"]
    from_jsonl, from_parquet = tmp_path / "jsonl", tmp_path / "parquet"
    assert main(["train", RECIPE, *SMALL, "steps=2", f"output_dir={from_jsonl}"]) == 0
    assert main(["train", RECIPE, *SMALL, "steps=2", f"data.prompts={tmp_path / 'colors.parquet'}", *columns,
                 f"output_dir={from_parquet}"]) == 0
    assert comparable(read_metrics(from_parquet / "metrics.jsonl")) == comparable(read_metrics(from_jsonl / "metrics.jsonl"))
    records = load_prompts(tmp_path / "colors.parquet", "caption", ["color"])
    assert records[0] == PromptRecord(rows[0]["prompt"], {"color": rows[0]["metadata"]["color"]})
    everything = load_prompts(tmp_path / "colors.parquet", "caption")  # every other column is metadata
    assert set(everything[0].metadata) == {"color", "color_name", "source"}


def test_a_datasets_source_without_the_named_column_is_refused_with_its_columns(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"caption": "a red square"}]).to_csv(tmp_path / "prompts.csv", index=False)
    with pytest.raises(PromptSetError, match=r"no column\(s\) \['prompt'\]; its columns are \['caption'\]"):
        load_prompts(tmp_path / "prompts.csv")
    assert load_prompts(tmp_path / "prompts.csv", "caption") == [PromptRecord("a red square", {})]
