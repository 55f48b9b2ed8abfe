"""Run untrusted, model-written Python in a separate, locked-down process.

`PythonSandbox.run(code)` never executes code in the calling process. It starts a fresh
interpreter (`python -I -S sandbox.py <spec>`: isolated mode, no site-packages by default)
whose bootstrap (`_child_main`, this file run as a script, stdlib only) locks itself down and
only then `exec`s the code. Layers, outermost first:

1. **Process**: own session/process group (the whole group is SIGKILLed at the wall-clock
   timeout and after every run), stdin from /dev/null, stdout/stderr to files outside the
   working directory, read back truncated (head + tail) to `max_output_bytes`.
2. **Environment**: a minimal `env` (PATH, HOME/TMPDIR = the working dir, LANG); nothing of the
   worker's environment (API keys, W&B tokens) is inherited. `-I` ignores PYTHON* variables.
3. **rlimits** (CPU seconds, address space, file size, open files, no core dumps). They are set
   by the bootstrap in the child, *not* in a `preexec_fn`: `preexec_fn` runs Python between
   fork and exec and can deadlock in a multi-threaded parent (a Ray actor with torch threads);
   lowering a hard limit in the child before user code runs is just as binding once
   capabilities are dropped (layer 5).
4. **Landlock** (Linux >= 5.13, unprivileged, irrevocable, inherited by children): the
   filesystem is read-only and limited to the Python stdlib and system libraries (plus
   `read_paths`); writes, creates, deletes, renames are allowed only under the throwaway
   working directory; `execve` is denied everywhere; TCP bind/connect are denied (ABI >= 4);
   signals and abstract unix sockets to processes outside the sandbox are denied (ABI >= 6).
   Landlock is checked after normal permissions, so it binds **root too** — which is why it
   was chosen here: the worker runs as root, so file permissions stop nothing, and dropping to
   `nobody` is not usable because the interpreter lives under /root (mode 700) and `nobody`
   could still write to /tmp and /dev/shm. Verified on this machine (kernel 6.18, ABI 7).
5. **Capabilities**: the bounding, ambient, effective, permitted and inheritable sets are
   emptied and `no_new_privs` is set, so a root child cannot raise its rlimits back, cannot
   override file permissions, and cannot read `/proc/<worker pid>/environ` (ptrace access
   check: the worker has capabilities the child lacks).
6. **Audit hook** (best effort, defence in depth and clearer error messages): blocks writes
   outside the directory, process creation (`os.fork`, `subprocess`, `os.system`, `exec*`,
   `posix_spawn`), `os.kill`, sockets, and `ctypes`. Python code can bypass an audit hook;
   layers 4-5 are what actually enforce.

If Landlock is unavailable (old kernel, or a seccomp profile that blocks its syscalls), layers
1-3, 5 and 6 still apply; `SandboxResult.isolation` says which layers were active, and
`strict=True` refuses to run user code without Landlock.

Known limits: reads are confined to the granted paths but those (stdlib, /usr, /lib) are
readable; UDP and unix-socket *paths* are not covered by Landlock's network rules (the audit
hook blocks `socket`); a fork bomb is only stopped by the audit hook and the process-group kill
(RLIMIT_NPROC is not enforced for uid 0).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------
# parent side


@dataclass
class SandboxConfig:
    """Limits of one sandboxed run."""

    timeout_s: float = 5.0
    """Wall-clock limit; the process group is SIGKILLed when it passes."""
    cpu_s: int = 5
    """RLIMIT_CPU seconds (SIGXCPU, then SIGKILL one second later)."""
    memory_mb: int = 512
    """RLIMIT_AS in MiB (allocations beyond it raise MemoryError)."""
    max_file_mb: int = 16
    """RLIMIT_FSIZE in MiB: the largest file (and stdout/stderr file) the code may write."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""
    max_output_bytes: int = 4096
    """stdout and stderr are each cut to this many bytes (head and tail kept)."""
    python: str | None = None
    """Interpreter to run; None = the worker's own (`sys.executable`)."""
    site_packages: bool = False
    """Let the code import third-party packages of the interpreter's environment (numpy, ...)."""
    read_paths: list[str] = field(default_factory=list)
    """Extra paths the code may read (Landlock); the stdlib and system libraries always are."""
    strict: bool = False
    """Refuse to run user code when Landlock is unavailable (instead of best-effort layers)."""
    audit_hook: bool = True
    """Install the best-effort audit hook (layer 6); tests turn it off to check layers 4-5."""


@dataclass
class SandboxResult:
    """What one run produced. `ok` is True when the code exited 0 within its limits."""

    stdout: str
    stderr: str
    returncode: int | None  # None when killed at the wall-clock timeout
    timed_out: bool
    signal: str | None  # e.g. SIGKILL, SIGXCPU, SIGXFSZ when a signal ended it
    truncated: bool  # stdout or stderr was cut to max_output_bytes
    duration_s: float
    isolation: dict[str, object] = field(default_factory=dict)  # the layers that were active

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"


