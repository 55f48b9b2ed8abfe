"""`rlsys eval`: evaluate a saved checkpoint on a recipe's held-out split.

Greedy accuracy and pass@k / mean@k (see `RolloutWorker.evaluate`), printed as a table and
written as JSON (default `<checkpoint>/eval.json`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlsys.config import ConfigError, RecipeConfig, to_dict


def hf_folder(checkpoint: str) -> Path:
    """The Hugging Face folder to evaluate: `checkpoint` itself, a training checkpoint's
    policy (`step-N/trainer/hf`) or a run folder's `final/`; ConfigError when none is."""
    from rlsys.trainer.checkpoint import HF, TRAINER

    ckpt = Path(checkpoint)
    for cand in (ckpt, ckpt / TRAINER / HF, ckpt / "final"):
        if (cand / "config.json").is_file():
            return cand
    raise ConfigError(
        f"--checkpoint {ckpt}: not a Hugging Face model folder (no config.json); pass a run's "
        "final/ folder, a checkpoints/step-N folder or a folder `rlsys export` wrote"
    )


def evaluate_checkpoint(
    cfg: RecipeConfig, checkpoint: str, out: str | None = None
) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from rlsys.data import load_splits
    from rlsys.reward.config import resolve_paths, validate_reward_config
    from rlsys.rollout.agent import check_agent
    from rlsys.rollout.worker import RolloutWorker

    ckpt = hf_folder(checkpoint)
    path = Path(out) if out else ckpt / "eval.json"
    try:  # before the evaluation, so that its results cannot be lost to a bad --out
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {path}: cannot create its folder ({e.strerror})") from None
    validate_reward_config(cfg.reward, cfg.data.task)
    cfg.reward = resolve_paths(cfg.reward)
    check_agent(cfg.rollout.agent)
    if cfg.rollout.engine == "native":
        from rlsys.rollout.native import check_supported

        check_supported(str(ckpt))
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    _, held = load_splits(cfg.data, tokenizer, cfg.seed)
    if not held:
        raise ConfigError("this recipe has no held-out split: set data.eval_path")
    prompts = held[: cfg.eval.num_prompts]
    worker = RolloutWorker(to_dict(cfg), str(ckpt))
    res: dict[str, Any] = worker.evaluate(prompts, cfg.eval.k, cfg.seed + 7919)
    res["checkpoint"] = str(ckpt)
    table = Table(title=f"eval: {ckpt}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in res.items():
        if isinstance(v, float):
            table.add_row(k, f"{v:.4f}" if "prompts" not in k else f"{v:.0f}")
    Console().print(table)
    path.write_text(json.dumps(res, indent=2) + "\n")
    Console().print(f"wrote {path}")
    return res
