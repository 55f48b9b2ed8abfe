"""Code rewards: run the response's program against the sample's tests in a subprocess.

All execution goes through one function, `run_python(code, timeout_s, memory_mb)`, so that the
minimal runner here can be swapped for the locked-down sandbox in `rlsys.rollout.tools` (its
`PythonSandbox(timeout_s=...).run(code)` has the same shape: code in, output and status out).

The runner here is *minimal*, not a security boundary: a fresh `python -I -S` in a throwaway
directory, its own session (the whole process group is killed at the timeout), a minimal
environment (no API keys inherited), rlimits on memory, CPU time, file size and core dumps.
It does not stop reads of the filesystem or network access, and a policy that learns to
tamper with the test harness in-process can fool it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

_MAX_OUTPUT = 64 * 1024  # bytes of stdout/stderr kept (files are capped by RLIMIT_FSIZE)

_PRELUDE = """\
import resource as _r
for _k, _v in (("RLIMIT_AS", {mem}), ("RLIMIT_CPU", {cpu}), ("RLIMIT_FSIZE", {fsize}),
               ("RLIMIT_CORE", 0)):
    _r.setrlimit(getattr(_r, _k), (_v, _v))
del _r, _k, _v
"""


@dataclass
class RunResult:
    """What a run produced. `ok`: exited 0 within the time limit."""

    returncode: int | None  # None when killed at the timeout
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 512) -> RunResult:
    """Run `code` as a script in a fresh interpreter and a temporary directory; never raises for
    anything the code does. The swap point for a stronger sandbox."""
    with tempfile.TemporaryDirectory(prefix="rlsys-code-") as tmp:
        path = os.path.join(tmp, "main.py")
        prelude = _PRELUDE.format(
            mem=memory_mb << 20, cpu=max(int(timeout_s) + 1, 1), fsize=16 << 20
        )
        with open(path, "w", encoding="utf-8") as f:
            f.write(prelude + code)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        t0 = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", path],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            try:  # the whole group: also what the code left running in the background
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        duration = time.perf_counter() - t0
        return RunResult(
            None if timed_out else proc.returncode,
            _read(out_path),
            _read(err_path),
            timed_out,
            duration,
        )


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(_MAX_OUTPUT).decode("utf-8", errors="replace")


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The last fenced ```python block (or the last fenced block of any language), else the
    whole response."""
    blocks = _FENCE.findall(response)
    py = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if py:
        return py[-1]
    return blocks[-1][1] if blocks else response


_HARNESS = """
def _rlsys_harness(_code, _tests, _marker):
    import json, os
    _write, _fd = os.write, os.dup(1)
    _ns = {{"__name__": "__main__"}}
    _passed = 0
    try:
        exec(compile(_code, "solution.py", "exec"), _ns)
        _ok = True
    except BaseException:
        import traceback; traceback.print_exc()
        _ok = False
    for _t in _tests if _ok else []:
        try:
            exec(compile(_t, "test.py", "exec"), _ns)
            _passed += 1
        except BaseException:
            import traceback; traceback.print_exc()
    _write(_fd, ("\\n" + _marker + json.dumps(_passed) + "\\n").encode())

_rlsys_harness({code!r}, {tests!r}, {marker!r})
"""


def code_tests(
    prompt: str,
    response: str,
    tests: str | list[str],
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    **_: Any,
) -> dict[str, float]:
    """Fraction of `tests` (the sample's field: one test string, or a list) that pass after the
    response's code (see `extract_code`) runs; each test is Python source, usually `assert`s.
    A program that crashes, times out or fails every test scores 0 (that is a score, not a
    reward error). Extras: `passed`, `total`, `timed_out`."""
    tests = [tests] if isinstance(tests, str) else list(tests)
    if not tests:
        raise ValueError("code_tests: the sample has no tests")
    marker = f"@@rlsys-{secrets.token_hex(8)}@@"
    program = _HARNESS.format(code=extract_code(response), tests=tests, marker=marker)
    res = run_python(program, timeout_s=timeout_s, memory_mb=memory_mb)
    passed = 0
    for line in res.stdout.splitlines():
        if line.startswith(marker):
            try:
                passed = int(json.loads(line[len(marker) :]))
            except ValueError:
                passed = 0
    passed = min(max(passed, 0), len(tests))
    return {
        "score": passed / len(tests),
        "passed": float(passed),
        "total": float(len(tests)),
        "timed_out": float(res.timed_out),
    }
