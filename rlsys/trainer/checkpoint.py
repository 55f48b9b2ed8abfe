"""Checkpoints: save a run's whole state atomically, find the latest, validate it, export it.

One checkpoint is a folder `<root>/step-<N>/` (root: `checkpoint.dir`, default
`<run dir>/checkpoints`) holding the state after step N:

    trainer/         `TrainerWorker.save_state`: DeepSpeed shards (weights, optimizer, LR
                     schedule), per-rank version / KL coefficient / RNG, `trainer.json`, and
                     `hf/`, the policy as a Hugging Face folder (what `rlsys export` copies)
    controller.pkl   the driver's state: version, next group id, prompt-stream position,
                     buffer contents and counters, run dir, W&B run id, RNG states
    manifest.json    format, rlsys version, step, version, recipe fingerprint, file sizes
    COMPLETE         written last

Atomic: everything is written into `<root>/.tmp-step-N/`, then renamed to `step-N` (a rename
within one directory is atomic on POSIX), so a run killed mid-save leaves only a `.tmp-`
folder, which is never read and is deleted by the next save. Older checkpoints are pruned
(the newest `keep` stay) only once the new one is in place. Files are not fsync'ed: this
survives a killed process, not a power cut.

Loading never writes: a corrupt, incomplete or mismatched checkpoint raises `CheckpointError`
(a `ConfigError`: exit code 2 and one line that names the problem and the fix) and stays as
it is on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from rlsys import __version__
from rlsys.config import ConfigError, RecipeConfig, to_dict

FORMAT = 1
COMPLETE, MANIFEST, STATE, TRAINER, HF = (
    "COMPLETE",
    "manifest.json",
    "controller.pkl",
    "trainer",
    "hf",
)
_STEP = re.compile(r"^step-(\d+)$")
_RUN = re.compile(r"-\d{8}-\d{6}(-\d+)?$")  # `run_dir_for`'s timestamp (+ a same-second count)

# Recipe keys a resumed run must share with its checkpoint: they decide what the saved tensors
# are (model, dtype, ZeRO shard layout, critic) or what the saved prompt position points at.
# Everything else (lr, steps, temperature, ...) may change on resume.
MATCH_KEYS = (
    "model.path",
    "model.dtype",
    "seed",
    "data.task",
    "data.path",
    "data.task_args",
    "data.num_train",
    "algorithm.advantage",
    "algorithm.critic.path",
    "trainer.ranks",
    "trainer.zero_stage",
    "trainer.precision",
)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from or exported: missing, incomplete, corrupt or
    written by a different recipe. Exit code 2 through the CLI."""


@dataclass
class Resume:
    """A validated checkpoint and its controller state, found before any actor starts."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


# ---------------------------------------------------------------------------------------------
# saving


def root(cfg: RecipeConfig, run_dir: str | Path) -> Path:
    """Where this run's checkpoints go."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(run_dir) / "checkpoints"


def fingerprint(cfg: RecipeConfig, model_path: str | Path) -> dict[str, Any]:
    """The `MATCH_KEYS` of a recipe (and `trainer.lora` when adapters are on), plus a hash
    of the model's `config.json` (catches a different model behind the same name), as JSON
    values."""
    d = to_dict(cfg)
    out: dict[str, Any] = {}
    for key in MATCH_KEYS:
        v: Any = d
        for part in key.split("."):
            v = v[part]
        out[key] = v
    if cfg.trainer.lora.rank:  # only then: checkpoints of full fine-tuning predate LoRA
        out["trainer.lora"] = d["trainer"]["lora"]
    cfg_json = Path(model_path) / "config.json"
    out["model.config_sha256"] = (
        hashlib.sha256(cfg_json.read_bytes()).hexdigest() if cfg_json.is_file() else None
    )
    return json.loads(json.dumps(out))


