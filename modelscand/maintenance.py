"""Maintenance: the one timer thread, and what it does between events.

Missing-root retries, walks of polled sub-directories, periodic reconciliation, the health
check (sd_notify WATCHDOG=1 only while watches and workers are alive), STATUS= and SIGHUP
reloads. It sleeps on an Event until the next deadline: with every root present nothing
wakes up more than once a minute (no polling loop).
"""

from __future__ import annotations

import resource
import threading
import time
from typing import TYPE_CHECKING

from modelscand import logging as mlog
from modelscand.intake import SUBWATCH_POLL_INTERVAL

if TYPE_CHECKING:
    from modelscand.daemon import Daemon

HEALTH_INTERVAL = 60.0


class Maintenance:
    def __init__(self, daemon: "Daemon"):
        self.d = daemon
        self.wake_event = threading.Event()
        self._retry_now = False
        self.reload_event = threading.Event()

    def wake(self) -> None:
        self.wake_event.set()

    def retry_soon(self) -> None:
        """A root was lost: look for its replacement at once, not a retry interval later."""
        self._retry_now = True
        self.wake_event.set()

    def request_reload(self) -> None:
        self.reload_event.set()
        self.wake_event.set()

    def loop(self) -> None:
        d = self.d
        cfg = d.config
        now = time.monotonic()
        next_reconcile = now + cfg.watch["reconcile_interval"] if cfg.watch["reconcile_interval"] else None
        next_retry = now + cfg.watch["root_retry_interval"]
        next_root_check = next_retry
        next_state_retry = now
        next_poll = now + SUBWATCH_POLL_INTERVAL
        next_health = now
        wd_interval = d.notifier.watchdog_interval
        last_status = None
        while not d.stopping.is_set():
            now = time.monotonic()
            if self.reload_event.is_set():
                self.reload_event.clear()
                self.reload()
                cfg = d.config
            if now >= next_root_check:  # a root renamed away and recreated keeps no event to tell
                for root in d.roots.replaced():
                    d._on_root_gone(root, "its directory is another inode now")
                next_root_check = now + cfg.watch["root_retry_interval"]
            if d.baseline is not None and d.baseline.degraded and now >= next_state_retry:
                d.baseline.retry()
                next_state_retry = now + cfg.watch["root_retry_interval"]
            if self._retry_now:
                self._retry_now = False
                next_retry = now
            if d.roots.missing and now >= next_retry:
                appeared = d.roots.retry_missing()
                for root in appeared:
                    d.reconciler.request(root.path, "root_appeared")
                if appeared:
                    d.publish_roots()
                next_retry = now + cfg.watch["root_retry_interval"]
            if d.roots.polled and now >= next_poll:
                for path in list(d.roots.polled):
                    d.reconciler.request(path, "subwatch_poll")
                next_poll = now + SUBWATCH_POLL_INTERVAL
            if next_reconcile is not None and now >= next_reconcile:
                for path in d.roots.paths():
                    d.reconciler.request(path, "periodic")
                next_reconcile = now + cfg.watch["reconcile_interval"]
            if now >= next_health:
                healthy = self.health()
                if healthy and wd_interval:
                    d.notifier.watchdog()
                text = self.status_text()
                if text != last_status:
                    d.notifier.status(text)
                    last_status = text
                next_health = now + min(HEALTH_INTERVAL, wd_interval or HEALTH_INTERVAL)
            deadlines = [next_health, next_root_check]
            if d.baseline is not None and d.baseline.degraded:
                deadlines.append(next_state_retry)
            if d.roots.missing:
                deadlines.append(next_retry)
            if d.roots.polled:
                deadlines.append(next_poll)
            if next_reconcile is not None:
                deadlines.append(next_reconcile)
            self.wake_event.wait(max(0.01, min(deadlines) - time.monotonic()))
            self.wake_event.clear()

    def health(self) -> bool:
        d = self.d
        ok, restarted = d.roots.restart_dead_watches()
        for root in restarted:
            d.reconciler.request(root.path, "watch_restarted")
        if d.pool is not None and not d.pool.healthy():
            ok = False
            d.log.error("workers.unhealthy")
        return ok

    def status_text(self) -> str:
        d = self.d
        last = d.intake.last_overflow
        lo = time.strftime("%H:%M:%S", time.localtime(last)) if last else "never"
        return (f"{len(d.roots.active)} roots ({len(d.roots.missing)} missing), queue {len(d.queue)}, "
                f"scanned {d.counts['scanned']}, findings {d.counts['issues']}, last overflow {lo}")

    def reload(self) -> None:
        from modelscand import config as cfgmod
        from modelscand.daemon import build_action

        d = self.d
        d.notifier.reloading()
        try:
            new = cfgmod.load(d.config.source)
            new = new.with_overrides(roots=d.root_overrides, state_dir=d.config.state_dir, mode=d.config.mode)
            new.roots()
            action = build_action(new)
            if hasattr(action, "start"):
                action.start()
        except Exception as exc:
            d.log.error("daemon.reload_failed", error=str(exc), kept="previous config")
            d.notifier.ready(self.status_text())
            return
        old_roots = {r.path: r for r in d.config.roots()}
        old_action, (d.config, d.action) = d.action, (new, action)
        if hasattr(old_action, "stop"):
            old_action.stop()
        mlog.configure(new.data["log"]["format"], new.data["log"]["level"])
        new_roots = {r.path: r for r in new.roots()}
        for path in set(old_roots) - set(new_roots):
            d.roots.remove(old_roots[path])
        for path in set(new_roots) - set(old_roots):
            if d.roots.add(new_roots[path]):
                d.reconciler.request(path, "reload")
        d.publish_roots()
        d.log.info("daemon.reloaded", roots=d.roots.paths(), missing=d.roots.missing_paths(),
                   note="workers, limits and state dir apply at the next restart")
        d.notifier.ready(self.status_text())

    def check_limits(self) -> None:
        d = self.d

        def read(name):
            try:
                with open(f"/proc/sys/fs/inotify/{name}") as f:
                    return int(f.read().strip())
            except (OSError, ValueError):
                return None

        dirs = d.reconciler.dir_count
        watches, instances = read("max_user_watches"), read("max_user_instances")
        needed = dirs + 64
        if watches is not None and d.watch_enabled and needed > watches * 0.8:
            want = max(524288, 2 * needed)
            d.log.error("limits.inotify_watches", max_user_watches=watches, directories=dirs,
                        fix=f"echo fs.inotify.max_user_watches={want} | sudo tee /etc/sysctl.d/60-modelscand.conf "
                            f"&& sudo sysctl --system")
        nroots = len(d.roots.active)
        if instances is not None and d.watch_enabled and nroots + 16 > instances:
            want = max(1024, 2 * (nroots + 16))
            d.log.error("limits.inotify_instances", max_user_instances=instances, roots=nroots,
                        fix=f"echo fs.inotify.max_user_instances={want} | sudo tee -a "
                            f"/etc/sysctl.d/60-modelscand.conf && sudo sysctl --system")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need_fds = 256 + 8 * d.config.scan["workers"] + 4 * nroots
        if soft != resource.RLIM_INFINITY and soft < need_fds:
            d.log.error("limits.nofile", soft=soft, hard=hard, needed=need_fds,
                        fix="LimitNOFILE=65536 in modelscand.service (or `ulimit -n 65536` before a manual run)")
        d.log.debug("limits.checked", max_user_watches=watches, max_user_instances=instances, nofile_soft=soft,
                    directories=dirs)
