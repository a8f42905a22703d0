"""Scheduling: from a queued candidate to a job in a worker, exactly once per identity.

The scheduler thread takes candidates off the queue and decides, for each:

- the baseline already knows this identity -> nothing to do;
- a symlink -> its target, if the target is inside a root (an HF snapshot link names its
  blob's verdict once the blob has one);
- the inode is being scanned right now -> remember that it changed (rescanned after);
- a writer still holds the file (lease probe) -> park it and look again later, at most
  ``watch.busy_max_wait`` seconds in all; where no lease can be taken, wait until size and
  mtime are stable for ``watch.settle_time``;
- otherwise submit it to the worker pool.

Parked candidates live in a heap ordered by due time; one candidate per inode waits on a
writer (a burst of Modified events is one wait, not many).
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import itertools
import os
import stat
import threading
import time
from typing import Callable

from modelscand import hfcache
from modelscand.activity import Activity
from modelscand.config import Config, Root
from modelscand.queue import Candidate, Rescan, WorkQueue
from modelscand.roots import Roots
from modelscand.state import Baseline, Identity
from modelscand.workers import ScanJob, ScanReply, WorkerPool
from modelscand.writers import COMPLETE_ON

BUSY_MAX_RECHECK = 30.0


def writer_state(path: str) -> str:
    """"free" if nobody holds the file open for writing, "busy" if someone does, "unknown"
    if the lease cannot be taken (not the owner without CAP_LEASE, filesystem without leases)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return "unknown"
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return "busy" if exc.errno in (errno.EAGAIN, errno.EBUSY) else "unknown"
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return "free"
    finally:
        os.close(fd)


