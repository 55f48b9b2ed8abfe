"""A rollout worker killed mid-generation: Ray restarts it, it gets the current weights, its
prompts are issued again, and every group is trained exactly once.

The kill is real (SIGKILL of the worker process) and lands inside a `generate` call: the
recipe's reward (tests/assets/rewards.py:crash_once) kills its own process the first time it
sees a marker file, which the test creates once step 1 has been logged. The faulty run is
compared with an identical run without the kill: same seeds, so if the restarted worker holds
the right weights and the re-issued call the same prompts, every sample is the same.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
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
    "rollout.prompts_per_step=4",
    "rollout.n_samples_per_prompt=2",
    "rollout.max_new_tokens=8",
    "rollout.dtype=float32",
    "trainer.lr=1e-3",
    "trainer.autocast_bf16=false",
    f"reward.fn={ROOT}/tests/assets/rewards.py:crash_once",
    "logging.wandb.mode=disabled",
    "logging.samples_every=1",
    "logging.samples_per_table=100",
    "sync.timeout_s=30",
]


def _run(tmp: Path, name: str, extra: list[str], kill_after_step: int | None = None):
    marker = tmp / f"{name}.kill"
    cfg = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [*BASE, *extra, f"logging.run_dir={tmp}/{name}", f"reward.kwargs.marker={marker}"],
    )
    metrics = tmp / name / "metrics.jsonl"
    stop = threading.Event()

    def arm() -> None:  # create the marker once step `kill_after_step` is logged
        while not stop.is_set():
            if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after_step:
                marker.touch()
                return
            time.sleep(0.05)

    if kill_after_step is not None:
        threading.Thread(target=arm, daemon=True).start()
    try:
        summary = train(cfg)
    finally:
        stop.set()
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    samples = [json.loads(x) for x in (tmp / name / "samples.jsonl").read_text().splitlines()]
    killed = Path(str(marker) + ".taken").exists()
    return summary, rows, [(s["step"], s["group"], s["response"]) for s in samples], killed


@pytest.mark.parametrize("mode", ["sync", "partial", "async"])
def test_worker_killed_mid_generation(tmp_path: Path, mode: str) -> None:
    extra = {
        "sync": [],
        "partial": ["rollout.partial.enabled=true", "rollout.partial.over_provision=1.5"],
        "async": ["rollout.mode=async", "rollout.max_staleness=1"],
    }[mode]
    summary, rows, samples, killed = _run(tmp_path, "fault", extra, kill_after_step=1)
    assert killed, "the worker was never killed: the test did not exercise a failure"
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["rollout/worker_restarts"] == 1
    assert rows[-1]["rollout/reissued_calls"] >= 1
    # every group trained exactly once, none lost (partial: leftovers may stay in the buffer)
    trained = [g for step in summary["group_ids"] for g in step]
    assert all(n == 1 for n in Counter(trained).values()), Counter(trained)
    if mode != "partial":
        assert sorted(trained) == list(range(16))
    if mode == "sync":  # same seeds, same weights: the same samples as a run without the kill
        clean, clean_rows, clean_samples, clean_killed = _run(tmp_path, "clean", extra)
        assert not clean_killed and clean_rows[-1]["rollout/worker_restarts"] == 0
        assert samples == clean_samples
        assert summary["group_ids"] == clean["group_ids"]
        assert [r["train/loss"] for r in rows] == pytest.approx(
            [r["train/loss"] for r in clean_rows], abs=1e-6
        )
