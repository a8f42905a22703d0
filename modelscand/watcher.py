"""watchdog, used so that it cannot lose a file without us knowing.

What watchdog 7.1 does on Linux, and what this module does about it:

- one missing root makes ``observer.start()`` raise for all roots -> every root gets its
  own observer (its own inotify instance and dispatcher thread), scheduled on its own;
  a root that fails is reported and retried by the daemon;
- a symlinked root sees no new subdirectories -> roots are already ``realpath``'d;
- an ``event_filter`` without ``FileCreatedEvent`` loses files in new directories -> no
  filter: Created, Modified, Closed and Moved all reach the handler, which ignores the rest;
- the handler raising kills the dispatcher thread silently -> `dispatch` never raises;
  an exception is logged (``watch.handler_error``) and answered with a rescan of the root;
- a subdirectory whose watch fails (ENOSPC, EACCES) is skipped without a log line -> our
  watch group logs ``watch.subwatch_failed`` and hands the directory to the poller;
- queue overflow is only *logged* by ``watchdog.observers.inotify_c`` -> the watch group's
  ``on_queue_overflow`` reports it for its root (which is walked, rate-limited), and
  `QuietOverflow` drops watchdog's own two warning lines;
- the daemon's own reads would produce Opened/ClosedNoWrite events -> the kernel mask
  (`EVENT_MASK`) does not ask for them at all, so walks and scans cannot flood the queue;
- the root renamed away (IN_MOVE_SELF) is ignored by watchdog -> reported as a lost root.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver
from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyConstants, InotifyFD

from modelscand import logging as mlog

OVERFLOW_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")

#: event_type -> the candidate reason it produces (others are ignored)
# "modified": an in-place rewrite through an fd that is never closed produces no Closed event;
# the scheduler waits for such a writer at most watch.busy_max_wait seconds
REASONS = {"moved": "renamed", "closed": "closed", "created": "created", "modified": "modified"}


def _callback_failed(what: str, path: bytes, exc: Exception) -> None:
    """A report from watchdog's reader thread that did not reach the daemon: the reader must
    live on, and the operator must know that a walk or a root's re-watch may not follow."""
    log().error("watch.report_failed", report=what, root=os.fsdecode(path),
                     error=f"{type(exc).__name__}: {exc}")


class _LoudWatchGroup(InotifyWatchGroup):
    """watchdog's watch group, except that a failed sub-watch is reported, not swallowed,
    and the root moving away (IN_MOVE_SELF, which watchdog ignores) is reported too."""

    report_failure: Callable[[bytes, OSError], None] = staticmethod(lambda path, exc: None)
    report_root_moved: Callable[[], None] = staticmethod(lambda: None)
    report_overflow: Callable[[], None] = staticmethod(lambda: None)

    def on_queue_overflow(self) -> None:
        try:
            type(self).report_overflow()
        except Exception as exc:  # noqa: BLE001 - never into watchdog's reader thread; loud: a walk may be lost
            _callback_failed("overflow", self.path, exc)
        super().on_queue_overflow()  # watchdog re-adds the watches (no events with our mask)

    def on_event(self, event) -> None:
        if event.is_move_self and self._active_callbacks_by_watch.get(event.wd) == self.path:
            try:
                type(self).report_root_moved()
            except Exception as exc:  # noqa: BLE001 - never into watchdog's reader thread; loud: a root may be lost
                _callback_failed("root_moved", self.path, exc)
        super().on_event(event)

    def _add_callback(self, path: bytes) -> None:
        if path in self._active_callbacks_by_path and path != self.path:
            return  # already watched (a directory reported twice): watchdog would warn and re-add
        try:
            wd = self._inotify_fd.add_callback(path, self.event_mask, self._callback, self._id)
        except OSError as exc:
            if path == self.path:
                raise
            try:
                type(self).report_failure(path, exc)
            except Exception as failed:  # noqa: BLE001 - never into watchdog; loud: the directory is unwatched
                _callback_failed("subwatch_failed", path, failed)
            return
        self._active_callbacks_by_path[path] = wd
        self._active_callbacks_by_watch[wd] = path