class Scheduler:
    def __init__(self, config: Callable[[], Config], roots: Roots, queue: WorkQueue, baseline: Callable[[], Baseline],
                 pool: Callable[[], WorkerPool], log, activity: Activity, *,
                 request_reconcile: Callable[[str, str], None], once: Callable[[], bool],
                 on_reply: Callable[[Candidate, Identity, ScanReply], None],
                 reoffer: Callable[[Candidate, str], None]):
        self._config = config
        self.roots = roots
        self.queue = queue
        self._baseline = baseline
        self._pool = pool
        self.log = log
        self.activity = activity
        self._request_reconcile = request_reconcile
        self._once = once
        self._on_reply = on_reply  # results: log, record, act
        self._reoffer = reoffer
        self.lock = threading.RLock()
        self.inflight: dict[tuple[int, int], tuple[Candidate, Identity]] = {}
        self.dirty: set[tuple[int, int]] = set()
        self._parked: list = []
        self._unparking = 0
        self._waiting: dict[tuple[int, int], Candidate] = {}  # inode -> the one candidate parked on its writer
        self._seq = itertools.count()

    # ------------------------------------------------------------------ state
    def busy(self, include_parked: bool = True) -> bool:
        with self.lock:
            return bool(self.inflight) or (include_parked and bool(self._parked or self._unparking))

    def parked_paths(self) -> list[str]:
        with self.lock:
            return [c.path for _, _, c in self._parked]

    def in_flight(self) -> int:
        with self.lock:
            return len(self.inflight)

    # ------------------------------------------------------------------ the loop
    def _park(self, cand: Candidate, delay: float) -> None:
        with self.lock:
            heapq.heappush(self._parked, (time.monotonic() + delay, next(self._seq), cand))

    def loop(self) -> None:
        while True:
            with self.lock:
                due = self._parked[0][0] if self._parked else None
            timeout = None if due is None else max(0.0, due - time.monotonic())
            item = self.queue.get(timeout)
            now = time.monotonic()
            while True:
                with self.lock:
                    if not self._parked or self._parked[0][0] > now:
                        break
                    _, _, cand = heapq.heappop(self._parked)
                    self._unparking += 1  # not idle between the pop and a submit/park
                try:
                    self._guard(self.consider, cand)
                finally:
                    with self.lock:
                        self._unparking -= 1
            if item is None:
                if self.queue._closed:
                    return
            else:
                try:
                    if isinstance(item, Rescan):
                        self.log.info("watch.rescan", root=item.root, why=item.why)
                        self._request_reconcile(item.root, item.why)
                    else:
                        self._guard(self.consider, item)
                finally:
                    self.queue.done()
            self.activity.changed()

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self.log.error("daemon.internal_error", where=fn.__name__, error=f"{type(exc).__name__}: {exc}")

    def consider(self, cand: Candidate) -> None:
        baseline = self._baseline()
        waiting_on = getattr(cand, "waiting_on", None)
        if waiting_on is not None:
            with self.lock:
                if self._waiting.get(waiting_on) is cand:
                    del self._waiting[waiting_on]
        try:
            st = os.lstat(cand.path)
        except OSError:
            return
        if stat.S_ISLNK(st.st_mode):
            target = os.path.realpath(cand.path)
            troot = self.roots.root_for(target)
            if troot is None:
                self.log.debug("scan.link_outside", path=cand.path, target=target)
                return
            try:
                tst = os.lstat(target)
            except OSError:
                return
            if not stat.S_ISREG(tst.st_mode):
                return
            row = baseline.lookup(Identity.of(tst))
            if row is not None:
                if hfcache.snapshot_link(cand.path):
                    self.log.info("hf.snapshot", path=cand.path, blob=target, verdict=row.verdict,
                                  severity=row.severity, sha256=row.sha256, rule_ids=list(row.rule_ids),
                                  hf=hfcache.describe(cand.path))
                return
            if hfcache.snapshot_link(cand.path) and (tst.st_dev, tst.st_ino) in self.inflight:
                self._park(cand, float(self._config().watch["settle_time"]) or 0.1)  # name it once it has a verdict
                return
            cand = Candidate(target, (tst.st_dev, tst.st_ino), cand.reason, troot.path, cand.since, cand.wall)
            st = tst
        if not stat.S_ISREG(st.st_mode):
            return
        ident = Identity.of(st)
        with self.lock:
            if ident.inode in self.inflight:
                self.dirty.add(ident.inode)
                return
        if baseline.lookup(ident) is not None:
            return
        if not COMPLETE_ON.get(cand.reason, False):
            watch = self._config().watch
            state = writer_state(cand.path)
            if state == "busy":
                with self.lock:
                    if ident.inode in self._waiting:
                        return  # one candidate already waits on this writer (a burst of Modified events)
                    self._waiting[ident.inode] = cand
                    cand.waiting_on = ident.inode
                waited = time.monotonic() - cand.since
                limit = float(watch["busy_max_wait"])
                if self._once() or waited >= limit:
                    # a writer that never lets go must not keep the file unscanned and unreported
                    self.log.warning("scan.deferred", path=cand.path, waited_s=round(waited, 1),
                                     why="a writer still holds the file open",
                                     answer="scanning a snapshot now" + (" (run --once does not wait)"
                                                                         if self._once() else ""))
                    with self.lock:
                        self._waiting.pop(ident.inode, None)
                    self.submit(cand, ident)
                    return
                cand.attempts += 1
                delay = min(BUSY_MAX_RECHECK, watch["busy_recheck"] * (2 ** min(cand.attempts - 1, 4)),
                            max(0.05, limit - waited))
                self.log.debug("scan.wait_writer", path=cand.path, recheck_s=delay)
                self._park(cand, delay)
                return
            if state == "unknown":
                settle = float(watch["settle_time"])
                snap = (ident.size, ident.mtime_ns)
                age = time.time() - st.st_mtime
                if cand.first_stat != snap or age < settle:
                    cand.first_stat = snap
                    self._park(cand, settle)
                    return
        self.submit(cand, ident)

    # ------------------------------------------------------------------ jobs
    def code_rule(self, path: str, root: Root | None) -> tuple[str, str] | None:
        if not self._config().scan["report_code"] or not path.endswith(".py"):
            return None
        parts = path.split(os.sep)
        if (root is not None and root.kind == "hf_modules") or "transformers_modules" in parts:
            return ("MODELSCAND_REMOTE_CODE", "trust_remote_code module: Python that transformers imports and runs "
                    "when this model is loaded")
        stop = root.path if root is not None else "/"
        d = os.path.dirname(path)
        while True:
            if os.path.exists(os.path.join(d, "hubconf.py")):
                return ("MODELSCAND_TORCH_HUB_CODE", "torch.hub repository code (a hubconf.py tree): runs on "
                        "torch.hub.load")
            if d == stop or len(d) <= len(stop) or d == "/":
                return None
            d = os.path.dirname(d)

    def job_for(self, cand: Candidate, ident: Identity) -> ScanJob:
        root = self.roots.get(cand.root) or self.roots.root_for(cand.path)
        code = self.code_rule(cand.path, root)
        if code is None:
            return ScanJob(cand.path, cand.root, ident.inode, os.path.basename(cand.path))
        return ScanJob(cand.path, cand.root, ident.inode, os.path.basename(cand.path), kind="code",
                       code_rule=code[0], code_description=code[1],
                       code_severity=self._config().code_severity.name.lower())

    def submit(self, cand: Candidate, ident: Identity) -> None:
        with self.lock:
            self.inflight[ident.inode] = (cand, ident)
        future = self._pool().submit(self.job_for(cand, ident))
        future.add_done_callback(lambda f: self._done(cand, ident, f.result()))

    def _done(self, cand: Candidate, ident: Identity, reply: ScanReply) -> None:
        """In the worker slot's thread: hand the reply to results, then free the inode."""
        try:
            self._on_reply(cand, ident, reply)
        except Exception as exc:
            self.log.error("daemon.internal_error", where="results", path=cand.path,
                           error=f"{type(exc).__name__}: {exc}")
        finally:
            with self.lock:
                self.inflight.pop(ident.inode, None)
                dirty = ident.inode in self.dirty
                self.dirty.discard(ident.inode)
            if dirty:
                self._reoffer(cand, "closed")
            self.activity.changed()
