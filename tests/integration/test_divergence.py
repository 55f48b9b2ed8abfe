"""A run whose trainer cannot take a step (here: a non-finite loss from an entropy bonus of
1e38) stops with one `error:` line and exit code 1, not a Ray traceback: the line names the
step, the trainer's reason and the last checkpoint, and what the run logged and saved stays
(`rlsys train` end to end: real Ray actors, tiny model, native engine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _train(run: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [
        "recipes/quickstart.yaml",
        "model.path=tiny-llama",
        "rollout.prompts_per_step=2",
        "rollout.n_samples_per_prompt=2",
        "rollout.max_new_tokens=8",
        "logging.wandb.mode=disabled",
        "logging.plot=false",
        f"logging.run_dir={run}",
        *overrides,
    ]
    cmd = [sys.executable, "-m", "rlsys.cli", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def test_non_finite_loss_stops_with_one_line_and_keeps_the_checkpoint(
    tmp_path: Path, tiny_model_path
) -> None:
    from rlsys.trainer import checkpoint

    blow_up = "algorithm.entropy_coef=1e38"  # 1e38 x entropy overflows fp32: loss = -inf
    r = _train(tmp_path / "first", "steps=2", blow_up)
    assert r.returncode == 1, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("error: step 1: non-finite loss"), err[-5:]
    assert "no checkpoint was saved" in err[-1]
    assert "Traceback" not in r.stderr

    run = tmp_path / "run"
    ok = _train(run, "steps=1", "checkpoint.every=1")
    assert ok.returncode == 0, ok.stderr[-3000:]
    r = _train(run, "steps=3", "checkpoint.every=1", "resume=auto", blow_up)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    step1 = run / "checkpoints" / "step-1"
    assert line.startswith("error: step 2: non-finite loss"), line
    assert f"the last checkpoint is {step1}" in line and "metrics.jsonl" in line
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1]
    checkpoint.validate(step1)  # intact, resumable
    assert checkpoint.list_checkpoints(run / "checkpoints") == [step1]
