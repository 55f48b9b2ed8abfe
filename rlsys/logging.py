"""Run logging: a progress line per step, `metrics.jsonl`, W&B, and a final plot.

Metric names are namespaced (`rollout/`, `reward/`, `train/`, `perf/`, `sync/`, `buffer/`).
W&B runs offline by default (`logging.wandb.mode`), so nothing needs a login; the offline run
folder lands in `<run_dir>/wandb/`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class RunLogger:
    """Console, `metrics.jsonl` and W&B for one run. A resumed run (`resume_step`: the step of
    its checkpoint) drops the rows logged after that step, which the run will log again, and
    appends to the same files; `wandb_id` reopens the same W&B run."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        config: dict,
        wandb_cfg: Any,
        resume_step: int | None = None,
        wandb_id: str | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.total = total_steps
        self.console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
        self.history: list[dict] = []
        if resume_step is not None:
            self.history = truncate_jsonl(run_dir / "metrics.jsonl", resume_step)
            truncate_jsonl(run_dir / "samples.jsonl", resume_step)
        self.first_step = resume_step or 0  # steps before this one ran in an earlier process
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.t_start = time.perf_counter()
        self.wandb = None
        if wandb_cfg.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(
                project=wandb_cfg.project,
                name=wandb_cfg.name or run_dir.name,
                mode=wandb_cfg.mode,
                dir=str(run_dir),
                config=config,
                id=wandb_id,
                resume="allow" if wandb_id else None,
            )

    @property
    def wandb_id(self) -> str | None:
        """The W&B run id (saved in checkpoints so that a resumed run continues it)."""
        return self.wandb.id if self.wandb is not None else None

    def log(
        self, step: int, metrics: dict[str, Any], hists: dict[str, list[float]] | None = None
    ) -> None:
        """Record one step: console line, jsonl row, W&B (scalars and histograms)."""
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            import wandb

            data: dict[str, Any] = {k: v for k, v in row.items() if isinstance(v, int | float)}
            for k, vs in (hists or {}).items():
                data[k] = wandb.Histogram(vs)
            self.wandb.log(data, step=step)
        elapsed = time.perf_counter() - self.t_start
        done = step - self.first_step
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        self.console.print(
            f"step {step:>4}/{self.total} | reward {row.get('reward/mean', float('nan')):.3f} "
            f"| loss {row.get('train/loss', float('nan')):+.4f} "
            f"| {row.get('rollout/tok_per_s', 0):6.0f} tok/s "
            f"| {row.get('perf/step_s', 0):5.1f} s/step | ETA {_fmt_eta(eta)}"
        )

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A table of sample rollouts: `samples.jsonl` in the run dir and a W&B table."""
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}) + "\n")
        if self.wandb is not None and rows:
            import wandb

            cols = list(rows[0])
            table = wandb.Table(
                columns=cols,
                data=[
                    [json.dumps(r[c]) if isinstance(r[c], dict) else r[c] for c in cols]
                    for r in rows
                ],
            )
            self.wandb.log({"samples/rollouts": table}, step=step)

    def info(self, msg: str) -> None:
        self.console.print(msg)

    def finish(self, plot: bool = True) -> Path | None:
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        if plot and self.history:
            return plot_history(self.history, self.run_dir / "plot.png")
        return None


def truncate_jsonl(path: Path, last_step: int) -> list[dict]:
    """Keep the rows of a per-step JSONL file with `step <= last_step` (rewritten through a
    temporary file and a rename); returns them. A missing file is an empty history."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut off by a killed process
            continue
        if isinstance(row, dict) and row.get("step", last_step + 1) <= last_step:
            rows.append(row)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return rows


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


def plot_history(history: list[dict], out: Path) -> Path:
    """Reward and loss per step, side by side, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in (
        (axes[0], "reward/mean", "mean reward"),
        (axes[1], "train/loss", "policy loss"),
    ):
        ys = [h.get(key, float("nan")) for h in history]
        ax.plot(steps, ys, marker="o", ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
