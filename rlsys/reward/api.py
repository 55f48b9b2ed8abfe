"""The reward contract: what a reward is, how a recipe names it, how it is called.

A reward is a plain function or a class. Four call forms, each sync or `async def`:

- per sample: `fn(prompt: str, response: str, **meta) -> float | dict`. `meta` holds the
  dataset record's extra fields (e.g. `answer`) updated with the recipe's `kwargs` (kwargs win).
  A function without `**meta` gets only the keys it names.
- batched: `fn(samples: list[Sample], **kwargs) -> list[float | dict]`, one result per sample,
  in order. Each `Sample` carries its token ids, and its `meta` holds the dataset fields plus
  `prompt_text` and `response_text`. Declared with `@rlsys.reward(batched=True)`, a class
  attribute `batched = True`, or by naming the first parameter `samples`.
- class: `cls(**kwargs)` is built with the recipe's kwargs in the scoring process and in each
  pool process (keep `__init__` cheap); an optional `setup()` runs once per process before the
  first call, where the calls run (load a model, open a client there); an optional `close()`
  runs when the scorer closes. Its `__call__` takes the per-sample form (without the
  kwargs) or the batched form (`samples` only).

Returns: a number, or a dict with `score` plus other named numbers that are logged as
`reward/<name>` (`reward/<part>/<name>` inside a weighted combination). Every returned number
must be finite; anything else (NaN, inf, a missing `score`, a wrong-length batch, an exception,
a timeout) is an error, handled by the recipe's `reward.on_error` (see `rlsys.reward.config`).

Naming in a recipe (`reward.fn`, `reward.parts[].fn`):

- `pkg.module:fn` (importable module) or `path/to/file.py:fn` (relative to the working dir);
- a registered name: a built-in (`math`, `exact_match`, `numeric_match`, `regex`, `length`,
  `overlong`, `code_tests`, `reward_model`, `task`; see `rlsys.reward.builtin`) or one
  registered with `@rlsys.reward(name=...)` by a module that the scoring process imports.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rlsys.config import ConfigError

if TYPE_CHECKING:
    from rlsys.types import Sample

F = TypeVar("F")

_REGISTRY: dict[str, Any] = {}
"""Names registered with `@reward(name=...)` -> the function or class."""


@dataclass(frozen=True)
class RewardMeta:
    """What `@reward` attaches to a function or class (as `__rlsys_reward__`)."""

    name: str
    batched: bool | None


def reward(fn: F | None = None, *, name: str | None = None, batched: bool | None = None) -> Any:
    """Register a reward function or class under `name` (default: its `__name__`).

    Usable bare (`@reward`) or with arguments (`@reward(name="judge", batched=True)`).
    `batched=True` declares the batched form `fn(samples, **kwargs) -> list`; `None` infers it
    (first parameter named `samples`). The object is returned unchanged, so it stays callable.
    """

    def register(obj: F) -> F:
        if not callable(obj):
            raise TypeError(f"@reward needs a function or class, got {type(obj).__name__}")
        key = name or getattr(obj, "__name__", None)
        if not key or ":" in key:
            raise ValueError(f"@reward: invalid name {key!r} (a name must not contain ':')")
        old = _REGISTRY.get(key)
        if old is not None and _source(old) != _source(obj):
            raise ValueError(
                f"@reward: name '{key}' is already registered by {_origin(old)}; pick another"
            )
        obj.__rlsys_reward__ = RewardMeta(key, batched)  # type: ignore[attr-defined]
        _REGISTRY[key] = obj  # re-importing the same module replaces its own entry
        return obj

    return register(fn) if fn is not None else register


def registered() -> dict[str, str]:
    """All names usable as `fn` in a recipe -> where they point."""
    from rlsys.reward.builtin import BUILTINS

    out = dict(BUILTINS)
    out.update({k: _origin(v) for k, v in _REGISTRY.items()})
    return out


def _source(obj: Any) -> tuple[str, str]:
    """(defining file or module, qualname): the same file loaded by path and by module name
    is the same reward."""
    mod = getattr(obj, "__module__", "?")
    file = getattr(sys.modules.get(mod), "__file__", None)
    return (str(Path(file).resolve()) if file else mod, getattr(obj, "__qualname__", "?"))


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', '?')}"


# ---------------------------------------------------------------------------------------------
# resolving names


def load_callable(spec: str, what: str = "reward") -> Callable[..., Any]:
    """Resolve `pkg.module:name` or `path/to/file.py:name` to the object it names.

    Raises `ConfigError` naming the missing module, file or attribute (and `what` the spec
    is: "reward", "rollout.agent.env", ...)."""
    if ":" not in spec:
        raise ConfigError(f"{what} '{spec}': expected 'pkg.module:fn' or 'path/to/file.py:fn'")
    mod_part, _, attr = spec.rpartition(":")
    if mod_part.endswith(".py"):
        module = _load_file(spec, Path(mod_part), what)
    else:
        try:
            module = importlib.import_module(mod_part)
        except ModuleNotFoundError as e:
            if e.name and (mod_part == e.name or mod_part.startswith(e.name + ".")):
                raise ConfigError(f"{what} '{spec}': no module named '{mod_part}'") from None
            raise ConfigError(f"{what} '{spec}': importing '{mod_part}' failed: {e}") from None
        except Exception as e:  # a user module that fails on import
            raise ConfigError(
                f"{what} '{spec}': importing '{mod_part}' failed: {type(e).__name__}: {e}"
            ) from None
    obj: Any = module
    for part in attr.split("."):  # `Class.method` and nested names
        if not hasattr(obj, part):
            close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")])
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{what} '{spec}': '{mod_part}' has no attribute '{attr}'.{hint}")
        obj = getattr(obj, part)
    return obj


def _load_file(spec: str, path: Path, what: str = "reward") -> Any:
    if not path.is_file():
        raise ConfigError(f"{what} '{spec}': file not found: {path}")
    resolved = str(path.resolve())
    # A stable name (not hash(), which is salted per process) so that every process that loads
    # the file gets the same module name in tracebacks.
    digest = hashlib.sha1(resolved.encode()).hexdigest()[:10]
    name = f"rlsys_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, resolved)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(
            f"{what} '{spec}': loading {path} failed: {type(e).__name__}: {e}"
        ) from None
    return module


def resolve_target(spec: str, task: str | None = None) -> tuple[Any, str]:
    """The function or class that `spec` names, and an import spec that re-creates it in another
    process (`pkg.module:attr` or `/abs/file.py:attr`). Raises `ConfigError`."""
    if ":" in spec:
        mod_part, _, attr = spec.rpartition(":")
        obj = load_callable(spec)
        if mod_part.endswith(".py"):
            return obj, f"{Path(mod_part).resolve()}:{attr}"
        return obj, spec
    if spec == "task":
        from rlsys.tasks import TASKS

        if task is None or task not in TASKS:
            raise ConfigError(
                f"reward 'task' uses the built-in task's verifier, but data.task is {task!r}"
            )
        mod = TASKS[task]
        return mod.reward, f"{mod.__name__}:reward"
    from rlsys.reward.builtin import BUILTINS

    if spec in BUILTINS:
        return load_callable(BUILTINS[spec]), BUILTINS[spec]
    if spec in _REGISTRY:
        obj = _REGISTRY[spec]
        return obj, _import_spec_of(obj)
    names = sorted(set(BUILTINS) | set(_REGISTRY) | {"task"})
    close = difflib.get_close_matches(spec, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"reward '{spec}': not a registered reward name.{hint} Registered: {', '.join(names)}; "
        "or name a function as 'pkg.module:fn' or 'path/to/file.py:fn'"
    )


def _import_spec_of(obj: Any) -> str:
    mod = sys.modules.get(obj.__module__)
    file = getattr(mod, "__file__", None)
    if obj.__module__.startswith("rlsys_user_") and file:
        return f"{file}:{obj.__qualname__}"
    return f"{obj.__module__}:{obj.__qualname__}"


# ---------------------------------------------------------------------------------------------
# calling


def _params(fn: Any) -> tuple[list[str], bool]:
    """Named parameters of `fn` and whether it takes `**kwargs`."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return [], True
    names = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)
    ]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def _is_batched(obj: Any) -> bool:
    meta = getattr(obj, "__rlsys_reward__", None)
    if meta is not None and meta.batched is not None:
        return bool(meta.batched)
    if inspect.isclass(obj):
        if isinstance(getattr(obj, "batched", None), bool):
            return obj.batched
        names, _ = _params(obj.__call__)
        return names[1:2] == ["samples"]  # skip self
    names, _ = _params(obj)
    return names[:1] == ["samples"]


