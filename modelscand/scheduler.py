"""Scheduling: from a queued candidate to a job in a worker, exactly once per identity.

The scheduler thread takes candidates off the queue and decides, for each:

- the baseline already knows this identity -> nothing to do (unless the action would still
  act on that verdict: a cached finding left in place in quarantine mode is scanned again);
- a symlink -> its target, if the target is inside a root (an HF snapshot link names its
  blob's verdict once the blob has one);
- the inode is being scanned right now -> remember that it changed (rescanned after);
- changed less than ``watch.settle_time`` ago (measured on the daemon's monotonic clock from
  the last change it saw; file times are a hint for the first look only) -> park it until it
  has been quiet that long;
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
import pwd
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from modelscand import hfcache
from modelscand.activity import Activity
from modelscand.config import Config, Root
from modelscand.queue import Candidate, Rescan, WorkQueue
from modelscand.roots import Roots
from modelscand.state import Baseline, Identity
from modelscand.workers import KILLED, ScanJob, ScanReply, WorkerPool
from modelscand.writers import COMPLETE_ON

BUSY_MAX_RECHECK = 30.0
UNSTABLE_AFTER = 5  # scans in a row without a verdict before a file is offered again only after a delay
KILLED_RETRY = 0.5  # seconds before the first scan again after a worker was killed from outside (doubling)
KILLED_MAX = 3  # workers killed from outside while scanning one file before it gets an incomplete verdict


@dataclass
class Track:
    """One inode being scanned, and the paths it was seen at meanwhile."""

    cand: Candidate
    ident: Identity
    also: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (reason, root)


def _canonical_parent(path: str) -> bool:
    """No directory on the way to `path` is a symlink (roots are realpath'd already)."""
    parent = os.path.dirname(path)
    return os.path.realpath(parent) == parent


def owner_can_read(uid: int, path: str) -> bool:
    """Could user `uid` open `path` for reading (search on every directory, read on the
    file)? The daemon may run as root: it reads a file outside the roots for a link's
    owner only when that owner could have read it anyway."""
    if uid == 0:
        return True
    try:
        user = pwd.getpwuid(uid)
        groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    except (KeyError, OSError):
        groups = set()
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        p = os.sep.join(parts[:i]) or os.sep
        try:
            st = os.stat(p)
        except OSError:
            return False
        bit = 4 if i == len(parts) else 1  # read the file, search the directories
        if st.st_uid == uid:
            ok = st.st_mode & (bit << 6)
        elif st.st_gid in groups:
            ok = st.st_mode & (bit << 3)
        else:
            ok = st.st_mode & bit
        if not ok:
            return False
    return True


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
                 reoffer: Callable[[str, str, str], None], settled: Callable[[object], bool] = lambda row: True):
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
        self._settled = settled  # is a cached verdict final (not one the action would still act on)?
        self.lock = threading.RLock()
        self.inflight: dict[tuple[int, int], Track] = {}
        self._parked: list = []
        self._unparking = 0
        self._waiting: dict[tuple[int, int], Candidate] = {}  # inode -> the one candidate parked on its writer
        self._quiet: dict[tuple[int, int], Candidate] = {}  # inode -> the one candidate parked for quiet
        self._no_verdict: dict[tuple[int, int], int] = {}  # inode -> scans in a row that ended without one
        self._killed: dict[tuple[int, int], int] = {}  # inode -> its scans whose worker was killed from outside
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None  # the loop's

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
            first = self._parked[0][2] is cand
        if first and threading.current_thread() is not self._thread:
            self.queue.wake()  # a worker slot parked it: the loop may be waiting without a deadline

    def loop(self) -> None:
        self._thread = threading.current_thread()
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
        if cand.waiting_on is not None:
            with self.lock:
                if self._waiting.get(cand.waiting_on) is cand:
                    del self._waiting[cand.waiting_on]
            cand.waiting_on = None
        if cand.quiet_on is not None:
            with self.lock:
                if self._quiet.get(cand.quiet_on) is cand:
                    del self._quiet[cand.quiet_on]
            cand.quiet_on = None
        try:
            st = os.lstat(cand.path)
        except OSError:
            return
        if stat.S_ISLNK(st.st_mode) or not _canonical_parent(cand.path):
            # a link, or a path through a linked directory: what is there now is its target
            resolved = self._resolve(cand, baseline)
            if resolved is None:
                return
            cand, st = resolved
        if not stat.S_ISREG(st.st_mode):
            return
        ident = Identity.of(st)
        with self.lock:
            track = self.inflight.get(ident.inode)
            if track is not None:  # scanned right now: look again at every path it had meanwhile
                track.also[cand.path] = (cand.reason, cand.root)
                return
        row = baseline.lookup(ident)
        if row is not None and self._settled(row):
            return
        if not COMPLETE_ON.get(cand.reason, False):
            watch = self._config().watch
            # quiet first: a writer that reopens and appends per chunk is not done between
            # chunks; scanning then would log an error (or a clean prefix) per chunk
            quiet = self._quiet_left(cand, ident, st, float(watch["settle_time"]))
            waited = time.monotonic() - cand.since
            if quiet > 0 and not self._once() and waited < float(watch["busy_max_wait"]):
                with self.lock:
                    other = self._quiet.get(ident.inode)
                    if other is not None and other is not cand:  # one parked candidate per inode
                        other.path, other.root = cand.path, cand.root
                        return
                    self._quiet[ident.inode] = cand
                    cand.quiet_on = ident.inode
                self._park(cand, quiet + 0.01)
                return
            if quiet > 0 and not self._once():  # written to without a pause for busy_max_wait
                self.log.warning("scan.deferred", path=cand.path, waited_s=round(waited, 1),
                                 why="the file keeps being written", answer="scanning a snapshot now")
                self.submit(cand, ident)
                return
            state = writer_state(cand.path)
            if state == "busy":
                with self.lock:
                    waiting = self._waiting.get(ident.inode)
                    if waiting is not None:  # one candidate waits per writer; it takes the newest path
                        waiting.path, waiting.root = cand.path, cand.root
                        return
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
                    cand.waiting_on = None
                    self.submit(cand, ident)
                    return
                cand.attempts += 1
                delay = min(BUSY_MAX_RECHECK, watch["busy_recheck"] * (2 ** min(cand.attempts - 1, 4)),
                            max(0.05, limit - waited))
                self.log.debug("scan.wait_writer", path=cand.path, recheck_s=delay)
                self._park(cand, delay)
                return
            if state == "unknown":
                # no lease: the same size and mtime once more, settle_time later on our clock
                snap = (ident.size, ident.mtime_ns)
                if cand.first_stat != snap and time.monotonic() - cand.since < float(watch["busy_max_wait"]):
                    cand.first_stat = snap
                    self._park(cand, float(watch["settle_time"]))
                    return
        self.submit(cand, ident)

    @staticmethod
    def _quiet_left(cand: Candidate, ident: Identity, st: os.stat_result, settle: float) -> float:
        """Seconds until the file has been quiet for `settle`, on the daemon's monotonic clock
        since the last change it observed (a new size, mtime or ctime at a look). File times
        are only a hint for the first look, clamped to [0, settle]: a future mtime (`touch -d
        2100-01-01`, a clock set back) costs one settle period, never years, and a clock set
        forward costs nothing but the lease probe that follows."""
        now = time.monotonic()
        seen = (ident.size, ident.mtime_ns, ident.ctime_ns)
        if cand.seen != seen:
            age = min(max(time.time() - max(st.st_mtime, st.st_ctime), 0.0), settle)
            cand.seen, cand.changed_at = seen, now - age
        return settle - (now - cand.changed_at)

    def _resolve(self, cand: Candidate, baseline: Baseline) -> tuple[Candidate, os.stat_result] | None:
        """The candidate for what a link (or a path through a linked directory) leads to now."""
        target = os.path.realpath(cand.path)
        try:
            tst = os.stat(target)
        except OSError:
            return None  # dangling: nothing to scan
        if not stat.S_ISREG(tst.st_mode):
            return None
        troot = self.roots.root_for(target)
        via = cand.via or cand.path
        if troot is None:
            return self._outside(cand, target, tst, baseline)
        row = baseline.lookup(Identity.of(tst))
        if row is not None and self._settled(row):
            if hfcache.snapshot_link(via):
                self.log.info("hf.snapshot", path=via, blob=target, verdict=row.verdict, severity=row.severity,
                              sha256=row.sha256, rule_ids=list(row.rule_ids), hf=hfcache.describe(via))
            return None
        if hfcache.snapshot_link(via) and (tst.st_dev, tst.st_ino) in self.inflight:
            self._park(cand, float(self._config().watch["settle_time"]) or 0.1)  # name it once it has a verdict
            return None
        return Candidate(target, (tst.st_dev, tst.st_ino), cand.reason, troot.path, cand.since, cand.wall,
                         via=via), tst

    def _outside(self, cand: Candidate, target: str, tst: os.stat_result,
                 baseline: Baseline) -> tuple[Candidate, os.stat_result] | None:
        """A link in a root whose target is outside every root: warn, and scan the target
        read-only when the link's owner could read it (a verdict the operator can act on)."""
        via = cand.via or cand.path
        row = baseline.lookup(Identity.of(tst))
        try:
            owner = os.lstat(via).st_uid
        except OSError:
            owner = None
        readable = owner is not None and owner_can_read(owner, target)
        self.log.warning("link.outside_roots", path=via, target=target, owner=owner,
                         verdict=row.verdict if row is not None else None,
                         answer=("verdict already known" if row is not None else
                                 "scanning the target read-only" if readable else
                                 "not scanned: the link's owner cannot read the target"))
        if row is not None or not readable:
            return None
        return Candidate(target, (tst.st_dev, tst.st_ino), cand.reason, os.path.dirname(target), cand.since,
                         cand.wall, via=via, outside=True), tst

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
            self.inflight[ident.inode] = Track(cand, ident)
        future = self._pool().submit(self.job_for(cand, ident))
        future.add_done_callback(lambda f: self._done(cand, ident, f.result()))

    def _unstable(self, ident: Identity, cand: Candidate, reply: ScanReply) -> float:
        """Seconds to wait before offering this file again: 0 until its scans have ended
        without a verdict UNSTABLE_AFTER times in a row (a file rewritten during every scan, a
        path that keeps changing under the worker), then doubling up to BUSY_MAX_RECHECK, with
        one warning. Never given up: the file is scanned once it holds still."""
        with self.lock:
            if len(self._no_verdict) > 10000:
                self._no_verdict.clear()
            n = self._no_verdict.get(ident.inode, 0) + 1
            self._no_verdict[ident.inode] = n
        if n < UNSTABLE_AFTER:
            return 0.0
        if n == UNSTABLE_AFTER:
            self.log.warning("scan.unstable", path=cand.via or cand.path, why=reply.status, error=reply.error,
                             tries=n, answer="offered again with a growing delay until it holds still")
        return min(BUSY_MAX_RECHECK, 0.5 * 2 ** (n - UNSTABLE_AFTER))

    def _killed_retry(self, cand: Candidate, ident: Identity, reply: ScanReply) -> tuple[ScanReply, float]:
        """A worker killed from outside mid-scan (the OOM killer): the file is scanned again
        after a short pause; after KILLED_MAX such deaths on it, it gets one ``incomplete``
        verdict (a warning, kept in the baseline: no loop) instead of a retry."""
        with self.lock:
            if len(self._killed) > 10000:
                self._killed.clear()
            n = self._killed.get(ident.inode, 0) + 1
            self._killed[ident.inode] = n
            if n >= KILLED_MAX:
                del self._killed[ident.inode]
        if n >= KILLED_MAX:
            return ScanReply("error", identity=ident, incomplete=True,
                             error=f"not scanned: the scan worker was killed from outside {n} times while "
                                   f"scanning this file (last: {reply.error}); is it exhausting memory?"), 0.0
        delay = min(BUSY_MAX_RECHECK, KILLED_RETRY * 2 ** (n - 1))
        self.log.info("scan.retry", path=cand.via or cand.path, why=reply.error, tries=n, retry_s=delay,
                      answer="a worker killed from outside says nothing of the file: scanning it again")
        return reply, delay

    def _done(self, cand: Candidate, ident: Identity, reply: ScanReply) -> None:
        """In the worker slot's thread: hand the reply to results, free the inode, and offer
        again every path the file had meanwhile (a rename while it was scanned) - and its
        own path when the reply is no verdict (gone, changed, replaced, escaped, killed)."""
        retry = 0.0
        if reply.status == KILLED:
            reply, retry = self._killed_retry(cand, ident, reply)
        try:
            self._on_reply(cand, ident, reply)
        except Exception as exc:
            self.log.error("daemon.internal_error", where="results", path=cand.path,
                           error=f"{type(exc).__name__}: {exc}")
        finally:
            with self.lock:
                track = self.inflight.pop(ident.inode, None)
            again = dict(track.also) if track is not None else {}
            if retry:
                backoff = retry
            elif reply.verdict is None and reply.status not in ("gone", KILLED):
                backoff = self._unstable(ident, cand, reply)
            else:
                backoff = 0.0
            if backoff:  # not at once again: a file changing under every scan must not loop a worker
                path = cand.via or cand.path
                self._park(Candidate(path, ("retry", path), "created", cand.root), backoff)
            elif reply.verdict is None:  # bytes changed under the scan: probe the writer again
                reason = "created" if reply.status in ("changed", "replaced") else cand.reason
                again.setdefault(cand.via or cand.path, (reason, cand.root))
            else:
                with self.lock:
                    self._no_verdict.pop(ident.inode, None)
                    self._killed.pop(ident.inode, None)
            for path, (reason, root) in again.items():
                self._reoffer(path, reason, root)
            self.activity.changed()