#: What the kernel queues for us, and nothing more. watchdog's default mask also asks for
#: IN_OPEN, IN_CLOSE_NOWRITE, IN_ATTRIB and IN_DELETE: then every directory the daemon's own
#: walks (and watchdog's watch rebuild) open, and every file a worker reads, queue events
#: on this very instance - on a cache of a few thousand directories that alone overflows
#: the kernel queue (fs.inotify.max_queued_events), and the walk that answers the overflow
#: overflows it again. An `event_filter` would narrow the mask too, but watchdog then drops
#: the events it does not list; the mask is set here instead.
EVENT_MASK = (InotifyConstants.IN_CREATE | InotifyConstants.IN_CLOSE_WRITE | InotifyConstants.IN_MODIFY
              | InotifyConstants.IN_MOVED_FROM | InotifyConstants.IN_MOVED_TO
              | InotifyConstants.IN_DELETE_SELF | InotifyConstants.IN_MOVE_SELF
              | InotifyConstants.IN_DONT_FOLLOW | InotifyConstants.IN_EXCL_UNLINK)


class _Emitter(InotifyEmitter):
    def __init__(self, *args, group_class=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._group_class = group_class or InotifyWatchGroup

    def on_thread_start(self) -> None:
        self._inotify = self._group_class(
            self._inotify_fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=EVENT_MASK,
            follow_symlink=self.watch.follow_symlink,
        )


class _Observer(BaseObserver):
    def __init__(self, group_class) -> None:
        self._inotify_fd = InotifyFD()
        self._inotify_fd.start()
        super().__init__(_Emitter, timeout=DEFAULT_OBSERVER_TIMEOUT, inotify_fd=self._inotify_fd,
                         group_class=group_class)

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._inotify_fd.stop()
        self._inotify_fd.join()


class _Handler(FileSystemEventHandler):
    def __init__(self, watch: "RootWatch"):
        self.watch = watch

    def dispatch(self, event: FileSystemEvent) -> None:  # never raise: it would kill the dispatcher
        try:
            self.watch.handle(event)
        except BaseException as exc:  # noqa: BLE001 - nothing may escape into watchdog
            try:
                self.watch.on_handler_error(event, exc)
            except Exception:
                pass


class RootWatch:
    """One root: its own observer, inotify instance and dispatcher thread."""

    def __init__(self, root, *, on_candidate, on_handler_error, on_subwatch_failed, on_root_gone, on_overflow,
                 hook=None):
        self.root = root
        self.on_candidate = on_candidate
        self._on_handler_error = on_handler_error
        self._on_root_gone = on_root_gone
        self._on_overflow = on_overflow
        self.hook = hook  # tests: called with every event before it is handled
        group = type("_RootGroup", (_LoudWatchGroup,), {
            "report_failure": staticmethod(lambda p, exc: on_subwatch_failed(root, os.fsdecode(p), exc)),
            "report_root_moved": staticmethod(lambda: self._on_root_gone(root)),
            "report_overflow": staticmethod(lambda: self._on_overflow(root)),
        })
        self.observer = _Observer(group)
        self.observer.name = f"modelscand-dispatch:{root.path}"
        self.handler = _Handler(self)

    def start(self) -> None:
        """Raises OSError when the root cannot be watched (missing, EACCES, ENOSPC)."""
        self.observer.start()
        try:
            self.observer.schedule(self.handler, self.root.path, recursive=True)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            self.observer.stop()
            self.observer.join(5)
        except Exception:
            pass

    @property
    def inotify_thread_ident(self) -> int | None:
        return self.observer._inotify_fd.ident

    def alive(self) -> bool:
        if not self.observer.is_alive() or not self.observer._inotify_fd.is_alive():
            return False
        return bool(self.observer.emitters) and all(e.is_alive() for e in self.observer.emitters)

    def handle(self, event: FileSystemEvent) -> None:
        if self.hook is not None:
            self.hook(self, event)
        kind = event.event_type
        if event.is_directory:
            if kind == "deleted" and os.fsdecode(event.src_path) == self.root.path:
                self._on_root_gone(self.root)
            return
        reason = REASONS.get(kind)
        if reason is None:
            return
        path = event.dest_path if kind == "moved" else event.src_path
        if not path:
            return
        self.on_candidate(os.fsdecode(path), reason, self.root)

    def on_handler_error(self, event, exc) -> None:
        self._on_handler_error(self.root, event, exc)


class QuietOverflow(logging.Filter):
    """watchdog logs each overflow twice (inotify_c and inotify) at warning level; the daemon
    logs its own ``watch.overflow`` with the root and the answer: drop watchdog's."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return "queue overflowed" not in record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is not ours to drop
            return True

    def install(self) -> None:
        for name in OVERFLOW_LOGGERS:
            logging.getLogger(name).addFilter(self)

    def uninstall(self) -> None:
        for name in OVERFLOW_LOGGERS:
            logging.getLogger(name).removeFilter(self)


def log():
    return mlog.get()
