"""The Python sandbox: limits, isolation from the worker, and that the worker survives."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from rlsys.rollout.tools.sandbox import PythonSandbox, isolation_report


@pytest.fixture(scope="module")
def sandbox() -> PythonSandbox:
    return PythonSandbox(timeout_s=1.0, cpu_s=3, memory_mb=256, max_output_bytes=2000)


@pytest.fixture(scope="module")
def landlock_abi() -> int:
    return int(isolation_report().get("landlock_abi", 0))


def test_runs_code_and_reports_isolation(sandbox):
    r = sandbox.run("import math\nprint(math.factorial(10))")
    assert r.ok and r.stdout == "3628800\n" and r.stderr == ""
    assert r.isolation["rlimits"] and r.isolation["audit_hook"]
    assert r.isolation["capabilities_dropped"]


def test_infinite_loop_is_killed_at_timeout_and_worker_keeps_running(sandbox):
    t0 = time.perf_counter()
    r = sandbox.run("print('started', flush=True)\nwhile True:\n    pass")
    took = time.perf_counter() - t0
    assert r.timed_out and not r.ok and r.returncode is None and r.signal == "SIGKILL"
    assert r.stdout == "started\n" and 0.9 < took < 3.0
    assert sandbox.run("print('still here')").stdout == "still here\n"  # and so are we


@pytest.mark.parametrize("hook", [True, False])  # False: the kernel (Landlock) layer alone
def test_writes_outside_the_working_directory_are_blocked(hook, landlock_abi, tmp_path):
    # The project's machines (dev and CI) run kernels with Landlock; a kernel without it
    # must fail here rather than pass on the audit hook alone.
    assert hook or landlock_abi, "Landlock is unavailable: only the audit hook blocks writes"
    sb = PythonSandbox(timeout_s=5.0, audit_hook=hook)
    targets = [str(tmp_path / "evil.txt"), f"/tmp/rlsys-evil-{uuid.uuid4().hex}"]
    code = "\n".join(
        [
            "import os",
            f"for p in {targets!r}:",
            "    try:",
            "        open(p, 'w').write('x')",
            "        print('WROTE', p)",
            "    except OSError as e:",
            "        print('blocked', type(e).__name__)",
            "open('inside.txt', 'w').write('ok')",
            "os.mkdir('sub')",
            "print(open('inside.txt').read(), os.listdir('.'))",
        ]
    )
    r = sb.run(code)
    assert r.ok, r.stderr
    assert r.stdout.count("blocked PermissionError") == 2 and "WROTE" not in r.stdout
    assert "ok [" in r.stdout
    assert not any(os.path.exists(p) for p in targets)


def test_worker_environment_is_not_visible(sandbox, monkeypatch):
    monkeypatch.setenv("RLSYS_TEST_SECRET", "hunter2")
    code = (
        "import os\n"
        "print(sorted(os.environ))\n"
        "try:\n"
        "    print(open(f'/proc/{os.getppid()}/environ', 'rb').read())\n"
        "except OSError as e:\n"
        "    print('blocked', type(e).__name__)\n"
    )
    r = sandbox.run(code)
    assert r.ok and "hunter2" not in r.stdout and "RLSYS_TEST_SECRET" not in r.stdout
    assert r.stdout.splitlines()[0] == "['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR']"
    assert "blocked PermissionError" in r.stdout


def test_kernel_layers_block_exec_network_and_signals(landlock_abi):
    assert landlock_abi, "Landlock is unavailable on this kernel"
    sb = PythonSandbox(timeout_s=5.0, audit_hook=False)
    code = (
        "import os, socket\n"
        "def attempt(name, fn):\n"
        "    try:\n"
        "        fn()\n"
        "        print(name, 'ALLOWED')\n"
        "    except OSError as e:\n"
        "        print(name, type(e).__name__)\n"
        "attempt('kill', lambda: os.kill(os.getppid(), 0))\n"
        "attempt('tcp', lambda: socket.create_connection(('127.0.0.1', 9), timeout=1))\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    try:\n"
        "        os.execv('/bin/true', ['true'])\n"
        "    finally:\n"
        "        os._exit(7)\n"
        "print('exec exit', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
    )
    r = sb.run(code)
    assert r.ok, r.stderr
    assert "exec exit 7" in r.stdout  # execve was denied, the child fell through to _exit(7)
    if landlock_abi >= 4:
        assert "tcp PermissionError" in r.stdout  # not ConnectionRefusedError
    if landlock_abi >= 6:
        assert "kill PermissionError" in r.stdout


def test_limits_and_failures_are_reported_not_raised(sandbox):
    mem = sandbox.run("x = bytearray(2 * 1024**3)")
    assert not mem.ok and "MemoryError" in mem.stderr
    err = sandbox.run("def f():\n    raise ValueError('boom')\nf()")
    assert err.returncode == 1 and err.stderr.splitlines()[-1] == "ValueError: boom"
    assert "sandbox.py" not in err.stderr and 'File "<tool>", line 2, in f' in err.stderr
    spam = sandbox.run("for i in range(100000):\n    print(i)")
    assert spam.ok and spam.truncated and len(spam.stdout) < 2100
    assert spam.stdout.startswith("0\n1\n") and spam.stdout.endswith("99999\n")
    blocked = sandbox.run("import subprocess")
    assert not blocked.ok and "not allowed" in blocked.stderr
    raise_limit = sandbox.run(
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\nprint('raised')"
    )
    assert not raise_limit.ok and "raised" not in raise_limit.stdout
    syntax = sandbox.run("print(")
    assert syntax.returncode == 1 and "SyntaxError" in syntax.stderr


def test_bad_options_are_rejected():
    with pytest.raises(TypeError):
        PythonSandbox(timeout=3)
    with pytest.raises(ValueError):
        PythonSandbox(timeout_s=0)
