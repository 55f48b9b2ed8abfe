"""The whole slice on a tiny model with real Ray actors: rollout -> buffer -> trainer -> sync."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlsys.config import load_recipe
from rlsys.controller import train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_two_step_run_trains_logs_and_exports(tmp_path: Path, tiny_model_path: str) -> None:
    from transformers import AutoModelForCausalLM

    cfg = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            "model.path=tiny-llama",
            "steps=2",
            "rollout.prompts_per_step=3",
            "rollout.n_samples_per_prompt=4",
            "rollout.max_new_tokens=12",
            "rollout.dtype=float32",
            "trainer.lr=1e-3",
            "trainer.micro_batch_size=5",
            f"reward.fn={ROOT}/tests/assets/rewards.py:length_reward",
            "reward.kwargs={scale: 30.0}",
            f"logging.run_dir={tmp_path}/run",
            "eval.every=2",
            "eval.num_prompts=4",
            "eval.k=2",
            "logging.samples_every=1",
            "logging.samples_per_table=5",
        ],
    )
    import ray

    assert not ray.is_initialized()
    summary = train(cfg, "quickstart.yaml")
    # train() started Ray, so it must also stop it: a later ray.init() in the process works.
    assert not ray.is_initialized()
    run = Path(summary["run_dir"])

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("reward/mean", "perf/step_s", "train/loss", "sync/seconds", "buffer/depth"):
            assert key in r, key
        assert 0.0 < r["reward/mean"] <= 1.0  # the length reward is dense
        assert r["reward/chars"] > 0  # a dict reward's extra parts are logged
        assert r["train/version"] == r["sync/version"] == r["step"]
        assert r["rollout/tokens"] > 0 and r["buffer/depth"] == 0
    assert (run / "plot.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file()
    assert "eval/greedy_acc" in rows[1] and "eval/pass@2" in rows[1]
    assert "eval/greedy_acc" not in rows[0]  # every 2 steps
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 10 and {s["step"] for s in samples} == {1, 2}
    assert all(s["staleness"] == 0 and s["length"] > 0 for s in samples)  # on-policy
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, "no offline W&B run folder"
    # The offline run's record stream holds every namespaced metric key (protobuf strings).
    stream = next(offline[0].glob("run-*.wandb")).read_bytes()
    for key in ("reward/mean", "train/loss", "perf/step_s", "sync/seconds", "reward/hist"):
        assert stream.count(key.encode()) >= 2, key  # logged at both steps
    assert stream.count(b"eval/greedy_acc") >= 1
    tables = list((offline[0] / "files" / "media" / "table" / "samples").glob("rollouts_*.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert "response" in table["columns"] and len(table["data"]) == 5

    # `rlsys eval` on the exported checkpoint prints its accuracy and writes JSON.
    out = tmp_path / "eval.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlsys.cli",
            "eval",
            str(ROOT / "recipes" / "quickstart.yaml"),
            "--checkpoint",
            summary["checkpoint"],
            "--out",
            str(out),
            "eval.num_prompts=3",
            f"reward.fn={ROOT}/tests/assets/rewards.py:length_reward",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "eval/greedy_acc" in r.stdout
    assert json.loads(out.read_text())["eval/prompts"] == 3.0

    # The exported policy loads in transformers and differs from the initial weights.
    exported = AutoModelForCausalLM.from_pretrained(summary["checkpoint"])
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    diffs = [
        (p - q).abs().max().item()
        for p, q in zip(exported.parameters(), initial.parameters(), strict=True)
    ]
    assert max(diffs) > 1e-4
    ids = torch.tensor([[1, 5, 9]])
    assert exported(ids).logits.shape[-1] == exported.config.vocab_size


def test_reward_errors_are_counted_not_fatal(tmp_path: Path) -> None:
    cfg = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            "model.path=tiny-llama",
            "steps=1",
            "rollout.prompts_per_step=2",
            "rollout.n_samples_per_prompt=2",
            "rollout.max_new_tokens=4",
            f"reward.fn={ROOT}/tests/assets/rewards.py:broken_reward",
            "logging.wandb.mode=disabled",
            "logging.plot=false",
            f"logging.run_dir={tmp_path}/run",
        ],
    )
    summary = train(cfg)
    row = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    assert row["reward/errors"] == 4
    assert "always fails" in row["reward/first_error"]
    assert row["reward/mean"] == 0.0
