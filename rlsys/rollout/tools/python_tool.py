"""The `python` tool: run model-written code in the sandbox and return what it printed."""

from __future__ import annotations

from typing import Any

from rlsys.rollout.tools import ToolResult
from rlsys.rollout.tools.sandbox import PythonSandbox, SandboxConfig


class PythonTool:
    """`python(code)`: execute `code` in a fresh `PythonSandbox`; stdout is the result.

    A run that exits non-zero or times out is a failed call whose output carries the
    (truncated) traceback or the timeout, so the model can fix its code.
    """

    name = "python"
    description = (
        "Run Python 3 code in a sandbox (standard library only, no network, no files outside "
        "its working directory) and return what it prints. Write the code in a ```python "
        "fenced block and print() the values you need."
    )

    def __init__(self, sandbox: PythonSandbox | None = None, **sandbox_options: Any) -> None:
        if sandbox is not None and sandbox_options:
            raise TypeError("pass either a sandbox or sandbox options, not both")
        self.sandbox = sandbox or PythonSandbox(SandboxConfig(**sandbox_options))

    def __call__(self, code: str = "", **unexpected: Any) -> ToolResult:
        if unexpected:
            names = ", ".join(sorted(unexpected))
            return ToolResult(f"python() got unexpected arguments: {names} (use 'code')", False)
        if not isinstance(code, str) or not code.strip():
            return ToolResult("python() needs non-empty code", ok=False)
        try:
            r = self.sandbox.run(code)
        except OSError as e:  # could not start a process at all: the tool is broken
            return ToolResult(f"sandbox unavailable: {e}", ok=False, fatal=True)
        if r.timed_out:
            limit = self.sandbox.config.timeout_s
            body = r.stdout + f"\nTimeoutError: the code ran longer than {limit:g} s and was killed"
            return ToolResult(body.strip(), ok=False)
        if r.returncode != 0:
            why = f"\n(killed by {r.signal})" if r.signal else ""
            return ToolResult((r.stdout + r.stderr + why).strip(), ok=False)
        out = r.stdout.strip()
        return ToolResult(out if out else "(no output; use print() to see values)", ok=True)