class PythonSandbox:
    """Runs code strings in locked-down subprocesses (see the module docstring). Thread-safe:
    each `run` has its own directory and process."""

    def __init__(self, config: SandboxConfig | None = None, **overrides: object) -> None:
        cfg = config or SandboxConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"unknown sandbox option '{k}'")
            setattr(cfg, k, v)
        if cfg.timeout_s <= 0 or cfg.cpu_s <= 0 or cfg.memory_mb <= 0:
            raise ValueError("sandbox timeout_s, cpu_s and memory_mb must be > 0")
        self.config = cfg

    def _read_paths(self) -> list[str]:
        paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
        if self.config.site_packages:
            paths |= {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
            paths |= {p for p in sys.path if p and os.path.isdir(p)}
        paths |= {"/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share/zoneinfo"}
        paths |= set(self.config.read_paths)
        return sorted(p for p in paths if os.path.exists(p))

    def run(self, code: str) -> SandboxResult:
        """Execute `code` in a fresh sandbox and return its (truncated) output. Never raises
        for anything the code does; raises OSError only if no process can be started."""
        cfg = self.config
        root = tempfile.mkdtemp(prefix="rlsys-sbx-")
        try:
            work = os.path.join(root, "work")
            os.mkdir(work, 0o700)
            spec = {
                "code_path": os.path.join(root, "code.py"),
                "work": work,
                "read_paths": self._read_paths(),
                "cpu_s": int(cfg.cpu_s),
                "memory_bytes": int(cfg.memory_mb) << 20,
                "file_bytes": int(cfg.max_file_mb) << 20,
                "max_open_files": int(cfg.max_open_files),
                "strict": bool(cfg.strict),
                "audit_hook": bool(cfg.audit_hook),
            }
            with open(spec["code_path"], "w", encoding="utf-8") as f:
                f.write(code)
            spec_path = os.path.join(root, "spec.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            env = {
                "PATH": MINIMAL_PATH,
                "HOME": work,
                "TMPDIR": work,
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
            }
            status_r, status_w = os.pipe()
            out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
            flags = ["-I"] if cfg.site_packages else ["-I", "-S"]
            argv = [cfg.python or sys.executable, *flags, __file__, spec_path, str(status_w)]
            t0 = time.perf_counter()
            try:
                with open(out_path, "wb") as out, open(err_path, "wb") as err:
                    proc = subprocess.Popen(
                        argv,
                        cwd=work,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        pass_fds=(status_w,),
                        start_new_session=True,
                        close_fds=True,
                    )
            except BaseException:
                os.close(status_r)
                raise
            finally:
                os.close(status_w)
            timed_out = False
            try:
                proc.wait(timeout=cfg.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # also reaps anything the code left running in its group
            proc.wait()
            duration = time.perf_counter() - t0
            with os.fdopen(status_r, "rb") as f:
                raw_status = f.read()
            try:
                isolation = json.loads(raw_status or b"{}")
            except ValueError:
                isolation = {"error": "bad status from bootstrap"}
            stdout, cut_out = _read_truncated(out_path, cfg.max_output_bytes)
            stderr, cut_err = _read_truncated(err_path, cfg.max_output_bytes)
            rc = proc.returncode
            sig = signal.Signals(-rc).name if rc is not None and rc < 0 else None
            return SandboxResult(
                stdout=stdout,
                stderr=stderr,
                returncode=None if timed_out else rc,
                timed_out=timed_out,
                signal=sig,
                truncated=cut_out or cut_err,
                duration_s=duration,
                isolation=isolation,
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_truncated(path: str, limit: int) -> tuple[str, bool]:
    """The file's text, cut to `limit` bytes by keeping its head and tail."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= limit:
            return f.read().decode("utf-8", errors="replace"), False
        head = f.read(limit // 2)
        f.seek(size - (limit - limit // 2))
        tail = f.read()
    marker = f"\n...[{size - len(head) - len(tail)} bytes truncated]...\n"
    return (
        head.decode("utf-8", errors="replace") + marker + tail.decode("utf-8", errors="replace"),
        True,
    )


def isolation_report() -> dict[str, object]:
    """Run an empty program and return which isolation layers this machine provides."""
    return PythonSandbox(timeout_s=10).run("pass").isolation


# ---------------------------------------------------------------------------------------------
# child side: everything below runs in the sandboxed interpreter, stdlib only

# Landlock UAPI (include/uapi/linux/landlock.h); the syscall numbers are the same on every
# architecture that uses the generic table (x86_64, arm64, riscv64).
_SYS_CREATE, _SYS_ADD_RULE, _SYS_RESTRICT = 444, 445, 446
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FS_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _AMBIENT_CLEAR_ALL = 38, 24, 47, 4

_BLOCKED_EVENTS = (
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "subprocess.Popen",
    "socket.",
    "ctypes.",
)
_PATH_EVENTS = {
    "os.remove": 1,
    "os.rename": 2,
    "os.mkdir": 1,
    "os.rmdir": 1,
    "os.symlink": 2,
    "os.link": 2,
    "os.chmod": 1,
    "os.chown": 1,
    "os.truncate": 1,
    "os.utime": 1,
    "shutil.rmtree": 1,
    "shutil.copyfile": 2,
    "shutil.move": 2,
}
_BLOCKED_IMPORTS = ("ctypes", "_ctypes", "_posixsubprocess", "subprocess", "socket", "_socket")


def _landlock(libc, work: str, read_paths: list[str]) -> int:
    """Restrict this process (and its future children) with Landlock; return the ABI used."""
    import ctypes

    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_SYS_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        raise OSError(ctypes.get_errno(), "landlock unavailable")
    fs = _FS_ABI1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    fs |= _FS_IOCTL_DEV if abi >= 5 else 0

    class Attr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    attr = Attr(fs, _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0, 0)
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(_SYS_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        read = _FS_READ_FILE | _FS_READ_DIR
        rules = [(p, read) for p in read_paths] + [(work, fs & ~_FS_EXECUTE)]
        rules += [("/dev/null", _FS_READ_FILE | _FS_WRITE_FILE), ("/dev/urandom", _FS_READ_FILE)]
        for path, allowed in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not os.path.isdir(path):
                    allowed &= _FS_FILE_ONLY
                rule = PathBeneath(allowed & fs, fd)
                if libc.syscall(_SYS_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0) != 0:
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule({path}) failed")
            finally:
                os.close(fd)
        if libc.syscall(_SYS_RESTRICT, ruleset, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
    return int(abi)


def _drop_capabilities(libc) -> bool:
    """Empty every capability set (a no-op for an unprivileged worker)."""
    import ctypes

    libc.prctl(_PR_CAP_AMBIENT, _AMBIENT_CLEAR_ALL, 0, 0, 0)
    for cap in range(64):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last cap: ignored

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} structs, zeroed
    return libc.capset(ctypes.byref(Header(0x20080522, 0)), data) == 0


def _audit_hook(work: str):
    real = os.path.realpath

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an fd the process already holds
        p = real(os.fsdecode(path))
        return p == work or p.startswith(work + os.sep) or p == "/dev/null"

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (mode and any(c in str(mode) for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writes and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing outside the working directory: {path}")
        elif event in _PATH_EVENTS:
            for p in args[: _PATH_EVENTS[event]]:
                if p is not None and not inside(p):
                    raise PermissionError(f"sandbox: {event} outside the working directory: {p}")
        elif event.startswith(_BLOCKED_EVENTS):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event == "import" and args[0] in _BLOCKED_IMPORTS:
            raise ImportError(f"sandbox: import of '{args[0]}' is not allowed")

    return hook


def _child_main(spec_path: str, status_fd: int) -> None:
    import resource

    with open(spec_path) as f:
        spec = json.load(f)
    with open(spec["code_path"], encoding="utf-8") as f:
        code = f.read()
    work = os.path.realpath(spec["work"])
    status: dict[str, object] = {}
    cpu = spec["cpu_s"]
    for lim, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (spec["memory_bytes"],) * 2),
        (resource.RLIMIT_FSIZE, (spec["file_bytes"],) * 2),
        (resource.RLIMIT_NOFILE, (spec["max_open_files"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(lim, value)
    status["rlimits"] = True
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS) failed")
        try:
            status["landlock_abi"] = _landlock(libc, work, spec["read_paths"])
        except OSError as e:
            status["landlock_abi"] = 0
            status["landlock_error"] = str(e)
        status["capabilities_dropped"] = _drop_capabilities(libc)
    except (OSError, AttributeError) as e:  # no ctypes / libc: best-effort layers only
        status["landlock_abi"] = 0
        status["landlock_error"] = str(e)
    for name in _BLOCKED_IMPORTS:  # force a fresh (audited, hence blocked) import
        sys.modules.pop(name, None)
    sys.modules.pop("ctypes.util", None)
    if spec["audit_hook"]:
        sys.addaudithook(_audit_hook(work))
    status["audit_hook"] = bool(spec["audit_hook"])
    os.write(status_fd, json.dumps(status).encode())
    os.close(status_fd)
    if spec["strict"] and not status["landlock_abi"]:
        print("sandbox: Landlock is unavailable and strict=True; not running", file=sys.stderr)
        sys.exit(3)
    os.chdir(work)
    import linecache

    linecache.cache["<tool>"] = (len(code), None, code.splitlines(True), "<tool>")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(code, "<tool>", "exec"), namespace)  # noqa: S102 - the sandboxed program
    except SystemExit:
        raise
    except BaseException as e:  # the program's own error: a traceback on stderr, exit code 1
        import traceback

        sys.stdout.flush()
        frames = [
            f for f in traceback.extract_tb(e.__traceback__) if f.filename != __file__
        ]  # the program's frames only, not this bootstrap's or the audit hook's
        lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
        lines += traceback.format_exception_only(type(e), e)
        sys.stderr.write("".join(lines))
        sys.exit(1)


if __name__ == "__main__":
    _child_main(sys.argv[1], int(sys.argv[2]))


__all__ = ["PythonSandbox", "SandboxConfig", "SandboxResult", "isolation_report"]