def save_checkpoint(
    root: str | Path,
    step: int,
    trainer_save_fn: Callable[[str], Any],
    controller_state: dict[str, Any],
    *,
    fingerprint: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write `root/step-<step>` atomically and prune to the newest `keep`; returns its path.

    `trainer_save_fn(dir)` writes the trainer's state into `dir` (`TrainerWorker.save_state`)
    including `trainer.json`, whose version must equal `controller_state["version"]`: a
    trainer that is ahead (Ctrl-C landed during its update) is not a consistent state, so
    nothing is written and `CheckpointError` is raised. Earlier checkpoints are untouched
    unless this one completes."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    tmp = root / f".tmp-step-{step}"
    tmp.mkdir()
    trainer_save_fn(str(tmp / TRAINER))
    version = int(controller_state["version"])
    try:
        saved = json.loads((tmp / TRAINER / "trainer.json").read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        saved = "unknown (no readable trainer.json)"
    if saved != version:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"not saving step {step}: the trainer is at version {saved}, the controller at "
            f"{version} (interrupted during an update); the previous checkpoint stays"
        )
    with open(tmp / STATE, "wb") as f:
        pickle.dump(controller_state, f, protocol=pickle.HIGHEST_PROTOCOL)
    manifest = {
        "format": FORMAT,
        "rlsys_version": __version__,
        "step": step,
        "version": version,
        "saved_at": time.time(),
        "fingerprint": fingerprint,
        "files": {str(p.relative_to(tmp)): p.stat().st_size for p in _files(tmp)},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (tmp / COMPLETE).write_text(f"step {step}\n")
    final = root / f"step-{step}"
    if final.exists():  # the same step again (resumed from an older checkpoint): replace it
        old = root / f".old-step-{step}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    prune(root, keep)
    return final


def _clean_stale(root: Path) -> None:
    """Remove what an interrupted save left: `.tmp-` folders (never complete), and `.old-`
    folders (put back when the replacement never arrived)."""
    for p in root.glob(".old-step-*"):
        target = root / p.name.removeprefix(".old-")
        if target.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.rename(p, target)
    for p in root.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` `step-N` folders (by N); returns the deleted ones."""
    gone = list_checkpoints(root)[:-keep] if keep > 0 else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def rng_state() -> dict[str, Any]:
    """The driver's RNG states (Python, NumPy, torch)."""
    import numpy as np
    import torch

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ---------------------------------------------------------------------------------------------
# finding and validating


def step_of(path: str | Path) -> int | None:
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: str | Path) -> list[Path]:
    """`root/step-N` folders, oldest first (`.tmp-` folders of unfinished saves excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0)


def latest(root: str | Path) -> Path | None:
    """The highest `step-N` under `root` (validate it before use), or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def validate(path: str | Path, expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check that `path` is a complete checkpoint (marker, manifest, every file at its saved
    size) and, given `expected` (a `fingerprint`), that it matches this recipe; returns the
    manifest. Raises `CheckpointError` naming the problem and the fix."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not (path / COMPLETE).is_file():
        _corrupt(path, "incomplete (no COMPLETE marker: the save was cut off or the copy partial)")
    manifest = _read_json(path / MANIFEST, path)
    if manifest.get("format") != FORMAT:
        _corrupt(path, f"in format {manifest.get('format')!r}, this rlsys reads {FORMAT}")
    for name, size in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            _corrupt(path, f"missing {name}")
        if f.stat().st_size != size:
            _corrupt(path, f"{name} has {f.stat().st_size} bytes, {size} when saved (truncated?)")
    if expected is not None:
        saved = manifest.get("fingerprint", {})
        diff = [k for k in {**saved, **expected} if saved.get(k) != expected.get(k)]
        if diff:
            parts = "; ".join(
                f"{k} is {saved.get(k)!r} there, {expected.get(k)!r} here" for k in diff
            )
            raise CheckpointError(
                f"checkpoint {path} was written by a different recipe: {parts}. Resume with the "
                "recipe it was written with, or start a fresh run (resume= empty and a new "
                "logging.run_dir)"
            )
    return manifest


def _corrupt(path: Path, problem: str) -> NoReturn:
    earlier = [
        p
        for p in list_checkpoints(path.parent)
        if (step_of(p) or -1) < (step_of(path) or -1) and (p / COMPLETE).is_file()
    ]
    fix = (
        f"resume={earlier[-1]} continues from the previous one"
        if earlier
        else "point resume= at another checkpoint, or leave it empty to start fresh"
    )
    raise CheckpointError(
        f"checkpoint {path} is unusable: {problem}. It was left as it is; {fix} (or delete it)"
    )


def _read_json(f: Path, ckpt: Path) -> dict[str, Any]:
    try:
        out = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        _corrupt(ckpt, f"cannot read {f.name} ({type(e).__name__}: {e})")
    if not isinstance(out, dict):
        _corrupt(ckpt, f"{f.name} is not a JSON object")
    return out


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def load_controller_state(path: str | Path) -> dict[str, Any]:
    """The controller state of a (validated) checkpoint."""
    path = Path(path)
    try:
        with open(path / STATE, "rb") as f:
            state = pickle.load(f)
    except Exception as e:  # unpickling garbage raises almost anything
        _corrupt(path, f"cannot read {STATE} ({type(e).__name__}: {e})")
    for key in ("step", "version", "next_group", "stream_position", "buffer"):
        if key not in state:
            _corrupt(path, f"{STATE} has no '{key}'")
    return state


def load_trainer(load_fn: Callable[[str], Any], path: str | Path) -> None:
    """`load_fn(path/trainer)` (`TrainerWorker.load_state` on every rank), with a failure
    turned into a `CheckpointError` that names the checkpoint."""
    try:
        load_fn(str(Path(path) / TRAINER))
    except Exception as e:
        msg = str(e).strip().splitlines()
        _corrupt(Path(path), f"the trainer state does not load ({msg[-1] if msg else type(e)})")


def resolve(path: str | Path) -> Path:
    """A checkpoint named by the user: a `step-N` folder, a checkpoints folder or a run folder
    (its `checkpoints/`); the latter two mean their latest checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such checkpoint or folder: {p}")
    if step_of(p) is not None:
        return p
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    found = latest(p)
    if found is None:
        raise CheckpointError(f"no step-N checkpoint in {p}")
    return found


def find_resume(cfg: RecipeConfig, recipe_path: str | None) -> Path | None:
    """The checkpoint `cfg.resume` asks for; None when it is empty, or `auto` finds none."""
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        return resolve(cfg.resume)
    if cfg.checkpoint.dir:
        roots = [Path(cfg.checkpoint.dir)]
    elif cfg.logging.run_dir:
        roots = [Path(cfg.logging.run_dir) / "checkpoints"]
    else:  # the newest `runs/<recipe>-<timestamp>` with a checkpoint (names sort by time)
        stem = Path(recipe_path).stem if recipe_path else cfg.name
        runs = Path("runs")
        names = [p for p in runs.glob(f"{stem}-*") if _RUN.sub("", p.name) == stem]
        roots = [p / "checkpoints" for p in sorted(names, reverse=True)]
    for r in roots:
        found = latest(r)
        if found is not None:
            return found
    return None


def prepare_resume(
    cfg: RecipeConfig, recipe_path: str | None, expected: dict[str, Any]
) -> Resume | None:
    """Find, validate and read the checkpoint to resume from (no actor needed)."""
    path = find_resume(cfg, recipe_path)
    if path is None:
        return None
    validate(path, expected)
    return Resume(path, load_controller_state(path))


# ---------------------------------------------------------------------------------------------
# export


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Copy a validated checkpoint's policy (`trainer/hf/`: safetensors, config, tokenizer) to
    `out_dir`, a new or empty folder; the copy lands under a temporary name, then is renamed."""
    src = resolve(checkpoint)
    validate(src)
    hf = src / TRAINER / HF
    if not (hf / "config.json").is_file() or not any(hf.glob("*.safetensors")):
        _corrupt(src, "missing its Hugging Face folder (trainer/hf with config and safetensors)")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"export: {out} exists and is not an empty folder; pick a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(hf, tmp)
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    return out