def check_call_form(spec: str, obj: Any) -> None:
    """ConfigError when `obj` (a reward function or class) cannot be called the way its form
    is (module docstring): `(prompt, response, **meta)` per sample, `(samples)` batched."""
    batched = _is_batched(obj)
    target = obj
    if inspect.isclass(obj):
        target = next(
            (k.__dict__["__call__"] for k in obj.__mro__ if "__call__" in k.__dict__), None
        )
        if target is None:
            raise ConfigError(f"reward '{spec}': class {obj.__name__} has no __call__ method")
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return
    if inspect.isclass(obj) and params:
        params = params[1:]  # self
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p.name for p in params if p.kind in kinds]
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return
    need = ["samples"] if batched else ["prompt", "response"]
    if len(positional) < len(need):
        form = "(samples, **kwargs)" if batched else "(prompt, response, **meta)"
        raise ConfigError(
            f"reward '{spec}' takes ({', '.join(positional)}), but a "
            f"{'batched' if batched else 'per-sample'} reward is called as {form}; see "
            "the reward contract in the README (Rewards)"
        )


def check_kwargs(spec: str, obj: Any, kwargs: dict[str, Any]) -> None:
    """ConfigError when `obj` (a reward function or class) cannot take `kwargs`."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    names, var_kw = _params(target)
    unknown = [] if var_kw else sorted(set(kwargs) - set(names))
    if unknown:
        taken = [n for n in names if n not in ("self", "prompt", "response", "samples")]
        raise ConfigError(
            f"reward '{spec}' does not take keyword argument(s) {', '.join(unknown)} "
            f"(it takes: {', '.join(taken) or 'none'})"
        )
    if inspect.isclass(obj):  # the recipe's kwargs are all a constructor gets
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return
        for p in sig.parameters.values():
            required = p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            if required and p.name not in kwargs:
                raise ConfigError(f"reward '{spec}' needs keyword argument '{p.name}' (kwargs)")


def normalize(out: Any) -> tuple[float, dict[str, float]]:
    """A reward's return value as `(score, extras)`; raises on anything off-contract."""
    extras: dict[str, float] = {}
    if isinstance(out, dict):
        if "score" not in out:
            raise ValueError(f"reward returned a dict without 'score': keys {sorted(out)}")
        for k, v in out.items():
            if k == "score":
                continue
            try:
                extras[str(k)] = float(v)
            except (TypeError, ValueError):
                raise TypeError(f"reward extra '{k}' is not a number: {v!r}") from None
            if not math.isfinite(extras[str(k)]):
                raise ValueError(f"reward extra '{k}' is not finite: {v}")
        out = out["score"]
    try:
        score = float(out)
    except (TypeError, ValueError):
        raise TypeError(f"reward returned {type(out).__name__}, expected a number") from None
    if not math.isfinite(score):
        raise ValueError(f"reward returned a non-finite score: {score}")
    return score, extras


