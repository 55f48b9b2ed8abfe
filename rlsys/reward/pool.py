"""Where reward calls run: a thread pool or a process pool, both with per-call timeouts.

`run(jobs, timeout_s)` blocks until every job has a result, an error or has timed out, and
returns on time: a job's clock starts when a worker picks it up, and a timed-out job frees its
worker slot at once, so a batch of n jobs on w workers returns within about
ceil(n / w) * timeout_s even when every call hangs.

- `ThreadRunner`: daemon threads in this process. Python cannot kill a thread, so a timed-out
  call is *abandoned*: its result is discarded, the thread exits whenever the call returns, and
  a fresh thread takes its slot. A call that never returns keeps its thread (and the CPU it
  burns) until the process exits; the count is in `abandoned`. `async def` rewards are
  cancelled at the timeout instead (when they await). Daemon threads (not
  `concurrent.futures`, whose exit handler joins its threads) so a hung call cannot block
  interpreter exit.
- `ProcessRunner`: `workers` child interpreters (`python -c`, see `_Child` for why not
  multiprocessing), each loading the rewards from their import specs and running `setup()`
  once before it takes jobs. A timed-out call's process is SIGKILLed and replaced (the
  replacement sets up again, off the clock). A process that dies mid-call fails that call only.
  A child exits by itself when its parent dies.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from rlsys.reward.api import LoadedReward, RewardTimeout, load_reward

log = logging.getLogger("rlsys.reward")

QUEUED, RUNNING, DONE, TIMED_OUT = range(4)


@dataclass
class Job:
    """One reward call: a per-sample call (`samples is None`) or a batched one."""

    part: int  # index of the reward in the runner's list
    prompt: str = ""
    response: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    samples: list[Any] | None = None  # list[Sample] for a batched call
    timeout_s: float | None = None
    # filled in by the runner
    result: list[tuple[float, dict[str, float]]] | None = None  # one per sample covered
    error: str | None = None  # "Type: message", first line
    traceback: str | None = None
    timed_out: bool = False
    state: int = QUEUED
    t_start: float = 0.0
    cv: threading.Condition | None = None


def execute(reward: LoadedReward, job: Job) -> list[tuple[float, dict[str, float]]]:
    """Run one job's call in this thread; raises whatever the reward raises."""
    if job.samples is None:
        return [reward.call_one(job.prompt, job.response, job.meta, job.timeout_s)]
    return reward.call_batch(job.samples, job.timeout_s)


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _timeout_error(timeout_s: float | None) -> str:
    return f"RewardTimeout: no result within timeout_s={timeout_s}"


class ThreadRunner:
    """Calls on daemon threads; see the module docstring for what a timeout does."""

    def __init__(self, rewards: list[LoadedReward], workers: int) -> None:
        self.rewards = rewards
        self.workers = workers
        self.abandoned = 0
        self._q: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        for r in rewards:
            r.setup()  # here, not on the first call, so that set-up is not timed
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        threading.Thread(target=self._loop, name="rlsys-reward", daemon=True).start()

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            assert job.cv is not None
            with job.cv:
                job.state, job.t_start = RUNNING, time.monotonic()
            cancelled = False
            try:
                res, err, tb = execute(self.rewards[job.part], job), None, None
            except Exception as e:
                res, err, tb = None, _first_line(e), traceback.format_exc()
                cancelled = isinstance(e, RewardTimeout)  # an async reward, cancelled in time
            with job.cv:
                abandoned = job.state == TIMED_OUT
                if not abandoned:
                    job.result, job.error, job.traceback, job.state = res, err, tb, DONE
                    job.timed_out = cancelled
                job.cv.notify_all()
            if abandoned:  # a replacement thread already holds this slot
                return

    def run(self, jobs: list[Job], timeout_s: float | None) -> None:
        """Run `jobs` (filled in place); returns when each is done or timed out."""
        if self._closed:
            raise RuntimeError("reward thread pool is closed")
        cv = threading.Condition()
        for j in jobs:
            j.cv, j.state, j.timeout_s = cv, QUEUED, timeout_s
            self._q.put(j)
        with cv:
            while True:
                now, wake = time.monotonic(), None
                open_jobs = 0
                for j in jobs:
                    if j.state == QUEUED:
                        open_jobs += 1
                    elif j.state == RUNNING:
                        open_jobs += 1
                        if timeout_s is None:
                            continue
                        deadline = j.t_start + timeout_s
                        if now >= deadline:
                            j.state, j.timed_out = TIMED_OUT, True
                            j.error = _timeout_error(timeout_s)
                            open_jobs -= 1
                            with self._lock:
                                self.abandoned += 1
                            self._spawn()
                        else:
                            wake = deadline if wake is None else min(wake, deadline)
                if not open_jobs:
                    return
                cv.wait(None if wake is None else max(wake - now, 0.001))

    def close(self) -> None:
        """Stop the idle threads and run the rewards' `close()`."""
        if self._closed:
            return
        self._closed = True
        for _ in range(self.workers):
            self._q.put(None)
        for r in self.rewards:
            r.close()


