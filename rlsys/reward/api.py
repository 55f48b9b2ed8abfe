"""Reward functions named in recipes.

Contract (per sample): `fn(prompt: str, response: str, **meta) -> float | dict`, where `meta`
holds the dataset record's extra fields and the recipe's `reward.kwargs`. A dict return must
carry `score`; its other numeric entries are logged as `reward/<key>`. A non-finite score is an
error. Named as `pkg.module:fn` or `path/to/file.py:fn`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlsys.config import ConfigError


def load_callable(spec: str) -> Callable[..., Any]:
    """Resolve `pkg.module:name` or `path/to/file.py:name` to the object it names."""
    if ":" not in spec:
        raise ConfigError(f"reward '{spec}': expected 'pkg.module:fn' or 'path/to/file.py:fn'")
    mod_part, _, attr = spec.rpartition(":")
    if mod_part.endswith(".py"):
        path = Path(mod_part)
        if not path.is_file():
            raise ConfigError(f"reward '{spec}': file not found: {path}")
        name = f"rlsys_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        if name in sys.modules:
            module = sys.modules[name]
        else:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_part)
        except ModuleNotFoundError as e:
            raise ConfigError(f"reward '{spec}': cannot import module '{mod_part}' ({e})") from None
    if not hasattr(module, attr):
        raise ConfigError(f"reward '{spec}': '{mod_part}' has no attribute '{attr}'")
    return getattr(module, attr)


class RewardFn:
    """A per-sample reward with fixed keyword arguments; returns (score, parts)."""

    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any] | None = None) -> None:
        self.fn = fn
        self.kwargs = dict(kwargs or {})

    def __call__(self, prompt: str, response: str, meta: dict[str, Any]) -> tuple[float, dict]:
        out = self.fn(prompt, response, **{**meta, **self.kwargs})
        parts: dict[str, float] = {}
        if isinstance(out, dict):
            if "score" not in out:
                raise ValueError(f"reward returned a dict without 'score': {sorted(out)}")
            parts = {k: float(v) for k, v in out.items() if k != "score"}
            out = out["score"]
        score = float(out)
        if not math.isfinite(score):
            raise ValueError(f"reward returned a non-finite score: {score}")
        return score, parts


def build_reward(fn_spec: str | None, kwargs: dict[str, Any], task: str | None) -> RewardFn:
    """The recipe's reward: `reward.fn` if set, else the built-in task's verifier."""
    if fn_spec is not None:
        return RewardFn(load_callable(fn_spec), kwargs)
    if task is None:
        raise ConfigError("reward.fn is required when data.task is null")
    from rlsys.tasks import TASKS

    return RewardFn(TASKS[task].reward, kwargs)
