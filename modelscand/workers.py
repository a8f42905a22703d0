"""Scans run in worker processes, each bounded in time and memory.

A corrupt HDF5 file can crash the C library; a hostile pickle can make a parser spin. In
the daemon's own process either would take the watcher down with it. Here each worker is a
process fed one job at a time over a pipe by a parent thread that waits at most
``scan.timeout`` seconds: a worker that dies (any signal, any exit) or does not answer in
time is killed and replaced, and the file gets an ``error`` verdict. Memory is capped with
``RLIMIT_AS`` inside the worker (a `MemoryError` there is an ``incomplete`` verdict from the
engine, an outright kill is a crash).

The scan itself opens the file below its root one component at a time (``O_DIRECTORY|
O_NOFOLLOW`` dir fds, then ``O_RDONLY|O_NOFOLLOW|O_NONBLOCK``): a directory swapped for a
symlink out of the root is an error verdict, never a read. It requires a regular
file with the inode the scheduler saw, scans through that fd, and compares
``(dev, ino, size, mtime, ctime)`` before and after: a file changed under the scan is reported as
``changed`` and queued again instead of getting a verdict for bytes that no longer exist.

`scan_function` ("module:function") is the seam tests use to make a worker crash or hang.
"""

from __future__ import annotations

import errno
import importlib
import multiprocessing
import os
import queue
import resource
import signal
import stat
import threading
import time
from typing import Any, Callable

DEFAULT_SCAN_FUNCTION = "modelscand.workers:scan_job"
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


# -- inside the worker --------------------------------------------------------------------

def _ident(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class Escape(Exception):
    """The path leaves its root (a symlinked directory component, "..", another root)."""


def open_beneath(root: str, path: str) -> tuple[int, int, str]:
    """(file fd, parent dir fd, basename): `path` opened below `root` one component at a
    time, never following a symlink, so a directory swapped for a link out of the root
    between the event and the scan cannot redirect the read. Raises Escape or OSError."""
    rel = os.path.relpath(path, root)
    if rel == "." and os.path.dirname(root) != root:  # a file given as its own root (`scan FILE`)
        root, rel = os.path.dirname(root), os.path.basename(root)
    parts = rel.split(os.sep)
    if rel.startswith("..") or os.path.isabs(rel) or rel == "." or any(p in ("", ".", "..") for p in parts):
        raise Escape(f"not below its root {root}")
    dfd = os.open(root, DIR_FLAGS & ~os.O_NOFOLLOW)  # the root itself is realpath'd by the config
    try:
        for part in parts[:-1]:
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise Escape(f"directory component {part!r} is a symlink or not a directory") from None
                raise
            os.close(dfd)
            dfd = nfd
        fd = os.open(parts[-1], OPEN_FLAGS, dir_fd=dfd)
    except BaseException:
        os.close(dfd)
        raise
    return fd, dfd, parts[-1]


def scan_job(job: dict[str, Any], settings) -> dict[str, Any]:
    """Scan one file through a verified fd. Never raises for bad input."""
    path = job["path"]
    dfd = None
    try:
        if job.get("root"):
            fd, dfd, base = open_beneath(job["root"], path)
        else:
            fd = os.open(path, OPEN_FLAGS)
    except Escape as exc:
        return {"status": "error", "error": f"path escapes the watched root: {exc}; not scanned", "escape": True}
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return {"status": "gone"}
        if exc.errno == errno.ELOOP:
            return {"status": "error", "error": "is a symlink; not followed"}
        return {"status": "error", "error": f"cannot open: {exc.strerror or exc}"}
    try:
        return _scan_fd(job, settings, path, fd, dfd)
    finally:
        if dfd is not None:
            os.close(dfd)


def _scan_fd(job, settings, path, fd, dfd) -> dict[str, Any]:
    from modelscan_core.engine import scan_stream, sha256_stream

    with os.fdopen(fd, "rb", buffering=0) as stream:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return {"status": "error", "error": "not a regular file; not scanned"}
        before = _ident(st)
        if job.get("inode") and tuple(job["inode"]) != before[:2]:
            return {"status": "replaced", "identity": before}
        if job.get("kind") == "code":
            sha = sha256_stream(stream)
            result = {
                "verdict": "issues",
                "format": "python",
                "sha256": sha,
                "severity": job["code_severity"],
                "findings": [{
                    "rule_id": job["code_rule"],
                    "severity": job["code_severity"],
                    "description": job["code_description"],
                    "module": "", "operator": "", "offset": None, "call": None,
                }],
                "errors": [],
            }
        else:
            r = scan_stream(stream, path, settings, size=st.st_size, name=job.get("name") or os.path.basename(path))
            sha = r.sha256 or sha256_stream(stream)  # the core skips files > 512 MiB; the baseline needs it
            sev = r.max_severity
            result = {
                "verdict": r.verdict.value,
                "format": r.format,
                "sha256": sha,
                "severity": sev.name.lower() if sev is not None else None,
                "findings": [
                    {"rule_id": f.rule_id, "severity": f.severity.name.lower(), "description": f.description[:500],
                     "module": f.module, "operator": f.operator, "offset": f.offset, "call": (f.call or None) and f.call[:300],
                     "source": f.source}
                    for f in r.all_findings()[:50]
                ],
                "errors": [{"category": e.category, "description": e.description[:300], "incomplete": e.incomplete}
                           for e in r.all_errors()[:20]],
            }
        after = _ident(os.fstat(fd))
        try:
            if dfd is not None:
                now = _ident(os.stat(os.path.basename(path), dir_fd=dfd, follow_symlinks=False))
            else:
                now = _ident(os.lstat(path))
        except OSError:
            now = None
    result.update(status="ok", identity=before, changed=(after != before or (now is not None and now != before)))
    return result


def _worker_main(conn, settings_file: str | None, memory_limit_mb: int, scan_function: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if memory_limit_mb > 0:
        limit = memory_limit_mb * 1024 * 1024
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):
            pass
    from modelscan_core.settings import Settings

    settings = Settings.load(settings_file or None)
    module, _, func = scan_function.partition(":")
    fn = getattr(importlib.import_module(module), func)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        started = time.monotonic()
        try:
            result = fn(job, settings)
        except MemoryError:
            result = {"status": "error", "error": "scan ran out of memory (scan.memory_limit_mb)", "incomplete": True}
        except Exception as exc:  # a bug in a scanner is an error verdict, not a dead worker
            result = {"status": "error", "error": f"internal error: {type(exc).__name__}: {exc}"[:500]}
        result["scan_ms"] = round((time.monotonic() - started) * 1000, 2)
        try:
            conn.send(result)
        except (OSError, ValueError):
            return


# -- in the daemon ------------------------------------------------------------------------

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["modelscand.workers", "modelscan_core.engine", "modelscan_core.settings"])
        _CTX = ctx
    return _CTX