# ---------------------------------------------------------------------------------------------
# processes


PartSpec = tuple[str, dict, "str | None"]  # (import spec, kwargs, task)


def child_main(fd: int) -> None:
    """A pool process (started as `python -c`, see `_Child`): load and set up the rewards, then
    serve jobs on the socket `fd` until told to stop or the parent goes away."""
    conn = Connection(fd)
    parent = os.getppid()

    def watch_parent() -> None:  # a hung reward must not outlive a killed parent
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    specs: list[PartSpec] = conn.recv()
    try:
        rewards = [load_reward(spec, kwargs, task) for spec, kwargs, task in specs]
        for r in rewards:
            r.setup()
    except BaseException as e:
        conn.send(("setup_error", _first_line(e), traceback.format_exc()))
        return
    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            for r in rewards:
                r.close()
            return
        job_id, job = msg
        try:
            conn.send((job_id, execute(rewards[job.part], job), None))
        except Exception as e:
            err = (_first_line(e), traceback.format_exc(), isinstance(e, RewardTimeout))
            conn.send((job_id, None, err))


class _Child:
    """One pool process. Started with subprocess rather than multiprocessing: `spawn` would
    re-import the parent's `__main__` (a user script without a main guard would run again) and
    `fork` is unsafe in a process with torch and Ray threads."""

    def __init__(self, specs: list[PartSpec]) -> None:
        ours, theirs = socket.socketpair()
        fd = theirs.fileno()
        env = dict(os.environ)
        # the parent's import path, so that `pkg.module:fn` resolves the same way there
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        code = f"from rlsys.reward.pool import child_main; child_main({fd})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=(fd,), env=env, stdin=subprocess.DEVNULL
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send(specs)
        self.started = time.monotonic()
        self.ready = False
        self.job: Job | None = None

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # stuck in the kernel; poll() reaps it later
            pass
        self.conn.close()


