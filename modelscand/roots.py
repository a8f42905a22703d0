"""The watched roots: which are active, which are missing, which sub-directories are polled.

A root is a configured directory, canonicalised with realpath. Each active root has its
own `RootWatch` (own inotify instance, own dispatcher thread), so one bad root cannot
take the others down. A root that does not exist (yet) is kept in `missing` and retried
by the maintenance timer; a root that disappears while watched goes back there. A
sub-directory whose watch failed is kept in `polled` and walked on a timer instead.

This module owns the bookkeeping and the path questions every other stage asks
(`root_for`, `excluded`); it does not decide what to scan.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import threading
from typing import Callable

from modelscand.config import Config, Root, canonical_root
from modelscand.quarantine.store import PER_FS_NAME, is_per_filesystem_dir
from modelscand.watcher import RootWatch


class Roots:
    def __init__(self, config: Callable[[], Config], log, *, watch_enabled: bool,
                 make_watch: Callable[[Root], RootWatch] | None):
        self._config = config
        self.log = log
        self.watch_enabled = watch_enabled
        self._make_watch = make_watch
        self.lock = threading.RLock()
        self.active: dict[str, Root] = {}  # by realpath
        self.missing: dict[str, Root] = {}  # by configured path
        self.watches: dict[str, RootWatch] = {}
        self.polled: dict[str, Root] = {}  # sub-directories whose watch failed
        self._inode: dict[str, tuple[int, int]] = {}  # root path -> (dev, ino) when it was added
        self.refused: dict[str, str] = {}  # configured path -> why (logged once per reason)

    # ------------------------------------------------------------------ add / lose
    def add(self, root: Root) -> bool:
        """Watch `root` (when watching) and make it active; False when it is missing or
        cannot be watched (then it is retried)."""
        cfg = self._config()
        if root.refused:
            with self.lock:
                first = self.refused.get(root.configured) != root.refused
                self.refused[root.configured] = root.refused
                self.missing[root.configured] = root
            if first:
                self.log.error("watch.root_refused", root=root.path, configured=root.configured, origin=root.origin,
                               why=root.refused, answer="not watched, not scanned, nothing moved there; retried",
                               fix="remove the link, or have the directory's owner own the link")
            return False
        with self.lock:
            self.refused.pop(root.configured, None)
        if os.path.isfile(root.path):  # `scan FILE`, `run --once --root FILE`
            if self.watch_enabled:
                self.log.warning("watch.root_is_file", root=root.path, configured=root.configured,
                                 answer="scanned at start-up and by every reconciliation walk, not watched between",
                                 fix="watch the directory that holds it")
            with self.lock:
                self.active[root.path] = root
                self.missing.pop(root.configured, None)
            return True
        if not os.path.isdir(root.path):
            with self.lock:
                first = root.configured not in self.missing
                self.missing[root.configured] = root
            if first:
                self.log.warning("watch.root_missing", root=root.path, configured=root.configured, origin=root.origin,
                                 retry_s=cfg.watch["root_retry_interval"])
            return False
        try:
            st = os.stat(root.path)
        except OSError:
            return self.add(root)  # gone since isdir(): missing
        if self.watch_enabled and self._make_watch is not None:
            w = self._make_watch(root)
            try:
                w.start()
            except OSError as exc:
                with self.lock:
                    self.missing[root.configured] = root
                self.log.error("watch.root_failed", root=root.path, error=exc.strerror or str(exc), errno=exc.errno,
                               fix=watch_fix(exc))
                return False
            self.watches[root.path] = w
        with self.lock:
            self.active[root.path] = root
            self.missing.pop(root.configured, None)
            self._inode[root.path] = (st.st_dev, st.st_ino)
        self.log.info("watch.start", root=root.path, configured=root.configured, kind=root.kind, origin=root.origin,
                      symlinked=os.path.abspath(os.path.expanduser(root.configured)) != root.path)
        return True

    def retry_missing(self) -> list[Root]:
        """Try every missing root (and glob patterns that may match new directories);
        the roots that became active."""
        appeared: list[Root] = []
        with self.lock:
            missing = list(self.missing.values())
        for root in missing:
            expanded = os.path.expanduser(root.configured)
            real, refused = canonical_root(expanded) if not root.pattern else canonical_root(root.path)
            if not os.path.isdir(real):
                continue
            fresh = Root(real, root.configured, root.kind, root.origin, root.pattern, refused)
            if refused:
                self.add(fresh)  # logged once per reason; stays missing
                continue
            with self.lock:
                self.missing.pop(root.configured, None)
            if self.add(fresh):
                self.log.info("watch.root_appeared", root=fresh.path, configured=root.configured)
                appeared.append(fresh)
        configured = self._config().roots()
        if any(r.pattern for r in configured):
            for r in configured:
                if r.pattern and r.path not in self.active and os.path.isdir(r.path):
                    if self.add(r):
                        appeared.append(r)
        return appeared

    def replaced(self) -> list[Root]:
        """Active directory roots that are gone or are another directory now (renamed away
        and recreated: the watch follows the old inode). The maintenance timer asks."""
        out = []
        with self.lock:
            items = [(r, self._inode.get(p)) for p, r in self.active.items()]
        for root, inode in items:
            if inode is None:
                continue
            try:
                st = os.stat(root.path)
                now = (st.st_dev, st.st_ino)
            except OSError:
                now = None
            if now != inode:
                out.append(root)
        return out

    def lost(self, root: Root, why: str = "gone") -> bool:
        """The root went away while watched: back to `missing`, its watch stopped. False if
        it was not active (reported twice: the event and the inode check)."""
        with self.lock:
            if self.active.get(root.path) is not root:
                return False
            self.active.pop(root.path, None)
            self._inode.pop(root.path, None)
            self.missing[root.configured] = root
        self.log.warning("watch.root_lost", root=root.path, why=why, answer="re-watched and walked when it is back")
        w = self.watches.pop(root.path, None)
        if w is not None:
            threading.Thread(target=w.stop, daemon=True).start()  # not from its own dispatcher thread
        return True

    def remove(self, root: Root) -> None:
        """Stop watching a root the configuration no longer lists."""
        w = self.watches.pop(root.path, None)
        if w is not None:
            w.stop()
        with self.lock:
            self.active.pop(root.path, None)
            self.missing.pop(root.configured, None)

    def stop_all(self) -> None:
        for w in list(self.watches.values()):
            w.stop()
        self.watches.clear()

    def restart_dead_watches(self) -> tuple[bool, list[Root]]:
        """(all watches were alive, the roots whose dead watch was re-established)."""
        ok = True
        restarted: list[Root] = []
        for path, w in list(self.watches.items()):
            if w.alive():
                continue
            ok = False
            root = w.root
            self.log.error("watch.dead", root=path, answer="re-watch and reconcile")
            self.watches.pop(path, None)
            w.stop()
            with self.lock:
                self.active.pop(path, None)
            if self.add(root):
                restarted.append(root)
        return ok, restarted

    def poll(self, path: str, root: Root) -> bool:
        """Cover a sub-directory whose watch failed by polling; True the first time."""
        with self.lock:
            first = path not in self.polled
            self.polled[path] = root
        return first

    # ------------------------------------------------------------------ questions
    def get(self, path: str) -> Root | None:
        with self.lock:
            return self.active.get(path)

    def root_for(self, path: str) -> Root | None:
        """The innermost active root that contains `path`."""
        best = None
        with self.lock:
            for rp, root in self.active.items():
                if path == rp or path.startswith(rp.rstrip("/") + "/"):
                    if best is None or len(rp) > len(best.path):
                        best = root
        return best

    def excluded(self, path: str, root_path: str) -> bool:
        if self._own(path):
            return True
        rel = os.path.relpath(path, root_path) if path != root_path else os.path.basename(path)
        base = os.path.basename(path)
        w = self._config().watch

        def match(pat: str) -> bool:
            return fnmatch.fnmatchcase(rel, pat) if "/" in pat else fnmatch.fnmatchcase(base, pat)

        if any(match(p) for p in w["exclude"]):
            return True
        return bool(w["include"]) and not any(match(p) for p in w["include"])

    def _own(self, path: str) -> bool:
        """The daemon's own state and quarantine dirs are never scanned (nor re-quarantined)."""
        cfg = self._config()
        own = (cfg.state_dir, cfg.quarantine_dir, *cfg.data["quarantine"]["filesystem_dirs"])
        if any(path.startswith(d.rstrip("/") + "/") for d in own):
            return True
        mark = f"/{PER_FS_NAME}/"
        at = path.find(mark)
        while at >= 0:  # only a real one (ours, private, at its filesystem's top): the name alone hides nothing
            if is_per_filesystem_dir(path[:at + len(mark) - 1]):
                return True
            at = path.find(mark, at + 1)
        return False

    def paths(self) -> list[str]:
        with self.lock:
            return sorted(self.active)

    def missing_paths(self) -> list[str]:
        with self.lock:
            return sorted(self.missing)


def watch_fix(exc: OSError) -> str | None:
    """The exact command that fixes a failed watch, where there is one."""
    if exc.errno == errno.ENOSPC:
        return "raise fs.inotify.max_user_watches: echo fs.inotify.max_user_watches=524288 | sudo tee " \
               "/etc/sysctl.d/60-modelscand.conf && sudo sysctl --system"
    if exc.errno == errno.EMFILE:
        return "raise fs.inotify.max_user_instances: echo fs.inotify.max_user_instances=1024 | sudo tee -a " \
               "/etc/sysctl.d/60-modelscand.conf && sudo sysctl --system"
    if exc.errno == errno.EACCES:
        return "run as a user that can read the directory, or add it to ReadWritePaths/ReadOnlyPaths"
    return None