class RewardTimeout(TimeoutError):
    """A reward call did not return within `reward.timeout_s`."""


_TEXT_KEYS = ("prompt_text", "response_text")
_local = threading.local()


def run_awaitable(aw: Any, timeout_s: float | None) -> Any:
    """Run a coroutine to completion on this thread's own event loop; a coroutine that awaits is
    cancelled at `timeout_s` (raises `RewardTimeout`)."""
    loop = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = _local.loop = asyncio.new_event_loop()
    if timeout_s is None:
        return loop.run_until_complete(aw)
    try:
        return loop.run_until_complete(asyncio.wait_for(aw, timeout_s))
    except asyncio.TimeoutError:
        raise RewardTimeout(f"no result within timeout_s={timeout_s}") from None


class LoadedReward:
    """One resolved reward, ready to call: the function or class instance, its kwargs, its form.

    `spec` re-creates it in another process (`load_reward(spec, kwargs)`), which is how process
    pools get their own copy (functions loaded from files do not pickle).
    """

    def __init__(self, obj: Any, kwargs: dict[str, Any] | None = None, spec: str = "") -> None:
        self.spec = spec or _origin(obj)
        self.kwargs = dict(kwargs or {})
        self.batched = _is_batched(obj)
        if inspect.isclass(obj):
            self.fn: Any = obj(**self.kwargs)  # kwargs go to the constructor, not the calls
            self.call_kwargs: dict[str, Any] = {}
            target = self.fn.__call__
        else:
            self.fn, self.call_kwargs, target = obj, self.kwargs, obj
        names, var_kw = _params(target)
        self._accepts = None if var_kw else set(names)
        self._setup_done = False
        self._lock = threading.Lock()

    def setup(self) -> None:
        """Run the class's `setup()` once (thread-safe); no-op for functions."""
        with self._lock:
            if not self._setup_done:
                if callable(getattr(self.fn, "setup", None)) and not inspect.isfunction(self.fn):
                    self.fn.setup()
                self._setup_done = True

    def close(self) -> None:
        if callable(getattr(self.fn, "close", None)) and not inspect.isfunction(self.fn):
            self.fn.close()

    def call_one(
        self, prompt: str, response: str, meta: dict[str, Any], timeout_s: float | None = None
    ) -> tuple[float, dict[str, float]]:
        """Per-sample call (a batched reward gets a one-sample batch)."""
        if self.batched:
            from rlsys.types import Sample

            s = Sample(-1, 0, [], meta={**meta, "prompt_text": prompt, "response_text": response})
            return self.call_batch([s], timeout_s)[0]
        kw = {**meta, **self.call_kwargs}
        if self._accepts is not None:
            kw = {k: v for k, v in kw.items() if k in self._accepts}
        self.setup()
        out = self.fn(prompt, response, **kw)
        if inspect.isawaitable(out):
            out = run_awaitable(out, timeout_s)
        return normalize(out)

    def call_batch(
        self, samples: list[Sample], timeout_s: float | None = None
    ) -> list[tuple[float, dict[str, float]]]:
        """Batched call: one `(score, extras)` per sample."""
        if not self.batched:
            out = []
            for s in samples:
                meta = {k: v for k, v in s.meta.items() if k not in _TEXT_KEYS}
                out.append(
                    self.call_one(s.meta["prompt_text"], s.meta["response_text"], meta, timeout_s)
                )
            return out
        self.setup()
        out = self.fn(samples, **self.call_kwargs)
        if inspect.isawaitable(out):
            out = run_awaitable(out, timeout_s)
        if not isinstance(out, (list, tuple)) or len(out) != len(samples):
            got = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
            raise ValueError(f"batched reward returned {got} results for {len(samples)} samples")
        return [normalize(x) for x in out]


