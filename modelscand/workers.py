"""Scans run in worker processes, each bounded in time and memory, answering in plain JSON.

A corrupt HDF5 file can crash the C library; a hostile pickle can make a parser spin. In
the daemon's own process either would take the watcher down with it. Here each worker is a
process fed one `ScanJob` at a time over a pipe by a parent thread: a worker that crashes
(a fault signal, abort, any exit) or overruns a phase's time limit is killed and replaced,
and the file gets an ``error`` verdict. A worker killed from outside (SIGKILL by the OOM
killer, SIGTERM) is replaced too, but the reply is ``killed``: that says nothing of the file,
and the scheduler scans it again. Memory is capped with ``RLIMIT_AS`` inside the worker.

Two phases, each with its own limit, so a finding is never lost to slow hashing:

1. *scan* (``scan.timeout``): the core reads the file and returns its `FileResult`; the
   worker sends it at once (``{"phase": "scanned"}``);
2. *hash* (``scan.hash_timeout``): the sha256 for the baseline and the ledger. A 50 GB
   sparse tail cannot make it take longer than the limit: the worker stops hashing at the
   deadline and the verdict keeps every finding, with ``sha256: null`` and a note.

The pipe carries JSON only (`send_bytes`/`recv_bytes`, never pickle): the worker parses
hostile bytes, so what it sends back is decoded as data (`file_result_from_json` type-checks
every field). A compromised worker can lie about a verdict; it cannot run code in the
(root) parent.

The scan opens the file below its root one component at a time (``O_DIRECTORY|O_NOFOLLOW``
dir fds, then ``O_RDONLY|O_NOFOLLOW|O_NONBLOCK``): a directory swapped for a symlink out of
the root is reported as ``escape`` (the path changed), never a read. It requires a regular
file with the inode the scheduler saw, scans through that fd, and compares
``(dev, ino, size, mtime, ctime)`` before and after each phase: bytes that changed under the
scan get no verdict (``changed``); the caller offers the path again.

`scan_function` ("module:function") is the seam tests use to make a worker crash or hang.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import multiprocessing
import os
import queue
import resource
import signal
import stat
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Callable

from modelscan_core.model import FileResult, Finding, Severity, file_result_from_json, file_result_to_json

from modelscand.state import Identity

DEFAULT_SCAN_FUNCTION = "modelscand.workers:scan_job"
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
MAX_REPLY_BYTES = 256 * 1024 * 1024  # a FileResult of an archive with the maximum of members fits
HASH_CHUNK = 1 << 20

#: reply statuses: only "ok" carries a verdict; the others say why there is none
STATUSES = ("ok", "gone", "replaced", "changed", "escape", "error")
#: what the parent says of a worker killed from outside mid-scan (never a worker's own reply)
KILLED = "killed"
#: signals a process gets from what it does itself (a C library crash, abort(), a CPU or
#: file-size limit): the file's bytes led there, an error verdict. Any other signal (SIGKILL
#: from the OOM killer or an operator, SIGTERM, ...) came from outside and says nothing of
#: the file: the scan is retried (the scheduler bounds the retries).
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT,
                           signal.SIGSYS, signal.SIGXCPU, signal.SIGXFSZ, signal.SIGTRAP})


@dataclass(frozen=True)
class ScanJob:
    path: str
    root: str | None  # open below this directory, one component at a time; None: open `path` as given
    inode: tuple[int, int] | None  # the (dev, ino) the scheduler saw; another inode is "replaced"
    name: str  # what format detection sees (the file name users know)
    kind: str = "model"  # "model": scan the bytes; "code": report the file as code by rule
    code_rule: str | None = None
    code_description: str | None = None
    code_severity: str | None = None
    hash_timeout: float = 0.0  # the hash phase's limit (scan.hash_timeout); 0 = none

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["inode"] = list(self.inode) if self.inode else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ScanJob":
        d = dict(d)
        d["inode"] = tuple(d["inode"]) if d.get("inode") else None
        return cls(**d)


@dataclass(frozen=True)
class ScanReply:
    """What one job came to. `result` is the core's typed FileResult (sha256 filled in
    when the hash phase finished); `identity` is what the worker opened."""

    status: str
    result: FileResult | None = None
    identity: Identity | None = None
    sha256: str | None = None
    error: str | None = None
    incomplete: bool = False  # an error that is a limit (memory), not bad bytes
    hash_note: str | None = None  # why there is no sha256 although the scan finished
    scan_ms: float | None = None
    hash_ms: float | None = None

    @property
    def verdict(self) -> str | None:
        """clean | issues | error | incomplete | skipped for a reply that has one."""
        if self.status == "ok" and self.result is not None:
            return self.result.verdict.value
        if self.status == "error":
            return "incomplete" if self.incomplete else "error"
        return None


# -- inside the worker --------------------------------------------------------------------

def _ident(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class Escape(Exception):
    """The path leaves its root (a symlinked directory component, "..", another root)."""


def open_root(root: str) -> int:
    """A dir fd for a root, opened from ``/`` one component at a time, never through a
    symlink. Roots are realpath'd when they are added, so a symlink on the way now means a
    directory above (or at) the root was swapped since, by whoever owns its parent (a user
    owns ~/.cache): following it would read, move or restore into another user's files.
    Raises OSError (ELOOP or ENOTDIR for a linked component)."""
    if not os.path.isabs(root):
        raise OSError(errno.EINVAL, f"{root!r} is not an absolute path")
    parts = [p for p in root.split(os.sep) if p]
    if any(p in (".", "..") for p in parts):
        raise OSError(errno.EINVAL, f"{root!r} is not a plain path")
    return descend(os.open(os.sep, DIR_FLAGS), parts)


def descend(fd: int, parts: list[str]) -> int:
    """The directory `parts` below the directory fd `fd` (taken over: closed on the way or on
    failure), each component opened by the previous one's fd without following a link."""
    try:
        for part in parts:
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


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
    try:
        dfd = open_root(root)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Escape(f"the root {root} is reached through a symlink now (a directory was swapped)") from None
        raise
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


