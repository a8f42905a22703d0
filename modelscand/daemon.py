"""The daemon: wires watcher, queue, scheduler, workers, baseline and action together.

Threads, and why each one exists:

- per root, watchdog's threads (inotify reader, emitter, dispatcher). The handler only
  classifies the event, `lstat`s the path and offers it to the bounded queue;
- the scheduler: takes candidates off the queue, skips what the baseline already knows,
  waits out writers (lease probe; size/mtime stability where no lease can be taken),
  answers rescan markers, and submits jobs to the worker pool;
- the reconciler: walks roots (start-up, periodic, overflow, late root, failed sub-watch)
  and feeds the queue with blocking puts;
- the maintenance timer: missing-root retries, periodic reconciliation, health check,
  sd_notify WATCHDOG=1/STATUS=, SIGHUP reloads. It sleeps on an Event between deadlines;
  with every root present nothing wakes up more than once a minute (no polling loop);
- the worker pool's slot threads, which wait for worker processes and log verdicts.

Start-up order: watches first, then the reconciliation walk, then READY=1 - so a file
written during the walk is either seen by the walk or by the watch.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import hashlib
import heapq
import itertools
import json
import os
import queue as _queue
import resource
import signal
import stat
import threading
import time

from modelscan_core._version import __version__ as CORE_VERSION
from modelscan_core.model import Severity

from modelscand import hfcache
from modelscand import logging as mlog
from modelscand.actions import Outcome, make_action
from modelscand.config import Config, Root
from modelscand.notify import Notifier
from modelscand.queue import Candidate, Rescan, WorkQueue
from modelscand.state import Baseline, Identity
from modelscand.watcher import OverflowTrap, RootWatch
from modelscand.workers import DEFAULT_SCAN_FUNCTION, WorkerPool
from modelscand.writers import COMPLETE_ON, is_temp, temp_rule

EVENTS = {
    "clean": ("scan.clean", "info"),
    "issues": ("scan.finding", "warning"),
    "error": ("scan.error", "error"),
    "incomplete": ("scan.incomplete", "warning"),
    "skipped": ("scan.skipped", "info"),
}
HEALTH_INTERVAL = 60.0
SUBWATCH_POLL_INTERVAL = 30.0
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


def fingerprint(config: Config) -> str:
    settings = config.scanner_settings()
    blob = json.dumps({"core": CORE_VERSION, "settings": settings.data, "code": [config.scan["report_code"],
                       config.scan["code_severity"]]}, sort_keys=True, default=str)
    return f"{CORE_VERSION}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


class Daemon:
    def __init__(self, config: Config, *, watch: bool = True, report_cached: bool = False,
                 notifier: Notifier | None = None, scan_function: str = DEFAULT_SCAN_FUNCTION):
        self.config = config
        self.watch_enabled = watch
        self.report_cached = report_cached
        self.notifier = notifier or Notifier()
        self.scan_function = scan_function
        self.log = mlog.get()
        self.queue = WorkQueue(config.watch["queue_size"])
        self.action = make_action(config.mode, config.threshold)
        self.baseline: Baseline | None = None
        self.pool: WorkerPool | None = None
        self.roots: dict[str, Root] = {}  # active, by realpath
        self.missing: dict[str, Root] = {}  # by configured path
        self.watches: dict[str, RootWatch] = {}
        self.polled: dict[str, Root] = {}  # sub-directories whose watch failed
        self.handler_hook = None  # tests: called for each watchdog event before handling
        self._lock = threading.RLock()
        self._inflight: dict[tuple[int, int], tuple[Candidate, Identity]] = {}
        self._dirty: set[tuple[int, int]] = set()
        self._parked: list = []
        self._unparking = 0
        self._waiting: dict[tuple[int, int], Candidate] = {}  # inode -> the one candidate parked on its writer
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._reload = threading.Event()
        self._reconcile_q: _queue.Queue = _queue.Queue()
        self._reconcile_pending: set[str] = set()
        self._reconciling = 0
        self._idle = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._trap = OverflowTrap(self._on_overflow_record)
        self.ready = threading.Event()
        self.counts = {"scanned": 0, "clean": 0, "issues": 0, "error": 0, "incomplete": 0, "skipped": 0,
                       "over_threshold": 0, "cached": 0, "overflows": 0, "handler_errors": 0}
        self.last_overflow: float | None = None
        self.dir_count = 0
        self.started_at = time.time()
        self.once = False  # run --once: nothing waits for writers

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cfg = self.config
        self.baseline = Baseline(cfg.state_dir, fingerprint(cfg))
        self.baseline.set_meta(pid=os.getpid(), started_at=self.started_at, ready_at=None, mode=cfg.mode,
                               config=cfg.source, stopped_at=None)
        self.pool = WorkerPool(cfg.scan["workers"], timeout=float(cfg.scan["timeout"]),
                               memory_limit_mb=cfg.scan["memory_limit_mb"],
                               settings_file=os.path.expanduser(cfg.scan["settings_file"]) or None,
                               on_result=self._on_result, scan_function=self.scan_function)
        self.pool.start()
        self._spawn(self._scheduler_loop, "modelscand-scheduler")
        self._spawn(self._reconciler_loop, "modelscand-reconciler")
        self.log.info("daemon.start", version=CORE_VERSION, mode=cfg.mode, state_dir=cfg.state_dir,
                      config=cfg.source, workers=cfg.scan["workers"], pid=os.getpid(), watch=self.watch_enabled)
        if self.watch_enabled:
            self._trap.install()
        roots = cfg.roots()
        if not roots:
            self.log.warning("watch.no_roots", hint="add [watch] roots or enable conventions")
        for root in roots:
            self._add_root(root)
        # the start-up reconciliation: synchronous, before READY
        for root in list(self.roots.values()):
            self._reconcile(root, "startup")
        self._check_limits()
        self.ready.set()
        self.baseline.set_meta(ready_at=time.time(), roots=sorted(self.roots), missing=sorted(self.missing))
        self.log.info("daemon.ready", roots=sorted(self.roots), missing=sorted(self.missing),
                      queued=len(self.queue), dirs=self.dir_count)
        self.notifier.ready(self.status_text())
        if self.watch_enabled:
            self._spawn(self._maintenance_loop, "modelscand-maintenance")

    def _spawn(self, fn, name) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def run(self) -> int:
        """Foreground service: signals -> stop/reload; returns the exit code."""
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())
        self.start()
        while not self._stop.wait(3600):
            pass
        self.shutdown()
        return 0

    def run_once(self, max_wait: float | None = None) -> int:
        """Walk, drain, report, exit: 1 findings at/above threshold, 2 scan errors, else 0."""
        self.once = True
        self.start()
        self.wait_idle(timeout=max_wait)
        with self._lock:
            deferred = [c.path for _, _, c in self._parked]
        for path in deferred:
            self.log.warning("scan.deferred", path=path, why="a writer still holds the file open")
        self.shutdown()
        if self.counts["over_threshold"]:
            return 1
        if self.counts["error"] or self.counts["incomplete"] or deferred:
            return 2
        return 0

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        self._reload.set()
        self._wake.set()

    def shutdown(self) -> None:
        self.notifier.stopping()
        self.log.info("daemon.stopping", queued=len(self.queue), in_flight=len(self._inflight))
        self._stop.set()
        self._wake.set()
        for w in list(self.watches.values()):
            w.stop()
        self.watches.clear()
        self._trap.uninstall()
        drained = self.wait_idle(timeout=float(self.config.data["daemon"]["drain_timeout"]), include_parked=False)
        self._reconcile_q.put(None)
        self.queue.close()
        if self.pool is not None:
            self.pool.stop()
        for t in self._threads:
            t.join(5)
        if self.baseline is not None:
            self.baseline.set_meta(stopped_at=time.time(), counts=self.counts, last_overflow=self.last_overflow)
            self.baseline.close()
        self.log.info("daemon.stop", drained=drained, **self.counts)
        self.notifier.close()

    def idle(self, include_parked: bool = True) -> bool:
        with self._lock:
            return (self.queue.empty() and not self._inflight and self._reconciling == 0
                    and not self._reconcile_pending and (not include_parked or not (self._parked or self._unparking))
                    and (self.pool is None or self.pool.pending == 0))

    def wait_idle(self, timeout: float | None = None, include_parked: bool = True) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.idle(include_parked):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            with self._idle:
                self._idle.wait(0.05)
        return True

    # ------------------------------------------------------------------ roots
    def _add_root(self, root: Root) -> bool:
        if not os.path.isdir(root.path):
            with self._lock:
                first = root.configured not in self.missing
                self.missing[root.configured] = root
            if first:
                self.log.warning("watch.root_missing", root=root.path, configured=root.configured, origin=root.origin,
                                 retry_s=self.config.watch["root_retry_interval"])
            return False
        if self.watch_enabled:
            w = RootWatch(root, on_candidate=self.offer, on_handler_error=self._on_handler_error,
                          on_subwatch_failed=self._on_subwatch_failed, on_root_gone=self._on_root_gone,
                          hook=self._hook)
            try:
                w.start()
            except OSError as exc:
                with self._lock:
                    self.missing[root.configured] = root
                self.log.error("watch.root_failed", root=root.path, error=exc.strerror or str(exc), errno=exc.errno,
                               fix=_watch_fix(exc))
                return False
            self.watches[root.path] = w
        with self._lock:
            self.roots[root.path] = root
            self.missing.pop(root.configured, None)
        self.log.info("watch.start", root=root.path, configured=root.configured, kind=root.kind, origin=root.origin,
                      symlinked=os.path.abspath(os.path.expanduser(root.configured)) != root.path)
        return True

    def _hook(self, watch, event) -> None:
        if self.handler_hook is not None:
            self.handler_hook(watch, event)

    def _retry_missing(self) -> None:
        with self._lock:
            missing = list(self.missing.values())
        for root in missing:
            expanded = os.path.expanduser(root.configured)
            real = os.path.realpath(expanded) if not root.pattern else root.path
            if not os.path.isdir(real):
                continue
            fresh = Root(real, root.configured, root.kind, root.origin, root.pattern)
            with self._lock:
                self.missing.pop(root.configured, None)
            if self._add_root(fresh):
                self.log.info("watch.root_appeared", root=fresh.path, configured=root.configured)
                self.request_reconcile(fresh.path, "root_appeared")
        # glob patterns may match new directories
        if any(r.pattern for r in self.config.roots()):
            for r in self.config.roots():
                if r.pattern and r.path not in self.roots and os.path.isdir(r.path):
                    if self._add_root(r):
                        self.request_reconcile(r.path, "root_appeared")

    def _on_root_gone(self, root: Root) -> None:
        self.log.warning("watch.root_lost", root=root.path)
        with self._lock:
            self.roots.pop(root.path, None)
            self.missing[root.configured] = root
        w = self.watches.pop(root.path, None)
        if w is not None:
            threading.Thread(target=w.stop, daemon=True).start()  # not from its own dispatcher thread
        self._wake.set()

    def root_for(self, path: str) -> Root | None:
        best = None
        with self._lock:
            for rp, root in self.roots.items():
                if path == rp or path.startswith(rp.rstrip("/") + "/"):
                    if best is None or len(rp) > len(best.path):
                        best = root
        return best

    # ------------------------------------------------------------------ events in
    def excluded(self, path: str, root_path: str) -> bool:
        rel = os.path.relpath(path, root_path) if path != root_path else os.path.basename(path)
        base = os.path.basename(path)
        w = self.config.watch

        def match(pat: str) -> bool:
            return fnmatch.fnmatchcase(rel, pat) if "/" in pat else fnmatch.fnmatchcase(base, pat)

        if any(match(p) for p in w["exclude"]):
            return True
        return bool(w["include"]) and not any(match(p) for p in w["include"])

    def offer(self, path: str, reason: str, root: Root, *, block: bool = False) -> bool:
        """Called from watchdog handlers: classify, lstat, enqueue. Never blocks by default."""
        if is_temp(os.path.basename(path)) or self.excluded(path, root.path):
            return False
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if stat.S_ISLNK(st.st_mode):
            key = ("link", path)
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
        else:
            return False
        cand = Candidate(path, key, reason, root.path)
        if block:
            return self.queue.put(cand)
        if not self.queue.offer(cand):
            if self.queue.dropped == 1 or self.queue.dropped % 1000 == 0:
                self.log.warning("watch.queue_full", root=root.path, dropped=self.queue.dropped,
                                 queue_size=self.queue.maxsize, answer="root rescan")
            return False
        return True

    def _on_handler_error(self, root: Root, event, exc: BaseException) -> None:
        self.counts["handler_errors"] += 1
        self.log.error("watch.handler_error", root=root.path, event_type=event.event_type,
                       path=os.fsdecode(getattr(event, "dest_path", "") or event.src_path),
                       error=f"{type(exc).__name__}: {exc}", answer="root rescan")
        self.queue.request_rescan(root.path, "handler_error")

    def _on_subwatch_failed(self, root: Root, path: str, exc: OSError) -> None:
        with self._lock:
            first = path not in self.polled
            self.polled[path] = root
        if first:
            self.log.error("watch.subwatch_failed", root=root.path, path=path, errno=exc.errno,
                           error=exc.strerror or str(exc), answer=f"polled every {SUBWATCH_POLL_INTERVAL:g}s",
                           fix=_watch_fix(exc))
        self._wake.set()

    def _on_overflow_record(self, thread_ident: int | None, message: str) -> None:
        roots = [w.root for w in list(self.watches.values()) if w.inotify_thread_ident == thread_ident]
        if not roots:
            roots = list(self.roots.values())
        self.counts["overflows"] += 1
        self.last_overflow = time.time()
        for root in roots:
            self.log.warning("watch.overflow", root=root.path, message=message, answer="root rescan")
            self.queue.request_rescan(root.path, "overflow")

    # ------------------------------------------------------------------ reconciliation
    def request_reconcile(self, root_path: str, why: str) -> None:
        with self._lock:
            if root_path in self._reconcile_pending:
                return
            self._reconcile_pending.add(root_path)
        self._reconcile_q.put((root_path, why))

    def _reconciler_loop(self) -> None:
        while True:
            item = self._reconcile_q.get()
            if item is None:
                return
            path, why = item
            with self._lock:
                self._reconciling += 1
                self._reconcile_pending.discard(path)
            try:
                root = self.roots.get(path) or self.root_for(path) or self.polled.get(path)
                if root is not None and not self._stop.is_set():
                    self._reconcile(root, why, top=path)
            except Exception as exc:
                self.log.error("reconcile.failed", root=path, error=f"{type(exc).__name__}: {exc}")
            finally:
                with self._lock:
                    self._reconciling -= 1
                    self._idle.notify_all()

    def _reconcile(self, root: Root, why: str, top: str | None = None) -> None:
        top = top or root.path
        started = time.monotonic()
        self.log.info("reconcile.start", root=root.path, path=top, why=why)
        seen: set[tuple[int, int]] = set()
        files = queued = dirs = 0
        complete = True
        # temp-named files untouched this long are no download in progress: scan them too
        stale_after = float(self.config.watch["stale_temp_after"])

        def onerror(exc: OSError) -> None:
            nonlocal complete
            complete = False
            self.log.warning("reconcile.unreadable", path=getattr(exc, "filename", None), error=exc.strerror or str(exc))

        if os.path.isfile(top):
            walker = [(os.path.dirname(top), [], [os.path.basename(top)])]
        else:
            walker = os.walk(top, onerror=onerror)
        for dirpath, _dirs, names in walker:
            dirs += 1
            if self._stop.is_set():
                complete = False
                break
            for name in names:
                path = os.path.join(dirpath, name)
                temp = is_temp(name)
                if (temp and not stale_after) or self.excluded(path, root.path):
                    continue
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # symlinks: their targets are walked in their own root (or not followed)
                if temp and time.time() - st.st_mtime < stale_after:
                    continue  # a download in progress: its rename is the signal
                files += 1
                ident = Identity.of(st)
                seen.add(ident.inode)
                row = self.baseline.lookup(ident)
                if row is not None:
                    if self.report_cached:
                        self._log_cached(path, row)
                    continue
                if self.queue.put(Candidate(path, ident.inode, "stale_temp" if temp else "reconcile", root.path)):
                    queued += 1
        if top == root.path:
            self.dir_count = max(self.dir_count, dirs) if why != "startup" else self.dir_count + dirs
        pruned = self.baseline.prune(top, seen) if complete and os.path.isdir(top) else 0
        self.baseline.set_meta(**{f"reconcile:{root.path}": {"at": time.time(), "why": why, "files": files}})
        self.log.info("reconcile.done", root=root.path, path=top, why=why, files=files, queued=queued, dirs=dirs,
                      pruned=pruned, ms=round((time.monotonic() - started) * 1000, 1))

    def _log_cached(self, path: str, row) -> None:
        self.counts["cached"] += 1
        sev = Severity.parse(row.severity) if row.severity else None
        if row.verdict == "issues" and sev is not None and sev >= self.config.threshold:
            self.counts["over_threshold"] += 1
        if row.verdict in ("error", "incomplete"):
            self.counts[row.verdict] += 1
        self.log.info("scan.cached", path=path, verdict=row.verdict, severity=row.severity, sha256=row.sha256,
                      rule_ids=list(row.rule_ids), scanned_at=row.scanned_at, hf=hfcache.describe(path))

    # ------------------------------------------------------------------ scheduler
    def _park(self, cand: Candidate, delay: float) -> None:
        with self._lock:
            heapq.heappush(self._parked, (time.monotonic() + delay, next(self._seq), cand))

    def _scheduler_loop(self) -> None:
        while True:
            with self._lock:
                due = self._parked[0][0] if self._parked else None
            timeout = None if due is None else max(0.0, due - time.monotonic())
            item = self.queue.get(timeout)
            now = time.monotonic()
            while True:
                with self._lock:
                    if not self._parked or self._parked[0][0] > now:
                        break
                    _, _, cand = heapq.heappop(self._parked)
                    self._unparking += 1  # not idle between the pop and a submit/park
                try:
                    self._guard(self._consider, cand)
                finally:
                    with self._lock:
                        self._unparking -= 1
            if item is None:
                if self.queue._closed:
                    return
            else:
                try:
                    if isinstance(item, Rescan):
                        self.log.info("watch.rescan", root=item.root, why=item.why)
                        self.request_reconcile(item.root, item.why)
                    else:
                        self._guard(self._consider, item)
                finally:
                    self.queue.done()
            with self._idle:
                self._idle.notify_all()

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self.log.error("daemon.internal_error", where=fn.__name__, error=f"{type(exc).__name__}: {exc}")

    def _consider(self, cand: Candidate) -> None:
        waiting_on = getattr(cand, "waiting_on", None)
        if waiting_on is not None:
            with self._lock:
                if self._waiting.get(waiting_on) is cand:
                    del self._waiting[waiting_on]
        try:
            st = os.lstat(cand.path)
        except OSError:
            return
        if stat.S_ISLNK(st.st_mode):
            target = os.path.realpath(cand.path)
            troot = self.root_for(target)
            if troot is None:
                self.log.debug("scan.link_outside", path=cand.path, target=target)
                return
            try:
                tst = os.lstat(target)
            except OSError:
                return
            if not stat.S_ISREG(tst.st_mode):
                return
            row = self.baseline.lookup(Identity.of(tst))
            if row is not None:
                if hfcache.snapshot_link(cand.path):
                    self.log.info("hf.snapshot", path=cand.path, blob=target, verdict=row.verdict,
                                  severity=row.severity, sha256=row.sha256, rule_ids=list(row.rule_ids),
                                  hf=hfcache.describe(cand.path))
                return
            if hfcache.snapshot_link(cand.path) and (tst.st_dev, tst.st_ino) in self._inflight:
                self._park(cand, float(self.config.watch["settle_time"]) or 0.1)  # name it once it has a verdict
                return
            cand = Candidate(target, (tst.st_dev, tst.st_ino), cand.reason, troot.path, cand.since, cand.wall)
            st = tst
        if not stat.S_ISREG(st.st_mode):
            return
        ident = Identity.of(st)
        with self._lock:
            if ident.inode in self._inflight:
                self._dirty.add(ident.inode)
                return
        if self.baseline.lookup(ident) is not None:
            return
        if not COMPLETE_ON.get(cand.reason, False):
            state = writer_state(cand.path)
            if state == "busy":
                with self._lock:
                    if ident.inode in self._waiting:
                        return  # one candidate already waits on this writer (a burst of Modified events)
                    self._waiting[ident.inode] = cand
                    cand.waiting_on = ident.inode
                waited = time.monotonic() - cand.since
                limit = float(self.config.watch["busy_max_wait"])
                if self.once or waited >= limit:
                    # a writer that never lets go must not keep the file unscanned and unreported
                    self.log.warning("scan.deferred", path=cand.path, waited_s=round(waited, 1),
                                     why="a writer still holds the file open",
                                     answer="scanning a snapshot now" + (" (run --once does not wait)"
                                                                         if self.once else ""))
                    with self._lock:
                        self._waiting.pop(ident.inode, None)
                    self._submit(cand, ident)
                    return
                cand.attempts += 1
                delay = min(BUSY_MAX_RECHECK, self.config.watch["busy_recheck"] * (2 ** min(cand.attempts - 1, 4)),
                            max(0.05, limit - waited))
                self.log.debug("scan.wait_writer", path=cand.path, recheck_s=delay)
                self._park(cand, delay)
                return
            if state == "unknown":
                settle = float(self.config.watch["settle_time"])
                snap = (ident.size, ident.mtime_ns)
                age = time.time() - st.st_mtime
                if cand.first_stat != snap or age < settle:
                    cand.first_stat = snap
                    self._park(cand, settle)
                    return
        self._submit(cand, ident)

    def _code_rule(self, path: str, root: Root | None) -> tuple[str, str] | None:
        if not self.config.scan["report_code"] or not path.endswith(".py"):
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

    def _submit(self, cand: Candidate, ident: Identity) -> None:
        with self._lock:
            self._inflight[ident.inode] = (cand, ident)
        root = self.roots.get(cand.root) or self.root_for(cand.path)
        job = {"path": cand.path, "root": cand.root, "inode": list(ident.inode), "name": os.path.basename(cand.path),
               "kind": "model"}
        code = self._code_rule(cand.path, root)
        if code is not None:
            job.update(kind="code", code_rule=code[0], code_description=code[1],
                       code_severity=self.config.code_severity.name.lower())
        self.pool.submit(job)

    # ------------------------------------------------------------------ results
    def _on_result(self, job: dict, result: dict) -> None:
        inode = tuple(job["inode"])
        with self._lock:
            cand, ident = self._inflight.get(inode, (None, None))
        try:
            if cand is not None:
                self._handle_result(cand, ident, job, result)
        finally:
            with self._lock:
                self._inflight.pop(inode, None)
                dirty = inode in self._dirty
                self._dirty.discard(inode)
                self._idle.notify_all()
            if dirty and cand is not None and not self._stop.is_set():
                root = self.roots.get(cand.root)
                if root is not None:
                    self.offer(cand.path, "closed", root)

    def _handle_result(self, cand: Candidate, ident: Identity, job: dict, result: dict) -> None:
        status = result.get("status")
        root = self.roots.get(cand.root)
        if status == "gone":
            return
        if status == "replaced" or (status == "ok" and result.get("changed")):
            self.log.info("scan.changed", path=cand.path, why=status, answer="queued again")
            if root is not None:
                self.offer(cand.path, "created", root)
            return
        if status == "ok":
            verdict = result["verdict"]
            if result.get("identity"):
                ident = Identity(*result["identity"])
        else:
            verdict = "incomplete" if result.get("incomplete") else "error"
        sev_name = result.get("severity")
        severity = Severity.parse(sev_name) if sev_name else None
        findings = result.get("findings") or []
        rule_ids = sorted({f["rule_id"] for f in findings})
        sha = result.get("sha256")
        self.baseline.record(ident, cand.path, sha, verdict, sev_name, rule_ids)
        self.counts["scanned"] += 1
        self.counts[verdict] = self.counts.get(verdict, 0) + 1
        if verdict == "issues" and severity is not None and severity >= self.config.threshold:
            self.counts["over_threshold"] += 1
        event, level = EVENTS.get(verdict, ("scan.error", "error"))
        fields = {
            "path": cand.path, "root": cand.root, "reason": cand.reason, "verdict": verdict,
            "format": result.get("format"), "size": ident.size, "sha256": sha, "severity": sev_name,
            "rule_ids": rule_ids, "inode": list(ident.inode), "scan_ms": result.get("scan_ms"),
            "latency_ms": round((time.monotonic() - cand.since) * 1000, 2),
        }
        rule = temp_rule(os.path.basename(cand.path))
        if rule is not None:
            fields["temp"] = {"writer": rule.name, "status": "stale" if cand.reason == "stale_temp" else "temp"}
        if findings:
            fields["findings"] = findings
        if result.get("errors"):
            fields["errors"] = result["errors"]
        if status != "ok":
            fields["error"] = result.get("error")
        hf = hfcache.describe(cand.path) if "--" in cand.path else None
        if hf:
            fields["hf"] = hf
        if sha and verdict == "issues":
            again = [r.path for r in self.baseline.same_content(sha, ident) if r.verdict == "issues"]
            if again:
                fields["seen_before"] = again[:3]
        getattr(self.log, level)(event, **fields)
        outcome = Outcome(cand.path, verdict, severity, sha, ident.size, ident.inode, tuple(rule_ids),
                          tuple(findings), hf)
        try:
            self.action.handle(outcome)
        except Exception as exc:
            self.log.error("action.failed", path=cand.path, action=getattr(self.action, "name", "?"),
                           error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ maintenance
    def _maintenance_loop(self) -> None:
        cfg = self.config
        now = time.monotonic()
        next_reconcile = now + cfg.watch["reconcile_interval"] if cfg.watch["reconcile_interval"] else None
        next_retry = now + cfg.watch["root_retry_interval"]
        next_poll = now + SUBWATCH_POLL_INTERVAL
        next_health = now
        wd_interval = self.notifier.watchdog_interval
        last_status = None
        while not self._stop.is_set():
            now = time.monotonic()
            if self._reload.is_set():
                self._reload.clear()
                self._do_reload()
                cfg = self.config
            if self.missing and now >= next_retry:
                self._retry_missing()
                next_retry = now + cfg.watch["root_retry_interval"]
            if self.polled and now >= next_poll:
                for path in list(self.polled):
                    self.request_reconcile(path, "subwatch_poll")
                next_poll = now + SUBWATCH_POLL_INTERVAL
            if next_reconcile is not None and now >= next_reconcile:
                for path in list(self.roots):
                    self.request_reconcile(path, "periodic")
                next_reconcile = now + cfg.watch["reconcile_interval"]
            if now >= next_health:
                healthy = self._health()
                if healthy and wd_interval:
                    self.notifier.watchdog()
                text = self.status_text()
                if text != last_status:
                    self.notifier.status(text)
                    last_status = text
                next_health = now + min(HEALTH_INTERVAL, wd_interval or HEALTH_INTERVAL)
            deadlines = [next_health]
            if self.missing:
                deadlines.append(next_retry)
            if self.polled:
                deadlines.append(next_poll)
            if next_reconcile is not None:
                deadlines.append(next_reconcile)
            self._wake.wait(max(0.01, min(deadlines) - time.monotonic()))
            self._wake.clear()

    def _health(self) -> bool:
        ok = True
        for path, w in list(self.watches.items()):
            if not w.alive():
                ok = False
                root = w.root
                self.log.error("watch.dead", root=path, answer="re-watch and reconcile")
                self.watches.pop(path, None)
                w.stop()
                with self._lock:
                    self.roots.pop(path, None)
                if self._add_root(root):
                    self.request_reconcile(root.path, "watch_restarted")
        if self.pool is not None and not self.pool.healthy():
            ok = False
            self.log.error("workers.unhealthy")
        return ok

    def status_text(self) -> str:
        lo = time.strftime("%H:%M:%S", time.localtime(self.last_overflow)) if self.last_overflow else "never"
        return (f"{len(self.roots)} roots ({len(self.missing)} missing), queue {len(self.queue)}, "
                f"scanned {self.counts['scanned']}, findings {self.counts['issues']}, last overflow {lo}")

    def _do_reload(self) -> None:
        from modelscand import config as cfgmod

        self.notifier.reloading()
        try:
            new = cfgmod.load(self.config.source)
            new = new.with_overrides(roots=getattr(self, "root_overrides", None), state_dir=self.config.state_dir,
                                     mode=self.config.mode)
            new.roots()
            action = make_action(new.mode, new.threshold)
        except Exception as exc:
            self.log.error("daemon.reload_failed", error=str(exc), kept="previous config")
            self.notifier.ready(self.status_text())
            return
        old_roots = {r.path: r for r in self.config.roots()}
        self.config, self.action = new, action
        mlog.configure(new.data["log"]["format"], new.data["log"]["level"])
        new_roots = {r.path: r for r in new.roots()}
        for path in set(old_roots) - set(new_roots):
            w = self.watches.pop(path, None)
            if w:
                w.stop()
            with self._lock:
                self.roots.pop(path, None)
                self.missing.pop(old_roots[path].configured, None)
        for path in set(new_roots) - set(old_roots):
            if self._add_root(new_roots[path]):
                self.request_reconcile(path, "reload")
        self.log.info("daemon.reloaded", roots=sorted(self.roots), missing=sorted(self.missing),
                      note="workers, limits and state dir apply at the next restart")
        self.notifier.ready(self.status_text())

    def _check_limits(self) -> None:
        def read(name):
            try:
                with open(f"/proc/sys/fs/inotify/{name}") as f:
                    return int(f.read().strip())
            except (OSError, ValueError):
                return None

        watches, instances = read("max_user_watches"), read("max_user_instances")
        needed = self.dir_count + 64
        if watches is not None and self.watch_enabled and needed > watches * 0.8:
            want = max(524288, 2 * needed)
            self.log.error("limits.inotify_watches", max_user_watches=watches, directories=self.dir_count,
                           fix=f"echo fs.inotify.max_user_watches={want} | sudo tee /etc/sysctl.d/60-modelscand.conf "
                               f"&& sudo sysctl --system")
        if instances is not None and self.watch_enabled and len(self.roots) + 16 > instances:
            want = max(1024, 2 * (len(self.roots) + 16))
            self.log.error("limits.inotify_instances", max_user_instances=instances, roots=len(self.roots),
                           fix=f"echo fs.inotify.max_user_instances={want} | sudo tee -a "
                               f"/etc/sysctl.d/60-modelscand.conf && sudo sysctl --system")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need_fds = 256 + 8 * self.config.scan["workers"] + 4 * len(self.roots)
        if soft != resource.RLIM_INFINITY and soft < need_fds:
            self.log.error("limits.nofile", soft=soft, hard=hard, needed=need_fds,
                           fix="LimitNOFILE=65536 in modelscand.service (or `ulimit -n 65536` before a manual run)")
        self.log.debug("limits.checked", max_user_watches=watches, max_user_instances=instances, nofile_soft=soft,
                       directories=self.dir_count)


def _watch_fix(exc: OSError) -> str | None:
    if exc.errno == errno.ENOSPC:
        return "raise fs.inotify.max_user_watches: echo fs.inotify.max_user_watches=524288 | sudo tee " \
               "/etc/sysctl.d/60-modelscand.conf && sudo sysctl --system"
    if exc.errno == errno.EMFILE:
        return "raise fs.inotify.max_user_instances: echo fs.inotify.max_user_instances=1024 | sudo tee -a " \
               "/etc/sysctl.d/60-modelscand.conf && sudo sysctl --system"
    if exc.errno == errno.EACCES:
        return "run as a user that can read the directory, or add it to ReadWritePaths/ReadOnlyPaths"
    return None
