"""Async mode (rollout.mode: async): staleness bounded by k, and k = 0 equals the sync loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsys.config import load_recipe
from rlsys.controller import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

BASE = [
    "model.path=tiny-llama",
    "steps=4",
    "rollout.workers=2",
    "rollout.prompts_per_step=3",
    "rollout.n_samples_per_prompt=2",
    "rollout.max_new_tokens=8",
    "rollout.dtype=float32",
    "trainer.lr=1e-3",
    "trainer.autocast_bf16=false",
    # dense, so the policy moves every step (the arithmetic reward is 0 for every sample of
    # the random tiny model: zero advantages, and k = 0 would equal sync trivially)
    f"reward.fn={ROOT}/tests/assets/rewards.py:length_reward",
    "logging.wandb.mode=disabled",
    "logging.samples_every=1",
    "logging.samples_per_table=100",
]


def _run(tmp: Path, name: str, extra: list[str]) -> list[dict]:
    cfg = load_recipe(
        ROOT / "recipes" / "quickstart.yaml", [*BASE, *extra, f"logging.run_dir={tmp}/{name}"]
    )
    train(cfg)
    return [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]


def _samples(tmp: Path, name: str) -> list[tuple]:
    """(step, group, response) of every logged sample, from the samples table."""
    out = []
    for line in (tmp / name / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.append((row["step"], row["group"], row["response"]))
    return out


def test_async_staleness_bounded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for k in (1, 2):
        rows = _run(tmp_path, f"k{k}", ["rollout.mode=async", f"rollout.max_staleness={k}"])
        # one local node: the rollout workers generate on one thread beside the trainer
        assert "rollout workers 1 each (1 node(s))" in capsys.readouterr().out
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert all(r["rollout/staleness_max"] <= k for r in rows)
        assert max(r["rollout/staleness_max"] for r in rows) == k  # really ran ahead
        assert all(0 <= r["perf/trainer_idle_frac"] <= 1 for r in rows)


def test_staleness_zero_equals_sync_loop(tmp_path: Path) -> None:
    sync = _run(tmp_path, "sync", [])
    k0 = _run(tmp_path, "k0", ["rollout.mode=async", "rollout.max_staleness=0"])
    for a, b in zip(sync, k0, strict=True):
        assert a["reward/mean"] == b["reward/mean"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-6)
        assert a["train/grad_norm"] > 0  # each step updates the policy the next one samples
    assert _samples(tmp_path, "sync") == _samples(tmp_path, "k0")