def scan_job(job: ScanJob, settings, report: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Scan one file through a verified fd; `report` gets the scan phase's result before
    hashing starts. Returns the final message. Never raises for bad input."""
    path = job.path
    dfd = None
    try:
        if job.root:
            fd, dfd, base = open_beneath(job.root, path)
        else:
            fd = os.open(path, OPEN_FLAGS)
    except Escape as exc:
        return {"status": "escape", "error": f"path escapes the watched root: {exc}; not scanned"}
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return {"status": "gone"}
        if exc.errno == errno.ELOOP:
            return {"status": "escape", "error": "is a symlink now; not followed"}
        return {"status": "error", "error": f"cannot open: {exc.strerror or exc}"}
    try:
        return _scan_fd(job, settings, fd, dfd, report or (lambda msg: None))
    finally:
        if dfd is not None:
            os.close(dfd)


def _scan_fd(job: ScanJob, settings, fd: int, dfd: int | None, report) -> dict[str, Any]:
    from modelscan_core.engine import scan_stream

    with os.fdopen(fd, "rb", buffering=0) as stream:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return {"status": "error", "error": "not a regular file; not scanned"}
        before = _ident(st)
        if job.inode and tuple(job.inode) != tuple(before[:2]):
            return {"status": "replaced", "identity": before}

        def unchanged() -> bool:
            after = _ident(os.fstat(fd))
            try:
                if dfd is not None:
                    now = _ident(os.stat(os.path.basename(job.path), dir_fd=dfd, follow_symlinks=False))
                else:
                    now = _ident(os.lstat(job.path))
            except OSError:
                now = None
            return after == before and (now is None or now == before)

        started = time.monotonic()
        if job.kind == "code":
            sev = Severity.parse(job.code_severity or "medium")
            result = FileResult(job.path, "python", st.st_size, findings=(
                Finding(job.code_rule or "MODELSCAND_CODE", sev, job.code_description or "code", job.path,
                        "modelscand"),))
        else:
            result = scan_stream(stream, job.path, settings, size=st.st_size, name=job.name or
                                 os.path.basename(job.path), compute_hash=False, path=job.path)
        scan_ms = round((time.monotonic() - started) * 1000, 2)
        if not unchanged():
            return {"status": "changed", "identity": before, "scan_ms": scan_ms}
        report({"phase": "scanned", "result": file_result_to_json(result), "identity": before, "scan_ms": scan_ms})
        started = time.monotonic()
        sha, note = bounded_sha256(fd, job.hash_timeout)
        hash_ms = round((time.monotonic() - started) * 1000, 2)
        if not unchanged():
            return {"status": "changed", "identity": before, "scan_ms": scan_ms}
    return {"status": "ok", "identity": before, "sha256": sha, "hash_note": note, "scan_ms": scan_ms,
            "hash_ms": hash_ms}


def bounded_sha256(fd: int, limit_s: float) -> tuple[str | None, str | None]:
    """(sha256 of the whole file, None) or (None, why) when `limit_s` (> 0) ran out first."""
    digest = hashlib.sha256()
    deadline = time.monotonic() + limit_s if limit_s > 0 else None
    offset = 0
    while True:
        chunk = os.pread(fd, HASH_CHUNK, offset)
        if not chunk:
            return digest.hexdigest(), None
        digest.update(chunk)
        offset += len(chunk)
        if deadline is not None and time.monotonic() > deadline:
            return None, f"not hashed: the hash phase stopped after {limit_s:g}s at byte {offset}"


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

    def send(msg: dict) -> None:
        conn.send_bytes(json.dumps(msg).encode())

    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        job_data = json.loads(raw)
        if job_data is None:
            return
        job = ScanJob.from_json(job_data)
        try:
            msg = fn(job, settings, send)
        except MemoryError:
            msg = {"status": "error", "error": "scan ran out of memory (scan.memory_limit_mb)", "incomplete": True}
        except Exception as exc:  # a bug in a scanner is an error verdict, not a dead worker
            msg = {"status": "error", "error": f"internal error: {type(exc).__name__}: {exc}"[:500]}
        msg["phase"] = "done"
        try:
            send(msg)
        except (OSError, ValueError):
            return


# -- in the daemon ------------------------------------------------------------------------

class BadReply(Exception):
    """The worker sent something that is not a well-formed reply."""


def _decode(raw: bytes) -> dict:
    try:
        msg = json.loads(raw)
    except ValueError as exc:
        raise BadReply(f"not JSON: {exc}") from None
    if not isinstance(msg, dict) or msg.get("phase") not in ("scanned", "done"):
        raise BadReply("not a reply object")
    if msg["phase"] == "done" and msg.get("status") not in STATUSES:
        raise BadReply(f"unknown status {msg.get('status')!r}")
    return msg


def _identity(value: object) -> Identity | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 5
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise BadReply("identity: expected five integers")
    return Identity(*value)


def _opt(msg: dict, key: str, *types: type):
    """msg[key] if it is None or one of `types` (a bool is no number), else BadReply."""
    value = msg.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
        raise BadReply(f"{key}: expected {' or '.join(t.__name__ for t in types)}")
    return value


def reply_from(scanned: dict | None, done: dict | None, *, hash_note: str | None = None) -> ScanReply:
    """Fold the worker's messages into one ScanReply (BadReply if they are malformed)."""
    result = identity = None
    scan_ms = None
    if scanned is not None:
        try:
            result = file_result_from_json(scanned.get("result"))
        except ValueError as exc:
            raise BadReply(f"result: {exc}") from None
        identity = _identity(scanned.get("identity"))
        scan_ms = _opt(scanned, "scan_ms", int, float)
    if done is None:  # the hash phase overran: the scan's verdict stands, without a hash
        return ScanReply("ok", result, identity, None, hash_note=hash_note, scan_ms=scan_ms)
    status = done["status"]
    sha = _opt(done, "sha256", str)
    if status == "ok" and result is None:
        raise BadReply("ok without a scan result")
    if result is not None and sha is not None:
        result = replace(result, sha256=sha)
    return ScanReply(status, result if status == "ok" else None, _identity(done.get("identity")) or identity, sha,
                     _opt(done, "error", str), done.get("incomplete") is True, _opt(done, "hash_note", str),
                     _opt(done, "scan_ms", int, float) or scan_ms, _opt(done, "hash_ms", int, float))


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
            except (OSError, ValueError):  # already gone (or closed): nothing to kill
                pass
            self.proc.join(5)
            self.proc.close() if self.proc.exitcode is not None else None
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def _run(self) -> None:
        while True:
            item = self.pool._jobs.get()
            if item is None:
                break
            job, future = item
            if not future.set_running_or_notify_cancel():
                self.pool._done()
                continue
            try:
                reply = self._one(job)
            except Exception as exc:  # never let a slot die: that would stall the pool
                reply = ScanReply("error", error=f"worker slot failure: {type(exc).__name__}: {exc}")
                self._kill()
            try:
                future.set_result(reply)  # runs the caller's callbacks here, before the job counts as done
            finally:
                self.pool._done()
        self.shutdown()

    def _recv(self, limit: float) -> dict | None:
        if not self.conn.poll(limit):
            return None
        return _decode(self.conn.recv_bytes(MAX_REPLY_BYTES))

    def _one(self, job: ScanJob) -> ScanReply:
        if self.proc is None or not self.proc.is_alive():
            self._kill()
            self._spawn()
        self.busy_since = time.monotonic()
        pool = self.pool
        scanned = None
        try:
            self.conn.send_bytes(json.dumps(job.to_json()).encode())
            msg = self._recv(pool.timeout)
            if msg is None:
                self._kill()
                return ScanReply("error", error=f"scan timed out after {pool.timeout:g}s; worker killed")
            if msg["phase"] == "scanned":
                scanned = msg
                # the worker stops hashing at hash_timeout itself; the margin covers a loaded machine
                msg = self._recv(pool.hash_timeout + 10.0 if pool.hash_timeout else None)
                if msg is None:
                    self._kill()
                    return reply_from(scanned, None, hash_note=f"not hashed: the hash phase overran "
                                                               f"{pool.hash_timeout:g}s; worker killed")
                if msg["phase"] != "done":
                    raise BadReply("two scan results for one job")
            return reply_from(scanned, msg)
        except BadReply as exc:
            self._kill()
            return ScanReply("error", error=f"scan worker sent an invalid reply ({exc}); worker killed")
        except (EOFError, OSError):
            code = self.proc.exitcode if self.proc is not None else None
            if self.proc is not None and code is None:
                self.proc.join(2)
                code = self.proc.exitcode
            self._kill()
            how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
            if scanned is not None:  # it died hashing: the scan's findings stand
                return reply_from(scanned, None, hash_note=f"not hashed: the worker died while hashing ({how})")
            if code is not None and code < 0 and -code not in CRASH_SIGNALS:
                return ScanReply(KILLED, error=f"scan worker {how} from outside mid-scan")
            return ScanReply("error", error=f"scan worker crashed ({how})")
        finally:
            self.busy_since = None

    def shutdown(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send_bytes(b"null")
            except OSError:  # the worker is already gone
                pass
        if self.proc is not None:
            self.proc.join(2)
        self._kill()


class WorkerPool:
    def __init__(self, workers: int, *, timeout: float, memory_limit_mb: int, settings_file: str | None,
                 hash_timeout: float = 30.0, scan_function: str = DEFAULT_SCAN_FUNCTION):
        self.timeout = timeout
        self.hash_timeout = hash_timeout
        self.memory_limit_mb = memory_limit_mb
        self.settings_file = settings_file
        self.scan_function = scan_function
        self._jobs: queue.Queue = queue.Queue(maxsize=workers * 4)
        self._lock = threading.Condition()
        self._pending = 0
        self.slots = [_Slot(self, i) for i in range(workers)]

    def start(self) -> None:
        for slot in self.slots:
            slot._spawn()
            slot.thread.start()

    def submit(self, job: ScanJob) -> "Future[ScanReply]":
        """Queue a job; the future resolves to its ScanReply (callbacks run in the slot thread
        before the pool counts the job as done, so `pending == 0` means they have run)."""
        future: Future = Future()
        job = replace(job, hash_timeout=self.hash_timeout)
        with self._lock:
            self._pending += 1
        self._jobs.put((job, future))
        return future

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1
            self._lock.notify_all()

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
        """Every slot thread alive and no job overdue (the parent enforces the timeouts)."""
        now = time.monotonic()
        for slot in self.slots:
            if not slot.thread.is_alive():
                return False
            if slot.busy_since is not None and now - slot.busy_since > self.timeout + self.hash_timeout + 40:
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
