"""One condition that every stage of the daemon notifies when its share of the work changes.

`Daemon.wait_idle()` (run --once, the drain on SIGTERM, tests) sleeps on it instead of
polling each stage: intake, scheduler, reconciler and results each say "something changed"
and the waiter re-asks every stage whether it is idle.
"""

from __future__ import annotations

import threading


class Activity:
    def __init__(self) -> None:
        self._cond = threading.Condition()

    def changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)