def load_reward(
    spec: str, kwargs: dict[str, Any] | None = None, task: str | None = None
) -> LoadedReward:
    """Resolve `spec`, check `kwargs` against it and instantiate it (no `setup()` yet)."""
    obj, import_spec = resolve_target(spec, task)
    if not callable(obj):
        raise ConfigError(f"reward '{spec}': {type(obj).__name__} object is not callable")
    check_kwargs(spec, obj, dict(kwargs or {}))
    try:
        return LoadedReward(obj, kwargs, import_spec)
    except ConfigError:
        raise
    except Exception as e:  # a class whose constructor rejects the recipe's kwargs
        raise ConfigError(
            f"reward '{spec}': constructing it failed: {type(e).__name__}: {e}"
        ) from None


# ---------------------------------------------------------------------------------------------
# the pre-scorer interface, kept until the rollout worker switches to `build_scorer`


class RewardFn:
    """A reward with fixed keyword arguments, called as `(prompt, response, meta) ->
    (score, extras)` in the caller's thread (no pool, no timeout). Any call form works."""

    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any] | None = None) -> None:
        self.fn = fn
        self.kwargs = dict(kwargs or {})
        self._loaded = LoadedReward(fn, kwargs)

    def __call__(self, prompt: str, response: str, meta: dict[str, Any]) -> tuple[float, dict]:
        return self._loaded.call_one(prompt, response, meta)


def build_reward(fn_spec: str | None, kwargs: dict[str, Any], task: str | None) -> RewardFn:
    """The recipe's reward: `reward.fn` if set, else the built-in task's verifier."""
    if fn_spec is None:
        if task is None:
            raise ConfigError("reward.fn is required when data.task is null")
        fn_spec = "task"
    obj, _ = resolve_target(fn_spec, task)
    check_kwargs(fn_spec, obj, kwargs)
    return RewardFn(obj, kwargs)
