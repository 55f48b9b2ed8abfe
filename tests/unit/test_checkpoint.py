"""Checkpoints: atomic save, prune, latest, corrupt and mismatched checkpoints (a clear error,
the checkpoint left as it was), the trainer's save/load round trip, resume bookkeeping
(buffer, metrics.jsonl) and `rlsys export` / `rlsys train resume=` exit codes."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlsys.config import ConfigError, load_recipe, to_dict
from rlsys.trainer import checkpoint as ck
from rlsys.trainer.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlsys.cli", *args], capture_output=True, text=True, cwd=ROOT
    )


@pytest.fixture(scope="module")
def fp(tiny_model_path) -> dict:
    """The fingerprint of the quickstart recipe on the tiny model."""
    return ck.fingerprint(load_recipe(RECIPE, ["model.path=tiny-llama"]), tiny_model_path)


def _trainer_save(version: int, nbytes: int = 1000, hf_from: str | None = None):
    """A stand-in for `TrainerWorker.save_state` that writes real files: a state blob, the
    `trainer.json` the controller checks, and optionally a real Hugging Face folder."""

    def save(d: str) -> None:
        p = Path(d)
        p.mkdir(parents=True)
        (p / "rank0.pt").write_bytes(b"\x01" * nbytes)
        (p / "trainer.json").write_text(json.dumps({"version": version, "ranks": 1}))
        if hf_from is not None:
            shutil.copytree(hf_from, p / "hf")

    return save


def _state(step: int) -> dict:
    return {
        "step": step,
        "version": step,
        "next_group": 2 * step,
        "stream_position": 2 * step,
        "buffer": {"groups": [], "put": 2 * step, "taken": 2 * step},
    }


def _save(root: Path, step: int, fp: dict, keep: int = 5, **kw) -> Path:
    return ck.save_checkpoint(
        root, step, _trainer_save(step, **kw), _state(step), fingerprint=fp, keep=keep
    )


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# saving


def test_save_writes_a_complete_checkpoint(tmp_path: Path, fp: dict) -> None:
    path = _save(tmp_path, 3, fp)
    assert path == tmp_path / "step-3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]  # no .tmp- left
    manifest = ck.validate(path, fp)
    assert manifest["step"] == 3 and manifest["version"] == 3
    assert manifest["files"]["trainer/rank0.pt"] == 1000
    assert manifest["fingerprint"]["model.path"] == "tiny-llama"
    assert ck.load_controller_state(path) == _state(3)


def test_a_save_cut_off_midway_leaves_the_previous_checkpoint(tmp_path: Path, fp: dict) -> None:
    good = _save(tmp_path, 5, fp)
    before = _tree(good)

    def dies_midway(d: str) -> None:  # what a SIGKILL during the trainer's write leaves
        Path(d).mkdir(parents=True)
        (Path(d) / "rank0.pt").write_bytes(b"\x01" * 10)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ck.save_checkpoint(tmp_path, 10, dies_midway, _state(10), fingerprint=fp)
    assert (tmp_path / ".tmp-step-10").is_dir() and not (tmp_path / "step-10").exists()
    assert ck.latest(tmp_path) == good and _tree(good) == before
    ck.validate(good, fp)
    _save(tmp_path, 10, fp)  # the next save clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10", "step-5"]


def test_a_trainer_ahead_of_the_controller_is_not_saved(tmp_path: Path, fp: dict) -> None:
    good = _save(tmp_path, 5, fp)
    with pytest.raises(CheckpointError, match="trainer is at version 7, the controller at 6"):
        ck.save_checkpoint(tmp_path, 6, _trainer_save(7), _state(6), fingerprint=fp)
    assert [p.name for p in tmp_path.iterdir()] == ["step-5"]
    ck.validate(good, fp)


def test_fingerprint_tells_lora_from_full(tmp_path: Path, fp: dict, tiny_model_path) -> None:
    """A LoRA checkpoint cannot be resumed as full fine-tuning or with another rank, and the
    other way round; a full run's fingerprint has no LoRA key, so checkpoints written before
    LoRA existed still match."""
    lora = ck.fingerprint(
        load_recipe(RECIPE, ["model.path=tiny-llama", "trainer.lora.rank=8"]), tiny_model_path
    )
    assert "trainer.lora" not in fp and lora["trainer.lora"]["rank"] == 8
    rank4 = {**lora, "trainer.lora": {**lora["trainer.lora"], "rank": 4}}
    path = _save(tmp_path / "lora", 1, lora)
    ck.validate(path, lora)
    for other in (fp, rank4):
        with pytest.raises(CheckpointError, match="trainer.lora is"):
            ck.validate(path, other)
    with pytest.raises(CheckpointError, match="trainer.lora is None there"):
        ck.validate(_save(tmp_path / "full", 1, fp), lora)


def test_saving_a_step_again_replaces_it(tmp_path: Path, fp: dict) -> None:
    _save(tmp_path, 4, fp, nbytes=10)
    path = _save(tmp_path, 4, fp, nbytes=20)
    assert ck.validate(path, fp)["files"]["trainer/rank0.pt"] == 20
    assert [p.name for p in tmp_path.iterdir()] == ["step-4"]


def test_prune_keeps_the_newest_k(tmp_path: Path, fp: dict) -> None:
    for step in (1, 2, 3, 9, 10):
        _save(tmp_path, step, fp, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-9", "step-10"]
    assert ck.prune(tmp_path, 1) == [tmp_path / "step-9"]


def test_latest_orders_by_step_number(tmp_path: Path, fp: dict) -> None:
    assert ck.latest(tmp_path / "missing") is None and ck.latest(tmp_path) is None
    for step in (2, 10, 9):
        _save(tmp_path, step, fp)
    (tmp_path / ".tmp-step-11").mkdir()
    (tmp_path / "notes").mkdir()
    assert ck.latest(tmp_path) == tmp_path / "step-10"  # not "step-9", the string maximum


# ---------------------------------------------------------------------------------------------
# corrupt and mismatched checkpoints


def _no_complete(p: Path) -> None:
    (p / "COMPLETE").unlink()


def _truncate(p: Path) -> None:
    (p / "trainer" / "rank0.pt").write_bytes(b"\x01" * 10)


def _garbage_manifest(p: Path) -> None:
    (p / "manifest.json").write_text("{not json")


def _missing_file(p: Path) -> None:
    (p / "trainer" / "trainer.json").unlink()


@pytest.mark.parametrize(
    "damage, needle",
    [
        (_no_complete, "incomplete (no COMPLETE marker"),
        (_truncate, "trainer/rank0.pt has 10 bytes, 1000 when saved"),
        (_garbage_manifest, "cannot read manifest.json"),
        (_missing_file, "missing trainer/trainer.json"),
    ],
)
def test_a_corrupt_checkpoint_is_named_and_left_intact(
    tmp_path: Path, fp: dict, damage, needle: str
) -> None:
    _save(tmp_path, 2, fp)
    bad = _save(tmp_path, 4, fp)
    damage(bad)
    before = _tree(bad)
    with pytest.raises(CheckpointError) as e:
        ck.prepare_resume(load_recipe(RECIPE, [f"resume={bad}"]), None, fp)
    msg = str(e.value)
    assert needle in msg and str(bad) in msg
    assert f"resume={tmp_path / 'step-2'}" in msg  # the fix: the previous good one
    assert _tree(bad) == before
    ck.validate(tmp_path / "step-2", fp)


def test_an_unreadable_controller_state_is_corrupt(tmp_path: Path, fp: dict) -> None:
    path = _save(tmp_path, 3, fp)
    size = (path / "controller.pkl").stat().st_size
    (path / "controller.pkl").write_bytes(b"\x80" * size)  # same size: passes the manifest
    ck.validate(path, fp)
    with pytest.raises(CheckpointError, match="cannot read controller.pkl"):
        ck.load_controller_state(path)


def test_a_mismatched_recipe_names_the_keys(tmp_path: Path, fp: dict, tiny_model_path) -> None:
    path = _save(tmp_path, 3, fp)
    other = ck.fingerprint(
        load_recipe(RECIPE, ["model.path=tiny-llama", "seed=1", "trainer.ranks=2"]),
        tiny_model_path,
    )
    with pytest.raises(CheckpointError) as e:
        ck.validate(path, other)
    assert "written by a different recipe: seed is 0 there, 1 here" in str(e.value)
    assert "trainer.ranks is 1 there, 2 here" in str(e.value)
    # Keys that may change on resume do not count.
    lr = ck.fingerprint(
        load_recipe(RECIPE, ["model.path=tiny-llama", "trainer.lr=1e-3", "steps=99"]),
        tiny_model_path,
    )
    ck.validate(path, lr)


def test_a_different_model_behind_the_same_name_is_a_mismatch(
    tmp_path: Path, fp: dict, tiny_model_path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    cfg = load_recipe(RECIPE, ["model.path=tiny-llama"])
    assert ck.fingerprint(cfg, model) == fp
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.config_sha256"):
        ck.validate(_save(tmp_path / "ck", 1, fp), ck.fingerprint(cfg, model))


# ---------------------------------------------------------------------------------------------
# finding what to resume


def test_resolve_and_find_resume(tmp_path: Path, fp: dict, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint or folder"):
        ck.resolve(tmp_path / "nope")
    auto = load_recipe(RECIPE, ["resume=auto"])
    assert ck.find_resume(auto, str(RECIPE)) is None  # nothing yet: a fresh run
    old = Path("runs/quickstart-20260101-000000")
    new = Path("runs/quickstart-20260102-000000")
    other = Path("runs/quickstart-tiny-20260103-000000")  # another recipe's run
    for run, step in ((old, 7), (new, 3), (other, 9)):
        _save(run / "checkpoints", step, fp)
    Path("runs/quickstart-20260104-000000").mkdir()  # newest, but killed before a checkpoint
    assert ck.find_resume(auto, str(RECIPE)) == new / "checkpoints" / "step-3"
    assert ck.resolve(old) == old / "checkpoints" / "step-7"  # a run folder: its latest
    assert ck.resolve(old / "checkpoints") == old / "checkpoints" / "step-7"
    pinned = load_recipe(RECIPE, [f"resume={old}/checkpoints/step-7"])
    assert ck.find_resume(pinned, None) == old / "checkpoints" / "step-7"
    in_dir = load_recipe(RECIPE, ["resume=auto", f"logging.run_dir={other}"])
    assert ck.find_resume(in_dir, None) == other / "checkpoints" / "step-9"
    with pytest.raises(CheckpointError, match="no step-N checkpoint in"):
        ck.resolve(Path("runs/quickstart-20260104-000000"))


def test_checkpoint_keys_are_validated() -> None:
    with pytest.raises(ConfigError, match="checkpoint.every must be >= 0"):
        load_recipe(RECIPE, ["checkpoint.every=-1"])
    with pytest.raises(ConfigError, match="checkpoint.keep must be > 0"):
        load_recipe(RECIPE, ["checkpoint.keep=0"])
    with pytest.raises(ConfigError, match="Did you mean 'checkpoint.every'"):
        load_recipe(RECIPE, ["checkpoint.evry=5"])


# ---------------------------------------------------------------------------------------------
# resume bookkeeping: buffer, metrics.jsonl


def test_buffer_snapshot_restores_contents_and_counters(synthetic_groups) -> None:
    from rlsys.buffer.stream import StreamingBuffer

    a = StreamingBuffer()
    a.put(synthetic_groups(n_groups=5))
    a.get_batch(2)
    a.recycle(synthetic_groups(n_groups=2, seed=1))  # partial groups waiting to be continued
    snap = pickle.loads(pickle.dumps(a.snapshot()))  # as it travels through a checkpoint
    b = StreamingBuffer()
    assert b.restore(snap) == 3
    assert b.stats() == a.stats()
    assert {k: b.stats()[k] for k in ("buffer/put", "buffer/taken", "buffer/recycled")} == {
        "buffer/put": 5,
        "buffer/taken": 2,
        "buffer/recycled": 2,
    }
    got, want = b.get_batch(3), a.get_batch(3)
    assert [g.group_id for g in got] == [g.group_id for g in want] == [2, 3, 4]
    assert [s.response_ids for s in got[0].samples] == [s.response_ids for s in want[0].samples]
    got, want = b.take_recycled(5), a.take_recycled(5)
    assert [s.response_ids for g in got for s in g.samples] == [
        s.response_ids for g in want for s in g.samples
    ]


def test_a_resumed_logger_drops_later_rows_and_appends(tmp_path: Path) -> None:
    from rlsys.config import WandbConfig
    from rlsys.logging import RunLogger

    off = WandbConfig(mode="disabled")
    log = RunLogger(tmp_path, 10, {}, off)
    for step in range(1, 8):
        log.log(step, {"reward/mean": step / 10})
    log.finish(plot=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "rew')  # a row cut off by the kill
    log = RunLogger(tmp_path, 10, {}, off, resume_step=5)
    assert [r["step"] for r in log.history] == [1, 2, 3, 4, 5]
    log.log(6, {"reward/mean": 0.6})
    log.finish(plot=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["reward/mean"] == 0.6


# ---------------------------------------------------------------------------------------------
# the real trainer state, export, and the CLI


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(scope="module")
def trained(tiny_model_path, synthetic_groups, tmp_path_factory):
    """A real TrainerWorker: 2 steps, a checkpoint through `save_state`, 2 more steps.
    Returns (checkpoint path, weights at the checkpoint, metrics of steps 3-4, final
    weights, the recipe overrides)."""
    from rlsys.trainer.worker import TrainerWorker

    over = ["model.path=tiny-llama", "trainer.lr=1e-3", "algorithm.kl.mode=loss"]
    cfg = load_recipe(None, over)
    w = TrainerWorker(to_dict(cfg), tiny_model_path)
    initial = _params(w.model)
    for s in range(2):
        w.train_step(synthetic_groups(seed=s))
    # the steps move the weights, so the round trip below compares trained states
    assert (_params(w.model) - initial).abs().max().item() > 1e-4
    root = tmp_path_factory.mktemp("ckpt")
    fp = ck.fingerprint(cfg, tiny_model_path)
    state = _state(2)
    path = ck.save_checkpoint(root, 2, w.save_state, state, fingerprint=fp)
    at_save = _params(w.model)
    after = [w.train_step(synthetic_groups(seed=s)) for s in (2, 3)]
    assert (_params(w.model) - at_save).abs().max().item() > 1e-4
    return path, at_save, after, _params(w.model), over


def test_trainer_state_round_trip_continues_bit_exact(
    trained, tiny_model_path, synthetic_groups
) -> None:
    from rlsys.trainer.worker import TrainerWorker

    path, at_save, after, final, over = trained
    w = TrainerWorker(to_dict(load_recipe(None, over)), tiny_model_path)
    ck.load_trainer(w.load_state, path)
    assert w.version == 2 and torch.equal(_params(w.model), at_save)
    again = [w.train_step(synthetic_groups(seed=s)) for s in (2, 3)]
    # Weights, Adam moments, step counts and RNG all restored: the same numbers, bit for bit.
    assert again == after
    assert torch.equal(_params(w.model), final)


def test_a_trainer_state_that_does_not_load_is_a_checkpoint_error(
    trained, tmp_path: Path, tiny_model_path
) -> None:
    from rlsys.trainer.worker import TrainerWorker

    path = tmp_path / "step-2"
    shutil.copytree(trained[0], path)
    shutil.rmtree(path / "trainer" / "policy")
    w = TrainerWorker(to_dict(load_recipe(None, trained[4])), tiny_model_path)
    with pytest.raises(CheckpointError, match=r"step-2 is unusable: the trainer state does not"):
        ck.load_trainer(w.load_state, path)


def test_export_writes_a_folder_transformers_loads(trained, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, at_save = trained[0], trained[1]
    out = tmp_path / "exported"
    r = _cli("export", str(path.parent), str(out))  # the checkpoints folder: its latest
    assert r.returncode == 0, r.stderr
    assert f"exported: {out}" in r.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_params(model), at_save)
    assert AutoTokenizer.from_pretrained(out)("1 + 2")["input_ids"]
    assert not list(tmp_path.glob(".tmp-*"))

    r = _cli("export", str(path), str(out))  # never over an existing export
    assert r.returncode == 2 and "exists and is not an empty folder" in r.stderr


@pytest.mark.parametrize("case", ["missing", "corrupt", "no-hf"])
def test_export_errors_exit_2(trained, tmp_path: Path, case: str) -> None:
    src = tmp_path / "checkpoints" / "step-2"
    if case != "missing":
        shutil.copytree(trained[0], src)
    if case == "corrupt":
        (src / "COMPLETE").unlink()
    if case == "no-hf":  # a checkpoint written without the Hugging Face folder
        shutil.rmtree(src / "trainer" / "hf")
        manifest = json.loads((src / "manifest.json").read_text())
        manifest["files"] = {k: v for k, v in manifest["files"].items() if "/hf/" not in k}
        (src / "manifest.json").write_text(json.dumps(manifest))
    r = _cli("export", str(src), str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    needle = {
        "missing": "no such checkpoint or folder",
        "corrupt": "incomplete",
        "no-hf": "missing its Hugging Face folder",
    }[case]
    assert needle in r.stderr
    assert not (tmp_path / "out").exists()


def test_train_resume_errors_exit_2_and_keep_the_checkpoint(tmp_path: Path, fp: dict) -> None:
    good = _save(tmp_path / "checkpoints", 2, fp)
    bad = _save(tmp_path / "checkpoints", 4, fp)
    before = _tree(tmp_path)
    r = _cli("train", str(RECIPE), "model.path=tiny-llama", f"resume={good}", "seed=1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "written by a different recipe: seed is 0 there, 1 here" in r.stderr
    assert _tree(tmp_path) == before
    _no_complete(bad)
    before = _tree(tmp_path)
    r = _cli("train", str(RECIPE), "model.path=tiny-llama", f"resume={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"checkpoint {bad} is unusable: incomplete" in r.stderr
    assert f"resume={good} continues from the previous one" in r.stderr
    assert _tree(tmp_path) == before