class ProcessRunner:
    """Calls in `workers` spawned processes; see the module docstring."""

    def __init__(
        self,
        specs: list[PartSpec],
        workers: int,
        names: list[str],
        setup_timeout_s: float = 300.0,
    ) -> None:
        self.specs, self.names = specs, names
        self.setup_timeout_s = setup_timeout_s
        self.killed = 0
        self._children = [self._new_child() for _ in range(workers)]
        self._broken: tuple[str, str] | None = None  # (error, traceback) of a failed set-up
        self._lock = threading.Lock()  # one `run` at a time

    def _new_child(self) -> _Child:
        return _Child(self.specs)

    def wait_ready(self) -> None:
        """Block until every process has set up; raise `RuntimeError` if one failed to."""
        with self._lock:
            while self._broken is None and not all(c.ready for c in self._children):
                waiting = [c for c in self._children if not c.ready]
                wake = min(c.started for c in waiting) + self.setup_timeout_s
                for conn in wait([c.conn for c in waiting], max(wake - time.monotonic(), 0.0)):
                    self._receive(next(c for c in waiting if c.conn is conn), {})
                self._enforce_deadlines(None)
            if self._broken is not None:
                err, tb = self._broken
                raise RuntimeError(f"reward set-up failed in a pool process: {err}\n{tb}")

    def run(self, jobs: list[Job], timeout_s: float | None) -> None:
        """Run `jobs` (filled in place); returns when each is done or timed out."""
        with self._lock:
            if not self._children:
                raise RuntimeError("reward process pool is closed")
            self._run(jobs, timeout_s)

    def _run(self, jobs: list[Job], timeout_s: float | None) -> None:
        todo = deque(jobs)
        ids = {id(j): j for j in jobs}
        while True:
            if self._broken is not None:
                for j in list(todo) + [c.job for c in self._children if c.job]:
                    j.error, j.traceback, j.state = *self._broken, DONE
                for c in self._children:
                    c.job = None
                return
            for c in self._children:
                if c.ready and c.job is None and todo:
                    j = c.job = todo.popleft()
                    j.state, j.t_start = RUNNING, time.monotonic()
                    # a bare copy: the caller's Job may hold a Condition, which does not pickle
                    msg = Job(j.part, j.prompt, j.response, j.meta, j.samples, timeout_s)
                    try:
                        c.conn.send((id(j), msg))
                    except OSError:  # it died while idle
                        self._died(c)
            busy = [c for c in self._children if c.job is not None]
            if not todo and not busy:
                return
            now, wake = time.monotonic(), []
            for c in self._children:
                if c.job is not None and timeout_s is not None:
                    wake.append(c.job.t_start + timeout_s)
                elif not c.ready:
                    wake.append(c.started + self.setup_timeout_s)
            waiting = [c.conn for c in self._children if c.job is not None or not c.ready]
            ready_conns = wait(waiting, timeout=max(min(wake) - now, 0.0) if wake else None)
            for conn in ready_conns:
                c = next(c for c in self._children if c.conn is conn)
                self._receive(c, ids)
            self._enforce_deadlines(timeout_s)

    def _died(self, c: _Child) -> None:
        """`c` closed its end (OOM kill, segfault, os._exit): fail its call, replace it."""
        try:
            c.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if c.job is not None:
            c.job.error = (
                f"RewardWorkerDied: reward process exited with code {c.exitcode} "
                f"while running '{self.names[c.job.part]}'"
            )
            c.job.state = DONE
        elif not c.ready:
            self._broken = (f"RewardWorkerDied: exit code {c.exitcode} in set-up", "")
        self._replace(c)

    def _receive(self, c: _Child, ids: dict[int, Job]) -> None:
        try:
            kind, res, err = c.conn.recv()
        except (EOFError, OSError):
            self._died(c)
            return
        if kind == "ready":
            c.ready = True
        elif kind == "setup_error":
            log.error("reward process set-up failed:\n%s", err)
            self._broken = (res, err)
        else:
            job = ids.get(kind)
            if job is not None and job is c.job:
                if err is None:
                    job.result = res
                else:
                    job.error, job.traceback, job.timed_out = err
                job.state = DONE
                c.job = None

    def _enforce_deadlines(self, timeout_s: float | None) -> None:
        now = time.monotonic()
        for c in list(self._children):
            if c.job is not None and timeout_s is not None and now >= c.job.t_start + timeout_s:
                c.job.state, c.job.timed_out = DONE, True
                c.job.error = _timeout_error(timeout_s)
                self.killed += 1
                self._replace(c)
            elif not c.ready and now >= c.started + self.setup_timeout_s:
                self._broken = (
                    f"RewardTimeout: reward process set-up took over {self.setup_timeout_s}s",
                    "",
                )

    def _replace(self, c: _Child) -> None:
        c.job = None
        c.kill()
        self._children[self._children.index(c)] = self._new_child()

    def close(self) -> None:
        """Ask each process to run its rewards' `close()` and exit; kill it after 5 s."""
        for c in self._children:
            try:
                c.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for c in self._children:
            try:
                c.proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                c.kill()
        self._children = []
