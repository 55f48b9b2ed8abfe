"""Prompt loading: JSONL / Parquet with extra fields, chat template applied once."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlsys.config import ConfigError, DataConfig
from rlsys.data import PromptStream, load_splits


def _rows() -> list[dict]:
    return [
        {"prompt": "What is 2 + 3?", "answer": 5, "source": "a"},
        {"prompt": [{"role": "user", "content": "What is 4 + 4?"}], "answer": 8, "source": "b"},
    ]


def test_jsonl_with_extra_fields(tmp_path: Path, tiny_tokenizer) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
    train, held = load_splits(DataConfig(task=None, path=str(p)), tiny_tokenizer, seed=0)
    assert held == []
    assert [t.meta for t in train] == [{"answer": 5, "source": "a"}, {"answer": 8, "source": "b"}]
    expect = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert train[0].text == expect
    assert train[0].prompt_ids == tiny_tokenizer(expect, add_special_tokens=False)["input_ids"]


def test_parquet_and_system_prompt(tmp_path: Path, tiny_tokenizer) -> None:
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "hi there", "answer": 1}]), p)
    cfg = DataConfig(task=None, path=str(p), prompt_key="q", system_prompt="Be brief.")
    train, _ = load_splits(cfg, tiny_tokenizer, seed=0)
    assert "Be brief." in train[0].text and "hi there" in train[0].text
    assert train[0].meta == {"answer": 1}


def test_prompt_too_long_and_missing_field(tmp_path: Path, tiny_tokenizer) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "x " * 500}) + "\n")
    with pytest.raises(ConfigError, match="more than data.max_prompt_tokens=256"):
        load_splits(DataConfig(task=None, path=str(p)), tiny_tokenizer, seed=0)
    p.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(ConfigError, match="no 'prompt' field"):
        load_splits(DataConfig(task=None, path=str(p)), tiny_tokenizer, seed=0)


def test_overlong_prompts_drop(tmp_path: Path, tiny_tokenizer, capsys) -> None:
    """`data.overlong_prompts=drop` leaves out exactly the prompts over the limit (order and
    meta of the rest kept) and says how many; none left is an error naming the fix."""
    from rlsys.config import load_recipe

    p = tmp_path / "d.jsonl"
    rows = [{"prompt": "hi", "id": 0}, {"prompt": "x " * 500, "id": 1}, {"prompt": "yo", "id": 2}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match="record 1: prompt has .* data.overlong_prompts=drop"):
        load_splits(DataConfig(task=None, path=str(p)), tiny_tokenizer, seed=0)
    cfg = DataConfig(task=None, path=str(p), overlong_prompts="drop")
    train, _ = load_splits(cfg, tiny_tokenizer, seed=0)
    assert [t.meta["id"] for t in train] == [0, 2]
    assert all(0 < len(t.prompt_ids) <= 256 for t in train)
    assert "left out 1 of 3 prompts" in capsys.readouterr().err
    p.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(ConfigError, match="every prompt is longer than data.max_prompt_tokens"):
        load_splits(cfg, tiny_tokenizer, seed=0)
    with pytest.raises(ConfigError, match="'skip' is not one of error, drop"):
        load_recipe(None, ["data.overlong_prompts=skip"])


def test_batched_tokenization_equals_one_by_one(tmp_path: Path, tiny_tokenizer) -> None:
    """The batched tokenizer call gives each prompt the ids a call of its own would."""
    p = tmp_path / "d.jsonl"
    words = ["alpha", "beta 12", "gamma, delta!", "3 + 4 =", "ünïcode ✓"]
    p.write_text(
        "".join(json.dumps({"prompt": " ".join(words[: i % 5 + 1])}) + "\n" for i in range(12))
    )
    train, _ = load_splits(DataConfig(task=None, path=str(p)), tiny_tokenizer, seed=3)
    assert len(train) == 12
    assert len({len(t.prompt_ids) for t in train}) > 1  # not all the same length
    for t in train:
        assert t.prompt_ids == tiny_tokenizer(t.text, add_special_tokens=False)["input_ids"]


def test_builtin_task_and_stream_cycles_deterministically(tiny_tokenizer) -> None:
    cfg = DataConfig(task="arithmetic", num_train=5, num_eval=3)
    train, held = load_splits(cfg, tiny_tokenizer, seed=1)
    assert len(train) == 5 and len(held) == 3 and "answer" in train[0].meta
    s1, s2 = PromptStream(train, seed=1), PromptStream(train, seed=1)
    first = [p.text for p in s1.next(7)]
    assert first == [p.text for p in s2.next(7)]
    assert sorted(first[:5]) == sorted(p.text for p in train)  # one full epoch, then more
    assert s1.position == 7
