"""Reconciliation: walk a root against the baseline and queue whatever it does not know.

This is what makes the guarantee hold when inotify cannot: at start-up (before READY),
periodically, after an overflow, a handler error or a full queue, for a root that appeared
late, and for sub-directories whose watch failed. A file whose identity the baseline knows
costs one `lstat` and one indexed lookup; everything else is queued with a blocking put
(back-pressure: a walk can wait, an event handler cannot). Requests for a root that is
already waiting for a walk are coalesced, and walks that answer lost events (an overflow,
a full queue) are rate-limited per root: a flood of overflows is one walk per gap.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from typing import Callable

from modelscand.activity import Activity
from modelscand.config import Config, Root
from modelscand.queue import Candidate, WorkQueue
from modelscand.roots import Roots
from modelscand.state import Baseline, Identity
from modelscand.writers import is_temp

#: walks that answer lost events; rate-limited per path (see `Reconciler.request`)
RATE_LIMITED = frozenset({"overflow", "queue_full", "handler_error"})
RESCAN_MIN_GAP = 10.0  # seconds between two such walks of one path...
RESCAN_GAP_FACTOR = 10.0  # ...and at least ten times as long as the last walk took


class Reconciler:
    def __init__(self, config: Callable[[], Config], roots: Roots, queue: WorkQueue, baseline: Callable[[], Baseline],
                 log, activity: Activity, *, stopping: threading.Event,
                 on_cached: Callable[[str, object], None] | None = None,
                 settled: Callable[[object], bool] = lambda row: True,
                 on_special: Callable[[str, os.stat_result], None] | None = None,
                 counts: dict | None = None):
        self._config = config
        self.roots = roots
        self.queue = queue
        self._baseline = baseline
        self.log = log
        self.activity = activity
        self._stopping = stopping
        self.on_cached = on_cached  # run --once: report what the baseline already knows
        self._settled = settled  # a cached verdict the action would still act on is queued again
        self.on_special = on_special  # a FIFO, socket or device: warned about if named like a model
        self.counts = counts if counts is not None else {"unscanned": 0}
        self._cond = threading.Condition()
        self._pending: dict[str, tuple[str, float]] = {}  # path -> (why, due on the monotonic clock)
        self._last: dict[str, tuple[float, float]] = {}  # path -> (end, duration) of its last walk
        self._running = 0
        self._closed = False
        self.dir_count = 0
        self._temps: dict[tuple[int, int], tuple[tuple, float]] = {}  # temp inode -> (size, mtime, ctime), since

    def _stale(self, st: os.stat_result, stale_after: float) -> bool:
        """A temp-named file untouched for `stale_after` seconds: by its mtime, or, when the
        mtime says nothing (in the future: `touch -d 2100-01-01`, a clock set back), as seen
        unchanged across walks on the daemon's monotonic clock."""
        if time.time() - st.st_mtime >= stale_after:
            return True
        key, now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns), time.monotonic()
        with self._cond:
            if len(self._temps) > 100000:
                self._temps.clear()
            seen = self._temps.get((st.st_dev, st.st_ino))
            if seen is None or seen[0] != key:
                self._temps[(st.st_dev, st.st_ino)] = (key, now)
                return False
        return now - seen[1] >= stale_after

    # ------------------------------------------------------------------ requests
    def request(self, root_path: str, why: str) -> None:
        """Walk `root_path` soon. Requests for a path already waiting are one walk; a walk
        that answers lost events (overflow, full queue, handler error) comes at most once
        per `_gap()` after the previous walk of that path ended, so a flood of overflows
        costs one walk per gap, never a walk loop."""
        with self._cond:
            if root_path in self._pending:
                return
            self._pending[root_path] = (why, self._due(root_path, why))
            self._cond.notify_all()

    def _due(self, path: str, why: str) -> float:
        now = time.monotonic()
        last = self._last.get(path)
        if why not in RATE_LIMITED or last is None:
            return now
        end, took = last
        return max(now, end + max(RESCAN_MIN_GAP, RESCAN_GAP_FACTOR * took))

    def busy(self) -> bool:
        with self._cond:
            return bool(self._running or self._pending)

    def close(self) -> None:
        """Stopping: walks not started yet are dropped (the next start-up walk covers them)."""
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()

    def _next(self) -> tuple[str, str] | None:
        with self._cond:
            while not self._closed:
                if self._pending:
                    path, (why, due) = min(self._pending.items(), key=lambda kv: kv[1][1])
                    left = due - time.monotonic()
                    if left <= 0:
                        del self._pending[path]
                        self._running += 1
                        return path, why
                    self._cond.wait(left)
                else:
                    self._cond.wait()
            return None

    def loop(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            path, why = item
            started = time.monotonic()
            try:
                root = self.roots.get(path) or self.roots.root_for(path) or self.roots.polled.get(path)
                if root is not None and not self._stopping.is_set():
                    self.walk(root, why, top=path)
            except Exception as exc:
                self.log.error("reconcile.failed", root=path, error=f"{type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    self._running -= 1
                    end = time.monotonic()
                    self._last[path] = (end, end - started)
                    if path in self._pending:  # asked for again while walking: not before the gap
                        w, due = self._pending[path]
                        self._pending[path] = (w, max(due, self._due(path, w)))
                    self._cond.notify_all()
                self.activity.changed()

    # ------------------------------------------------------------------ the walk
    def _unknown_outside_target(self, link: str, baseline: Baseline) -> bool:
        target = os.path.realpath(link)
        if self.roots.root_for(target) is not None:
            return False
        try:
            tst = os.stat(target)
        except OSError:
            return False
        return stat.S_ISREG(tst.st_mode) and baseline.lookup(Identity.of(tst)) is None

    def walk(self, root: Root, why: str, top: str | None = None) -> None:
        top = top or root.path
        baseline = self._baseline()
        started = time.monotonic()
        self.log.info("reconcile.start", root=root.path, path=top, why=why)
        seen: set[tuple[int, int]] = set()
        files = queued = dirs = 0
        complete = True
        # temp-named files untouched this long are no download in progress: scan them too
        stale_after = float(self._config().watch["stale_temp_after"])

        def onerror(exc: OSError) -> None:
            nonlocal complete
            complete = False
            self.counts["unscanned"] = self.counts.get("unscanned", 0) + 1
            self.log.warning("reconcile.unreadable", path=getattr(exc, "filename", None), error=exc.strerror or str(exc),
                             answer="nothing below it is scanned until it can be read")

        if os.path.isfile(top):
            walker = [(os.path.dirname(top), [], [os.path.basename(top)])]
        else:
            walker = os.walk(top, onerror=onerror)
        for dirpath, _dirs, names in walker:
            dirs += 1
            if self._stopping.is_set():
                complete = False
                break
            for name in names:
                path = os.path.join(dirpath, name)
                temp = is_temp(name)
                if (temp and not stale_after) or self.roots.excluded(path, root.path):
                    continue
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue  # gone since it was listed
                except OSError as exc:  # too long a path, EIO: never silently unscanned
                    exc.filename = path
                    onerror(exc)
                    continue
                if stat.S_ISLNK(st.st_mode):
                    # a link into a root: its target is walked there; one out of every root is offered
                    # (the scheduler warns and scans the target) unless its target's verdict is known
                    if self._unknown_outside_target(path, baseline):
                        if self.queue.put(Candidate(path, ("link", path), "reconcile", root.path)):
                            queued += 1
                    continue
                if not stat.S_ISREG(st.st_mode):
                    if self.on_special is not None:
                        self.on_special(path, st)
                    continue
                if temp and not self._stale(st, stale_after):
                    continue  # a download in progress: its rename is the signal
                files += 1
                ident = Identity.of(st)
                seen.add(ident.inode)
                row = baseline.lookup(ident)
                if row is not None and self._settled(row):
                    if self.on_cached is not None:
                        self.on_cached(path, row)
                    continue
                if self.queue.put(Candidate(path, ident.inode, "stale_temp" if temp else "reconcile", root.path)):
                    queued += 1
        if top == root.path:
            self.dir_count = max(self.dir_count, dirs) if why != "startup" else self.dir_count + dirs
        pruned = baseline.prune(top, seen) if complete and os.path.isdir(top) else 0
        baseline.set_meta(**{f"reconcile:{root.path}": {"at": time.time(), "why": why, "files": files}})
        self.log.info("reconcile.done", root=root.path, path=top, why=why, files=files, queued=queued, dirs=dirs,
                      pruned=pruned, ms=round((time.monotonic() - started) * 1000, 1))
