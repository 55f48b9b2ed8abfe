"""Prompt datasets: the built-in task or local JSONL / Parquet files.

Each record has a prompt (a string, or a list of chat messages) and any extra fields; the
extra fields travel in `meta` to the reward. The chat template is applied once and prompts
are tokenized once, here; nothing downstream re-tokenizes text.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlsys.config import ConfigError, DataConfig


@dataclass
class Prompt:
    prompt_ids: list[int]
    text: str  # the templated prompt, for logs only
    meta: dict[str, Any]
    messages: list[dict]  # the chat messages (multi-turn rollouts extend the conversation)


def read_records(path: str | Path) -> list[dict]:
    """Rows of a .jsonl / .json (list) / .parquet file as dicts."""
    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except pa.ArrowException as e:
            raise ConfigError(f"{p}: not a readable Parquet file ({e})") from None
    if p.suffix == ".json":
        try:
            rows = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{p}:{e.lineno}: not valid JSON ({e.msg}); a .json data file holds one list "
                "of records (one record per line: name it .jsonl)"
            ) from None
        if not isinstance(rows, list):
            raise ConfigError(f"{p}: a .json data file must hold a list of records")
        return rows
    rows = []
    with open(p) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{p}:{i}: not valid JSON ({e.msg})") from None
    return rows


def to_messages(prompt: Any, system_prompt: str | None, where: str) -> list[dict]:
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
        return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + msgs
    if isinstance(prompt, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt
    ):
        return list(prompt)
    raise ConfigError(f"{where}: prompt must be a string or a list of {{role, content}} messages")


def tokenize_records(rows: list[dict], tokenizer: Any, cfg: DataConfig, where: str) -> list[Prompt]:
    """Apply the chat template once and tokenize (one batched call); fields other than the
    prompt go to meta. A prompt over `data.max_prompt_tokens` is a ConfigError naming the
    record, or, with `data.overlong_prompts=drop`, left out (the count goes to stderr)."""
    msgs = []
    for i, row in enumerate(rows):
        if cfg.prompt_key not in row:
            raise ConfigError(f"{where} record {i}: no '{cfg.prompt_key}' field (data.prompt_key)")
        msgs.append(to_messages(row[cfg.prompt_key], cfg.system_prompt, f"{where} record {i}"))
    texts = [
        tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs
    ]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out, dropped = [], 0
    for i, (row, m, text, x) in enumerate(zip(rows, msgs, texts, ids, strict=True)):
        if len(x) > cfg.max_prompt_tokens:
            if cfg.overlong_prompts == "drop":
                dropped += 1
                continue
            raise ConfigError(
                f"{where} record {i}: prompt has {len(x)} tokens, more than "
                f"data.max_prompt_tokens={cfg.max_prompt_tokens}; raise it, or set "
                "data.overlong_prompts=drop to leave such prompts out"
            )
        meta = {k: v for k, v in row.items() if k != cfg.prompt_key}
        out.append(Prompt(list(x), text, meta, m))
    if dropped:
        print(
            f"data: left out {dropped} of {len(rows)} prompts of {where} longer than "
            f"data.max_prompt_tokens={cfg.max_prompt_tokens} (data.overlong_prompts=drop)",
            file=sys.stderr,
        )
    return out


def load_splits(cfg: DataConfig, tokenizer: Any, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Train and eval prompts for a recipe's `data` section."""
    if cfg.task is not None:
        from rlsys.tasks import TASKS

        try:
            train, held = TASKS[cfg.task].make_task(
                cfg.num_train, cfg.num_eval, seed, **cfg.task_args
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"data.task_args for task '{cfg.task}': {e}") from None
        return (
            tokenize_records(train, tokenizer, cfg, f"task {cfg.task}"),
            tokenize_records(held, tokenizer, cfg, f"task {cfg.task} (eval)"),
        )
    assert cfg.path is not None
    rows = read_records(cfg.path)
    train = tokenize_records(rows, tokenizer, cfg, cfg.path)
    if not train:
        raise ConfigError(
            f"{cfg.path}: no records"
            if not rows
            else f"{cfg.path}: every prompt is longer than data.max_prompt_tokens="
            f"{cfg.max_prompt_tokens} (data.overlong_prompts=drop left none); raise it"
        )
    held = []
    if cfg.eval_path:
        held = tokenize_records(read_records(cfg.eval_path), tokenizer, cfg, cfg.eval_path)
    return train, held


class PromptStream:
    """Endless shuffled passes over the train prompts; `position` makes it resumable."""

    def __init__(self, prompts: list[Prompt], seed: int) -> None:
        self.prompts = prompts
        self.seed = seed
        self.position = 0  # prompts handed out so far
        self._epoch, self._idx = -1, list(range(len(prompts)))

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._idx = list(range(len(self.prompts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._idx)
            self._epoch = epoch
        return self._idx

    def next(self, n: int) -> list[Prompt]:
        out = []
        for _ in range(n):
            epoch, k = divmod(self.position, len(self.prompts))
            out.append(self.prompts[self._order(epoch)[k]])
            self.position += 1
        return out
