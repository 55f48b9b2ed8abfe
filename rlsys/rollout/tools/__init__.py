"""The Env / Tool API of multi-turn rollouts (re-exported by `rlsys.rollout.agent`).

An env (`Env`) is built once per trajectory, gets the task record at `reset(meta)` and, after
each assistant turn, `step(text)` returns a `StepResult`: the observation (text, a chat message
or a list of them), an optional step reward, done. `ToolEnv` is the built-in env that parses
tool calls out of the assistant text and runs `Tool`s. `AgentConfig` (`rollout.agent`) names
the env and tools of a recipe. This package imports neither torch nor `rlsys.config`, so the
recipe schema can import its config classes.

A tool is any object with a `name`, a one-paragraph `description` (for the system prompt) and
`__call__(**arguments) -> ToolResult | str`; a plain function with those attributes works too.
Recipes name tools like rewards: a built-in name (`python`) or `pkg.module:Class` /
`path/to/file.py:Class`, constructed with the recipe's keyword arguments.

- `sandbox.py`: `PythonSandbox`, the locked-down subprocess runner.
- `python_tool.py`: `PythonTool`, the `python` tool on top of it.
- `parsers.py`: `CodeBlockParser` (fenced blocks), `JSONToolCallParser` (`<tool_call>` JSON).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rlsys.rollout.tools.parsers import ToolCallParser, build_parser

TERMINATIONS = ("done", "max_turns", "max_tokens", "tool_error", "aborted", "error")
"""Why a trajectory ended (`Sample.stop_reason`); `aborted` ones may be continued."""


@dataclass
class ToolResult:
    """A tool's answer. `ok=False` marks a failed call (shown to the model, counted in
    metrics); `fatal=True` means the tool cannot work at all and ends the trajectory with
    termination reason `tool_error`."""

    output: str
    ok: bool = True
    fatal: bool = False


@runtime_checkable
class Tool(Protocol):
    """A function the model may call by `name`. `__call__` takes the parsed keyword arguments
    and returns a `ToolResult` or a plain string (= success). Exceptions it raises are caught
    by the env and shown to the model as an error observation; it never runs model-written
    code in the calling process (use `PythonSandbox`)."""

    name: str
    description: str

    def __call__(self, **arguments: Any) -> ToolResult | str: ...


TOOLS = {"python": "rlsys.rollout.tools.python_tool:PythonTool"}
"""Built-in tool names and the classes they stand for (resolved lazily)."""


def build_tool(spec: str | Tool, **kwargs: Any) -> Tool:
    """A tool from a built-in name, a `pkg.module:Class` / `file.py:Class` spec (constructed
    with `kwargs`), or a tool object as is."""
    if not isinstance(spec, str):
        return spec
    from rlsys.reward.api import load_callable

    return load_callable(TOOLS.get(spec, spec), "rollout.agent.tools")(**kwargs)


# ---------------------------------------------------------------------------------------------
# config


@dataclass
class AgentConfig:
    """Which env and tools a multi-turn rollout uses (`rollout.agent`)."""

    env: str | None = None
    """null = single-turn; `tools` = the built-in ToolEnv; or `pkg.module:Class` / `file.py:Class`."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the env class (one instance per trajectory)."""
    tools: list[str] = field(default_factory=lambda: ["python"])
    """ToolEnv: built-in tool names (`python`) or `pkg.module:Class` specs."""
    tool_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """ToolEnv: constructor arguments per tool spec, e.g. {python: {timeout_s: 5}}."""
    parser: str = "code_block"
    """ToolEnv: tool-call format: code_block | json | `pkg.module:Class`."""
    max_tool_errors: int = 3
    """ToolEnv: end with `tool_error` after this many consecutive turns whose calls all
    failed; 0 = never."""
    observation_role: str = "user"
    """Chat role for observations given as plain text."""
    env_workers: int = 4
    """Threads stepping envs (tool calls) concurrently."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        from rlsys.rollout.tools.parsers import PARSERS

        if self.parser not in PARSERS and ":" not in self.parser:
            raise ValueError(
                f"agent.parser: '{self.parser}' is not one of {', '.join(PARSERS)} "
                "nor a 'pkg.module:Class' / 'file.py:Class' spec"
            )
        if self.env not in (None, "tools") and ":" not in self.env:
            raise ValueError(
                f"agent.env: '{self.env}' is not `tools` (the built-in tool env) nor a "
                "'pkg.module:Class' / 'file.py:Class' spec"
            )
        unknown = [t for t in self.tools if t not in TOOLS and ":" not in t]
        if unknown:
            raise ValueError(f"agent.tools: unknown tools {unknown} (built-in: {', '.join(TOOLS)})")
        if self.max_tool_errors < 0 or self.env_workers < 1:
            raise ValueError("agent.max_tool_errors must be >= 0 and agent.env_workers >= 1")
        if not self.observation_role:
            raise ValueError("agent.observation_role must be a non-empty chat role")


# ---------------------------------------------------------------------------------------------
# envs


@dataclass
class StepResult:
    """What an env returns after an assistant turn."""

    observation: str | dict | list[dict] | None = None
    """Text (wrapped with `observation_role`), chat message(s), or None (nothing to add)."""
    reward: float = 0.0
    """Step reward, summed into `Trajectory.env_reward`."""
    done: bool = False
    """The episode is over (termination reason `done`)."""
    termination: str | None = None
    """End now with this reason instead (e.g. `tool_error`); one of TERMINATIONS."""
    info: dict[str, float] = field(default_factory=dict)
    """Counters for metrics: `tool_calls`, `tool_ok`."""


@runtime_checkable
class Env(Protocol):
    def reset(self, meta: dict[str, Any]) -> None:
        """Start an episode for the task record `meta`."""
        ...

    def step(self, action: str) -> StepResult:
        """React to one assistant turn (its decoded text)."""
        ...


class ToolEnv:
    """Parses tool calls out of each assistant turn and runs them. A turn without any tool
    call (or attempt at one) is the final answer: done. Malformed calls, unknown tools, tools
    that raise or fail become error observations; a fatal tool result or `max_tool_errors`
    consecutive failed turns end the trajectory with `tool_error`."""

    def __init__(
        self,
        tools: Sequence[Tool],
        parser: ToolCallParser | str = "code_block",
        max_tool_errors: int = 3,
        max_calls_per_turn: int = 4,
    ) -> None:
        self.tools = {t.name: t for t in tools}
        self.parser = build_parser(parser)
        self.max_tool_errors = max_tool_errors
        self.max_calls_per_turn = max_calls_per_turn
        self.failed_streak = 0

    def reset(self, meta: dict[str, Any]) -> None:
        self.failed_streak = 0

    def state_dict(self) -> dict:
        return {"failed_streak": self.failed_streak}

    def load_state_dict(self, state: dict) -> None:
        self.failed_streak = int(state["failed_streak"])

    def step(self, action: str) -> StepResult:
        parsed = self.parser.parse(action)
        if parsed.empty:
            return StepResult(done=True)
        parts = [f"Error: {e}" for e in parsed.errors]
        calls, ok, fatal = len(parsed.errors), 0, False
        for i, call in enumerate(parsed.calls):
            if i == self.max_calls_per_turn:
                parts.append(f"Error: at most {self.max_calls_per_turn} tool calls per turn")
                calls += 1
                break
            calls += 1
            res = self._call(call.name, call.arguments)
            ok += res.ok
            fatal |= res.fatal
            parts.append(res.output if not res.ok else f"Output:\n{res.output}")
        self.failed_streak = 0 if ok else self.failed_streak + 1
        term = None
        if fatal or (self.max_tool_errors and self.failed_streak >= self.max_tool_errors):
            term = "tool_error"
        info = {"tool_calls": float(calls), "tool_ok": float(ok)}
        return StepResult("\n\n".join(parts), termination=term, info=info)

    def _call(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        tool = self.tools.get(name)
        if tool is None:
            known = ", ".join(sorted(self.tools)) or "none"
            return ToolResult(f"Error: unknown tool '{name}' (available: {known})", ok=False)
        try:
            res = tool(**arguments)
        except Exception as e:  # a tool's bug or bad arguments: the model sees it
            return ToolResult(f"Error: tool '{name}' raised {type(e).__name__}: {e}", ok=False)
        return res if isinstance(res, ToolResult) else ToolResult(str(res))


__all__ = [
    "TERMINATIONS",
    "AgentConfig",
    "TOOLS",
    "Env",
    "StepResult",
    "Tool",
    "ToolEnv",
    "ToolResult",
    "build_tool",
]
