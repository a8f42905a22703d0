"""Events in: what the watches report becomes candidates in the bounded queue.

Everything here runs on watchdog's dispatcher threads (or a walk's thread) and must never
block, raise or grow memory without bound: `offer` classifies the path (temp name,
excluded), `lstat`s it and offers it to the queue. A full queue degrades to a rescan of the
root; a handler error, a failed sub-watch and an inotify overflow are logged and answered
with a walk, never swallowed.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Callable

from modelscand.config import Root
from modelscand.queue import Candidate, WorkQueue
from modelscand.roots import Roots, watch_fix
from modelscand.writers import is_temp, looks_like_model

SUBWATCH_POLL_INTERVAL = 30.0


class Intake:
    def __init__(self, roots: Roots, queue: WorkQueue, log, counts: dict, *, wake: Callable[[], None]):
        self.roots = roots
        self.queue = queue
        self.log = log
        self.counts = counts
        self._wake = wake  # the maintenance timer: a new polled directory changes its deadlines
        self.last_overflow: float | None = None
        self._warned: set[tuple[int, int]] = set()

    def offer(self, path: str, reason: str, root: Root, *, block: bool = False) -> bool:
        """Classify, lstat, enqueue. Never blocks unless `block` (walks wait for room)."""
        if is_temp(os.path.basename(path)) or self.roots.excluded(path, root.path):
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
            self.not_regular(path, st)
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

    def not_regular(self, path: str, st: os.stat_result) -> None:
        """A FIFO, socket or device named like a model: a loader would block on it or read
        something that is no file; say so once per inode (a directory is not news)."""
        if stat.S_ISDIR(st.st_mode) or not looks_like_model(os.path.basename(path)):
            return
        key = (st.st_dev, st.st_ino)
        if key in self._warned:
            return
        if len(self._warned) > 10000:
            self._warned.clear()
        self._warned.add(key)
        self.counts["unscanned"] += 1
        kind = ("fifo" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else
                "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "other")
        self.log.warning("scan.not_regular", path=path, kind=kind, answer="not scanned: not a regular file")

    def on_handler_error(self, root: Root, event, exc: BaseException) -> None:
        self.counts["handler_errors"] += 1
        self.log.error("watch.handler_error", root=root.path, event_type=event.event_type,
                       path=os.fsdecode(getattr(event, "dest_path", "") or event.src_path),
                       error=f"{type(exc).__name__}: {exc}", answer="root rescan")
        self.queue.request_rescan(root.path, "handler_error")

    def on_subwatch_failed(self, root: Root, path: str, exc: OSError) -> None:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            # gone before its watch was added (HF's tmpXXXX download dirs): nothing to watch or poll
            self.log.debug("watch.subwatch_failed", root=root.path, path=path, errno=exc.errno,
                           error=exc.strerror or str(exc), answer="vanished; nothing to watch")
            return
        if self.roots.poll(path, root):
            self.log.error("watch.subwatch_failed", root=root.path, path=path, errno=exc.errno,
                           error=exc.strerror or str(exc), answer=f"polled every {SUBWATCH_POLL_INTERVAL:g}s",
                           fix=watch_fix(exc))
        self._wake()

    def on_overflow(self, roots: list[Root], message: str) -> None:
        self.counts["overflows"] += 1
        self.last_overflow = time.time()
        for root in roots:
            self.log.warning("watch.overflow", root=root.path, message=message, answer="root rescan")
            self.queue.request_rescan(root.path, "overflow")
