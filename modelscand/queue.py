"""The bounded, de-duplicating queue between the watcher and the scheduler.

Handlers run on watchdog's dispatcher thread and must never block, raise or grow memory
without bound (watchdog's own queue already is unbounded). So they only `offer()`:

- an entry is keyed by inode (``(dev, ino)``; a symlink by its path): a burst of Created,
  Modified and Closed events for one file is one entry, whose reason is upgraded to the
  strongest seen (a rename beats a close beats a create);
- when the queue is full the candidate is dropped and its root is marked "rescan needed";
  the scheduler answers that marker with a reconciliation walk of the root, which finds
  the dropped file through the baseline. Work is degraded to a walk, never lost.

Walks use `put()` which blocks instead (back-pressure, since they can simply wait).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

_RANK = {"rescan": 0, "reconcile": 1, "stale_temp": 1, "created": 2, "closed": 3, "renamed": 4}


@dataclass
class Candidate:
    path: str
    key: tuple
    reason: str
    root: str
    since: float = field(default_factory=time.monotonic)  # when the event was handled
    wall: float = field(default_factory=time.time)
    attempts: int = 0
    first_stat: tuple | None = None  # (size, mtime) at the last look where no lease could be taken
    seen: tuple | None = None  # (size, mtime, ctime) at the last look...
    changed_at: float = 0.0  # ...and when it last changed, on the monotonic clock
    via: str | None = None  # the link (or path through a linked directory) the file was reached by
    outside: bool = False  # reached by a link whose target is outside every root
    waiting_on: tuple | None = None  # the inode whose writer this candidate waits for
    quiet_on: tuple | None = None  # the inode this candidate is parked on until it is quiet


@dataclass(frozen=True)
class Rescan:
    root: str
    why: str


class WorkQueue:
    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: OrderedDict[tuple, Candidate] = OrderedDict()
        self._rescans: OrderedDict[str, Rescan] = OrderedDict()
        self._cond = threading.Condition()
        self.dropped = 0
        self._in_full = False
        self._closed = False
        self._woken = 0
        self.in_hand = 0  # taken by get(), not yet done(): a run --once must not stop in between

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def offer(self, cand: Candidate) -> bool:
        """Non-blocking: False (and the root marked for rescan) if the queue is full."""
        with self._cond:
            if self._merge(cand):
                return True
            if len(self._items) >= self.maxsize:
                self.dropped += 1
                if not self._in_full:
                    self._in_full = True
                self._rescans.setdefault(cand.root, Rescan(cand.root, "queue_full"))
                self._cond.notify()
                return False
            self._items[cand.key] = cand
            self._cond.notify()
            return True

    def put(self, cand: Candidate, timeout: float | None = None) -> bool:
        """Blocking put for walks: waits for room instead of dropping."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._merge(cand):
                return True
            while len(self._items) >= self.maxsize and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            if self._closed:
                return False
            self._items[cand.key] = cand
            self._cond.notify_all()
            return True

    def _merge(self, cand: Candidate) -> bool:
        old = self._items.get(cand.key)
        if old is None:
            return False
        if _RANK.get(cand.reason, 0) > _RANK.get(old.reason, 0):
            old.reason = cand.reason
        old.path = cand.path
        return True

    def request_rescan(self, root: str, why: str) -> None:
        with self._cond:
            self._rescans.setdefault(root, Rescan(root, why))
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Candidate | Rescan | None:
        """Next rescan marker or candidate; None on timeout or close."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            woken = self._woken
            while not self._items and not self._rescans and not self._closed and self._woken == woken:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            if self._rescans:
                _, marker = self._rescans.popitem(last=False)
                self.in_hand += 1
                return marker
            if self._items:
                _, cand = self._items.popitem(last=False)
                self.in_hand += 1
                if len(self._items) < self.maxsize // 2:
                    self._in_full = False
                self._cond.notify_all()
                return cand
            return None

    def wake(self) -> None:
        """Make a waiting get() return None now (the consumer has new parked work to time)."""
        with self._cond:
            self._woken += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def done(self) -> None:
        """The consumer finished an item from get(): until then the queue is not empty()."""
        with self._cond:
            self.in_hand -= 1
            self._cond.notify_all()

    def empty(self) -> bool:
        with self._cond:
            return not self._items and not self._rescans and not self.in_hand
