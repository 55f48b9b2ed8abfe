r"""The recipe's `reward:` section and its checks.

```yaml
reward:
  parts:                                  # or `fn: pkg.module:fn` for a single reward
    - {name: correct, fn: math, weight: 1.0}
    - {name: format, fn: regex, weight: 0.2, kwargs: {pattern: '\\boxed\{.+\}'}}
  on_error: zero                          # raise | zero | skip
  timeout_s: 10
  pool: process                           # thread | process
  workers: 2
```
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ON_ERROR = ("raise", "zero", "skip")
POOLS = ("thread", "process")
# Metric names the logger already uses under `reward/`; a part may not shadow them.
RESERVED = {
    "mean",
    "std",
    "hist",
    "error",
    "errors",
    "first_error",
    "timeouts",
    "skipped",
    "score_s",
    "greedy_mean",
    "uniform_group_frac",
}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


@dataclass
class RewardPartConfig:
    name: str | None = None
    """Metric name, logged as `reward/<name>`; default: the function's name."""
    fn: str | None = None
    """Required. `pkg.module:fn`, `path/to/file.py:fn` or a registered name (`math`, `regex`, ...)."""
    weight: float = 1.0
    """The reward is the weighted sum of the parts' scores."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for this part (a class gets them in its constructor)."""


@dataclass
class RewardConfig:
    fn: str | None = None
    """A single reward (see `parts`); null with no parts uses the built-in task's verifier."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for `fn` (a class gets them in its constructor)."""
    parts: list[RewardPartConfig] = field(default_factory=list)
    """Several rewards combined with weights, each logged as `reward/<name>`; excludes `fn`."""
    on_error: str = "zero"
    """A failed call (exception, timeout, non-finite): raise | zero (part scores 0) | skip."""
    timeout_s: float | None = 60.0
    """Per-call limit in seconds (a batched reward's call covers its whole batch); null = none."""
    pool: str = "thread"
    """Where calls run: thread (shared memory; a timed-out call is abandoned, not killed) |
    process (separate processes; a timed-out call's process is killed and replaced)."""
    workers: int = 4
    """Calls that run at once (threads or processes)."""


def part_name(spec: str) -> str:
    """Default metric name of a reward spec: `pkg.mod:fn` -> `fn`, `math` -> `math`."""
    return spec.rpartition(":")[2].rpartition(".")[2]


def resolved_parts(cfg: RewardConfig) -> list[RewardPartConfig]:
    """The parts to score: `cfg.parts`, or one part from `cfg.fn` (or `task` when unset)."""
    from rlsys.config import ConfigError  # here: rlsys.config imports this module

    if cfg.parts:
        out = []
        for i, p in enumerate(cfg.parts):
            if not isinstance(p, RewardPartConfig):
                try:
                    p = RewardPartConfig(**dict(p))
                except TypeError as e:
                    keys = "name, fn, weight, kwargs"
                    raise ConfigError(f"reward.parts[{i}]: {e} (keys: {keys})") from None
            if not p.fn:
                raise ConfigError(f"reward.parts[{i}].fn is required (e.g. fn: math)")
            out.append(RewardPartConfig(p.name or part_name(p.fn), p.fn, p.weight, dict(p.kwargs)))
        return out
    spec = cfg.fn or "task"
    return [RewardPartConfig(part_name(spec), spec, 1.0, dict(cfg.kwargs))]


def resolve_paths(cfg: RewardConfig, base: str | Path | None = None) -> RewardConfig:
    """A copy of `cfg` whose `path/to/file.py:fn` specs are absolute (relative to `base`,
    default the working directory), so that Ray workers with another cwd find the files."""

    def fix(spec: str | None) -> str | None:
        if spec is None or ":" not in spec:
            return spec
        path, _, attr = spec.rpartition(":")
        if not path.endswith(".py") or Path(path).is_absolute():
            return spec
        return f"{(Path(base or '.') / path).resolve()}:{attr}"

    parts = [
        replace(p, fn=fix(p.fn)) if isinstance(p, RewardPartConfig) else {**p, "fn": fix(p["fn"])}
        for p in cfg.parts
    ]
    return replace(cfg, fn=fix(cfg.fn), parts=parts)


def validate_reward_config(cfg: RewardConfig, task: str | None) -> None:
    """Check `cfg` and resolve (import) every reward it names, without calling `setup()` or
    starting anything. Raises `ConfigError` naming the key and the fix."""
    from rlsys.config import ConfigError
    from rlsys.reward.api import check_call_form, check_kwargs, resolve_target

    _choice("reward.on_error", cfg.on_error, ON_ERROR)
    _choice("reward.pool", cfg.pool, POOLS)
    if cfg.workers < 1:
        raise ConfigError(f"reward.workers must be >= 1, got {cfg.workers}")
    if cfg.timeout_s is not None and not cfg.timeout_s > 0:
        raise ConfigError(
            f"reward.timeout_s must be > 0 (or null for no limit), got {cfg.timeout_s}"
        )
    if cfg.fn is not None and cfg.parts:
        raise ConfigError("reward: set either reward.fn or reward.parts, not both")
    if cfg.kwargs and cfg.parts:
        raise ConfigError("reward.kwargs applies to reward.fn; give each part its own kwargs")
    if cfg.fn is None and not cfg.parts and task is None:
        raise ConfigError("reward.fn (or reward.parts) is required when data.task is null")
    seen: set[str] = set()
    for i, p in enumerate(resolved_parts(cfg)):
        where = f"reward.parts[{i}]" if cfg.parts else "reward.fn"
        assert p.name is not None
        if cfg.parts and (not _NAME.match(p.name) or p.name in RESERVED):
            raise ConfigError(
                f"{where}.name: '{p.name}' is not a valid metric name (letters, digits, _ . -; "
                f"not one of {', '.join(sorted(RESERVED))})"
            )
        if p.name in seen:
            raise ConfigError(f"{where}.name: '{p.name}' is used twice; give each part a name")
        seen.add(p.name)
        if not isinstance(p.weight, (int, float)) or p.weight != p.weight:
            raise ConfigError(f"{where}.weight must be a number, got {p.weight!r}")
        obj, _ = resolve_target(p.fn, task)
        if not callable(obj):
            raise ConfigError(f"{where}: reward '{p.fn}' is not callable")
        check_kwargs(p.fn, obj, p.kwargs)
        check_call_form(p.fn, obj)
        if cfg.pool == "process" and getattr(obj, "thread_only", False):
            raise ConfigError(f"{where}: reward '{p.fn}' runs only with reward.pool: thread")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    from rlsys.config import ConfigError

    if value not in options:
        close = difflib.get_close_matches(value, options, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(options)}.{hint}")
