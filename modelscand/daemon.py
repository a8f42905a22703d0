"""The daemon: wires the stages together and runs their threads. It does no job itself.

Stages (one module each, each testable alone):

- `roots.Roots`: active, missing and polled roots, one `watcher.RootWatch` per root;
- `intake.Intake`: watchdog events -> candidates in the bounded `queue.WorkQueue`;
- `scheduler.Scheduler`: candidate -> job (baseline check, writer wait, symlinks, one job
  per inode) -> `workers.WorkerPool`;
- `reconcile.Reconciler`: walks against the baseline (start-up, periodic, overflow, ...);
- `results.Results`: a worker's answer -> verdict event, baseline row, `Action`;
- `maintenance.Maintenance`: the timer (missing roots, polling, health, sd_notify, SIGHUP).

Threads: per root watchdog's (inotify reader, emitter, dispatcher), the scheduler, the
reconciler, the maintenance timer and the worker pool's slot threads.

Start-up order: watches first, then the reconciliation walk, then READY=1 - so a file
written during the walk is either seen by the walk or by the watch.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import threading
import time

from modelscan_core._version import __version__ as CORE_VERSION

from modelscand import logging as mlog
from modelscand.actions import make_action
from modelscand.activity import Activity
from modelscand.config import Config, Root
from modelscand.intake import Intake
from modelscand.maintenance import Maintenance
from modelscand.notify import Notifier
from modelscand.queue import WorkQueue
from modelscand.reconcile import Reconciler
from modelscand.results import Results, new_counts
from modelscand.roots import Roots
from modelscand.scheduler import Scheduler, writer_state  # noqa: F401  (writer_state: public helper)
from modelscand.state import Baseline
from modelscand.watcher import QuietOverflow, RootWatch
from modelscand.workers import DEFAULT_SCAN_FUNCTION, WorkerPool


def fingerprint(config: Config) -> str:
    settings = config.scanner_settings()
    blob = json.dumps({"core": CORE_VERSION, "settings": settings.data, "code": [config.scan["report_code"],
                       config.scan["code_severity"]]}, sort_keys=True, default=str)
    return f"{CORE_VERSION}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def build_action(config: Config):
    """detect: log; quarantine: move (its `start()` recovers interrupted moves before use)."""
    return make_action(config.mode, config.threshold, config, fingerprint(config))


class Daemon:
    def __init__(self, config: Config, *, watch: bool = True, report_cached: bool = False,
                 notifier: Notifier | None = None, scan_function: str = DEFAULT_SCAN_FUNCTION):
        self.config = config
        self.watch_enabled = watch
        self.report_cached = report_cached
        self.notifier = notifier or Notifier()
        self.scan_function = scan_function
        self.root_overrides: list[str] | None = None  # --root: kept across a SIGHUP reload
        self.log = mlog.get()
        self.action = build_action(config)
        self.baseline: Baseline | None = None
        self.pool: WorkerPool | None = None
        self.handler_hook = None  # tests: called for each watchdog event before handling
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.once = False  # run --once: nothing waits for writers
        self.started_at = time.time()
        self.counts = new_counts()
        self.activity = Activity()
        self.queue = WorkQueue(config.watch["queue_size"])
        cfg = lambda: self.config  # noqa: E731 - every stage sees the config a reload installed
        self.maintenance = Maintenance(self)
        self.roots = Roots(cfg, self.log, watch_enabled=watch, make_watch=self._make_watch)
        self.intake = Intake(self.roots, self.queue, self.log, self.counts, wake=self.maintenance.wake)
        self.results = Results(cfg, lambda: self.baseline, lambda: self.action, self.log, self.counts,
                               reoffer=lambda path, why, root: self._reoffer(path, why, root),
                               watched=lambda root: self.roots.get(root) is not None)
        self.reconciler = Reconciler(cfg, self.roots, self.queue, lambda: self.baseline, self.log, self.activity,
                                     stopping=self.stopping, settled=self._settled,
                                     on_cached=self.results.log_cached if report_cached else None,
                                     on_special=self.intake.not_regular, counts=self.counts)
        self.scheduler = Scheduler(cfg, self.roots, self.queue, lambda: self.baseline, lambda: self.pool, self.log,
                                   self.activity, request_reconcile=self.reconciler.request, once=lambda: self.once,
                                   on_reply=self.results.handle, reoffer=self._reoffer, settled=self._settled)
        self._threads: list[threading.Thread] = []
        self._quiet = QuietOverflow()

    # ------------------------------------------------------------------ wiring
    def _make_watch(self, root: Root) -> RootWatch:
        return RootWatch(root, on_candidate=self.offer, on_handler_error=self.intake.on_handler_error,
                         on_subwatch_failed=self.intake.on_subwatch_failed, on_root_gone=self._on_root_gone,
                         on_overflow=lambda r: self.intake.on_overflow([r], "inotify queue overflowed"),
                         hook=self._hook)

    def _settled(self, row) -> bool:
        """Is a cached verdict final for a file still in place? Not when the action (the one
        a reload installed) would act on it: quarantine mode moves a cached finding that a
        kill, a failed move or a detect-mode scan sharing the state dir left in place."""
        acts_on = getattr(self.action, "acts_on", None)
        return acts_on is None or not acts_on(row)

    def _hook(self, watch, event) -> None:
        if self.handler_hook is not None:
            self.handler_hook(watch, event)

    def offer(self, path: str, reason: str, root: Root, *, block: bool = False) -> bool:
        return self.intake.offer(path, reason, root, block=block)

    def _reoffer(self, path: str, reason: str, root_path: str) -> None:
        """Offer `path` again (a rename or a change seen while it was scanned)."""
        if self.stopping.is_set():
            return
        root = self.roots.get(root_path) or self.roots.root_for(path)
        if root is not None:
            self.offer(path, reason, root)

    def _on_root_gone(self, root: Root, why: str = "deleted or moved away") -> None:
        if self.roots.lost(root, why):
            self.publish_roots()
            self.maintenance.retry_soon()

    def publish_roots(self) -> None:
        """What `modelscand status` shows: the roots as they are now (after a reload, a loss)."""
        if self.baseline is not None:
            self.baseline.set_meta(roots=self.roots.paths(), missing=self.roots.missing_paths())

    @property
    def watches(self):
        return self.roots.watches

    @property
    def last_overflow(self) -> float | None:
        return self.intake.last_overflow

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cfg = self.config
        self.baseline = Baseline(cfg.state_dir, fingerprint(cfg), log=self.log)
        self.baseline.set_meta(pid=os.getpid(), started_at=self.started_at, ready_at=None, mode=cfg.mode,
                               config=cfg.source, stopped_at=None)
        if hasattr(self.action, "start"):
            self.action.start()  # quarantine: finish moves a kill interrupted, before anything is scanned
        self.pool = WorkerPool(cfg.scan["workers"], timeout=float(cfg.scan["timeout"]),
                               hash_timeout=float(cfg.scan["hash_timeout"]),
                               memory_limit_mb=cfg.scan["memory_limit_mb"],
                               settings_file=os.path.expanduser(cfg.scan["settings_file"]) or None,
                               scan_function=self.scan_function)
        self.pool.start()
        self._spawn(self.scheduler.loop, "modelscand-scheduler")
        self._spawn(self.reconciler.loop, "modelscand-reconciler")
        self.log.info("daemon.start", version=CORE_VERSION, mode=cfg.mode, state_dir=cfg.state_dir,
                      config=cfg.source, workers=cfg.scan["workers"], pid=os.getpid(), watch=self.watch_enabled)
        if self.watch_enabled:
            self._quiet.install()
        roots = cfg.roots()
        if not roots:
            self.log.warning("watch.no_roots", hint="add [watch] roots or enable conventions")
        for root in roots:
            self.roots.add(root)
        # the start-up reconciliation: synchronous, before READY
        for path in self.roots.paths():
            root = self.roots.get(path)
            if root is not None:
                self.reconciler.walk(root, "startup")
        self.maintenance.check_limits()
        self.ready.set()
        self.baseline.set_meta(ready_at=time.time(), roots=self.roots.paths(), missing=self.roots.missing_paths())
        self.log.info("daemon.ready", roots=self.roots.paths(), missing=self.roots.missing_paths(),
                      queued=len(self.queue), dirs=self.reconciler.dir_count)
        self.notifier.ready(self.maintenance.status_text())
        if self.watch_enabled:
            self._spawn(self.maintenance.loop, "modelscand-maintenance")

    def _spawn(self, fn, name) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def run(self) -> int:
        """Foreground service: signals -> stop/reload; returns the exit code."""
        # The kernel may deliver a signal to any of our threads; Python runs its handler only
        # when the main thread next runs bytecode. Waiting on an Event, the main thread would
        # sleep through a SIGTERM (or SIGHUP) for an hour: it waits on the wakeup fd instead,
        # which the C-level handler writes whichever thread the signal hit.
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())
        try:
            self.start()
            while not self.stopping.is_set():
                select.select([wake_r], [], [], 3600)  # handlers run as this returns
                try:
                    wake_r.recv(4096)
                except BlockingIOError:
                    pass
            self.shutdown()
        finally:
            signal.set_wakeup_fd(old_fd)
            wake_r.close()
            wake_w.close()
        return 0

    def run_once(self, max_wait: float | None = None) -> int:
        """Walk, drain, report, exit: 1 findings at/above threshold, 2 scan errors or something not
        scanned (a directory the walk could not read, a model-named FIFO or device), else 0."""
        self.once = True
        self.start()
        self.wait_idle(timeout=max_wait)
        deferred = self.scheduler.parked_paths()
        for path in deferred:
            self.log.warning("scan.deferred", path=path, why="a writer still holds the file open")
        self.shutdown()
        if self.counts["over_threshold"]:
            return 1
        if self.counts["error"] or self.counts["incomplete"] or self.counts["unscanned"] or deferred:
            return 2
        return 0

    def request_stop(self) -> None:
        self.stopping.set()
        self.maintenance.wake()

    def request_reload(self) -> None:
        self.maintenance.request_reload()

    def shutdown(self) -> None:
        self.notifier.stopping()
        self.log.info("daemon.stopping", queued=len(self.queue), in_flight=self.scheduler.in_flight())
        self.stopping.set()
        self.maintenance.wake()
        self.roots.stop_all()
        self._quiet.uninstall()
        self.reconciler.close()
        drained = self.wait_idle(timeout=float(self.config.data["daemon"]["drain_timeout"]), include_parked=False)
        self.queue.close()
        if self.pool is not None:
            self.pool.stop()
        if hasattr(self.action, "stop"):
            self.action.stop()
        for t in self._threads:
            t.join(5)
        if self.baseline is not None:
            self.baseline.set_meta(stopped_at=time.time(), counts=self.counts, last_overflow=self.last_overflow)
            self.baseline.close()
        self.log.info("daemon.stop", drained=drained, **self.counts)
        self.notifier.close()

    def idle(self, include_parked: bool = True) -> bool:
        return (self.queue.empty() and not self.scheduler.busy(include_parked) and not self.reconciler.busy()
                and (self.pool is None or self.pool.pending == 0))

    def wait_idle(self, timeout: float | None = None, include_parked: bool = True) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.idle(include_parked):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.activity.wait(0.05)
        return True

    def status_text(self) -> str:
        return self.maintenance.status_text()