class _Slot:
    def __init__(self, pool: "WorkerPool", index: int):
        self.pool, self.index = pool, index
        self.proc = None
        self.conn = None
        self.busy_since: float | None = None
        self.thread = threading.Thread(target=self._run, name=f"modelscand-worker-{index}", daemon=True)

    def _spawn(self) -> None:
        ctx = _context()
        parent, child = ctx.Pipe()
        p = self.pool
        proc = ctx.Process(target=_worker_main, args=(child, p.settings_file, p.memory_limit_mb, p.scan_function),
                           name=f"modelscand-scan-{self.index}", daemon=True)
        proc.start()
        child.close()
        self.proc, self.conn = proc, parent

    def _kill(self) -> None:
        if self.proc is not None:
            try:
                self.proc.kill()
            except Exception:
                pass
            self.proc.join(5)
            self.proc.close() if self.proc.exitcode is not None else None
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def _run(self) -> None:
        while True:
            job = self.pool._jobs.get()
            if job is None:
                break
            try:
                result = self._one(job)
            except Exception as exc:  # never let a slot die: that would stall the pool
                result = {"status": "error", "error": f"worker slot failure: {type(exc).__name__}: {exc}"}
                self._kill()
            try:
                self.pool.on_result(job, result)
            except Exception:
                pass
            finally:
                with self.pool._lock:
                    self.pool._pending -= 1
                    self.pool._lock.notify_all()
        self.shutdown()

    def _one(self, job: dict) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self._kill()
            self._spawn()
        self.busy_since = time.monotonic()
        try:
            self.conn.send(job)
            if self.conn.poll(self.pool.timeout):
                return self.conn.recv()
            self._kill()
            return {"status": "error", "error": f"scan timed out after {self.pool.timeout:g}s; worker killed",
                    "timeout": True}
        except (EOFError, OSError, BrokenPipeError):
            code = self.proc.exitcode if self.proc is not None else None
            if self.proc is not None and code is None:
                self.proc.join(2)
                code = self.proc.exitcode
            self._kill()
            how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
            return {"status": "error", "error": f"scan worker crashed ({how})", "crash": True}
        finally:
            self.busy_since = None

    def shutdown(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send(None)
            except Exception:
                pass
        if self.proc is not None:
            self.proc.join(2)
        self._kill()


class WorkerPool:
    def __init__(self, workers: int, *, timeout: float, memory_limit_mb: int, settings_file: str | None,
                 on_result: Callable[[dict, dict], None], scan_function: str = DEFAULT_SCAN_FUNCTION):
        self.timeout = timeout
        self.memory_limit_mb = memory_limit_mb
        self.settings_file = settings_file
        self.scan_function = scan_function
        self.on_result = on_result
        self._jobs: queue.Queue = queue.Queue(maxsize=workers * 4)
        self._lock = threading.Condition()
        self._pending = 0
        self.slots = [_Slot(self, i) for i in range(workers)]

    def start(self) -> None:
        for slot in self.slots:
            slot._spawn()
            slot.thread.start()

    def submit(self, job: dict) -> None:
        with self._lock:
            self._pending += 1
        self._jobs.put(job)

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def healthy(self) -> bool:
        """Every slot thread alive and no job overdue (the parent enforces the timeout)."""
        now = time.monotonic()
        for slot in self.slots:
            if not slot.thread.is_alive():
                return False
            if slot.busy_since is not None and now - slot.busy_since > self.timeout + 30:
                return False
        return True

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.slots if s.proc is not None and s.proc.pid]

    def stop(self, timeout: float = 10) -> None:
        for _ in self.slots:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            slot.thread.join(max(0.1, deadline - time.monotonic()))
        for slot in self.slots:
            if slot.thread.is_alive():
                slot._kill()
