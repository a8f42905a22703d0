"""Where quarantined files live: one private directory per filesystem, and the ledger.

A move must be a rename (atomic, no copy of possibly huge bytes), and a rename only works
within one filesystem, so each filesystem gets its own quarantine directory:

1. ``quarantine.dir`` (default ``<state dir>/quarantine``) when it is on the file's filesystem;
2. else an entry of ``quarantine.filesystem_dirs`` on that filesystem;
3. else, with ``quarantine.per_filesystem`` on, ``<top of that filesystem>/.modelscand-quarantine``,
   created on demand, but only below a directory owned by root (or us) that no one else can
   write to (or that is sticky, like /tmp): a user must not be able to rename it away;
4. else the file is copied into ``quarantine.dir`` (journaled, see mover.py).

Every quarantine directory is opened with ``O_NOFOLLOW`` and must be ours and mode 0700:
a planted symlink or a directory someone else owns is refused, never written into.
"""

from __future__ import annotations

import os
import stat
import threading

from modelscand.quarantine import QuarantineError
from modelscand.quarantine.index import Index
from modelscand.quarantine.ledger import DEFAULT_ROTATE_BYTES, Ledger

PER_FS_NAME = ".modelscand-quarantine"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def open_private_dir(path: str) -> int:
    """A dir fd for a quarantine directory that is ours and 0700; anything else is refused."""
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError as exc:
        raise QuarantineError(f"quarantine directory {path}: {exc.strerror or exc}") from None
    try:
        _check_private(os.fstat(fd), path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_private(st: os.stat_result, path: str) -> None:
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise QuarantineError(f"quarantine directory {path} must be owned by uid {os.geteuid()} with mode 0700 "
                              f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): refusing to use it")


def try_chown(fd: int, uid: int, gid: int) -> bool:
    """fchown where we may: it needs root with CAP_CHOWN and a syscall filter that allows it
    (the shipped unit's ~@privileged does not). Without, the caller records it and goes on:
    a quarantined file is out of reach in its 0700 directory whoever owns it."""
    if os.geteuid() != 0:
        return False
    try:
        os.fchown(fd, uid, gid)
        return True
    except PermissionError:
        return False


def _mkdir_private(path: str) -> None:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise QuarantineError(f"cannot create the quarantine directory {path}: {exc.strerror or exc}") from None


def is_per_filesystem_dir(path: str) -> bool:
    """Is `path` one of our per-filesystem quarantine directories: named so, at the top of its
    filesystem, ours and private? A directory a user names so anywhere else is no quarantine
    (it is scanned like any other)."""
    if os.path.basename(path) != PER_FS_NAME:
        return False
    try:
        st = os.lstat(path)
        top = os.path.dirname(path)
        at_top = top == os.path.dirname(top) or os.lstat(top).st_dev != os.lstat(os.path.dirname(top)).st_dev
    except OSError:
        return False
    return (at_top and stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not stat.S_IMODE(st.st_mode) & 0o077)


def filesystem_top(path: str, dev: int) -> str:
    """The highest directory above `path` still on filesystem `dev` (lstat: no link is followed)."""
    top = path
    while True:
        parent = os.path.dirname(top)
        if parent == top:
            return top
        try:
            if os.lstat(parent).st_dev != dev:
                return top
        except OSError:
            return top
        top = parent


class Dirs:
    def __init__(self, primary: str, extra: list[str] = (), per_filesystem: bool = True):
        self.primary = primary
        self.extra = list(extra)
        self.per_filesystem = per_filesystem
        self._by_dev: dict[int, str] = {}
        self._lock = threading.Lock()

    def for_file(self, dev: int, parent: str) -> tuple[str, bool]:
        """(quarantine dir, same filesystem) for a file on `dev` whose directory is `parent`."""
        with self._lock:
            found = self._by_dev.get(dev)  # "" = none on that filesystem: copy
            if found:
                try:
                    os.close(open_private_dir(found))
                except QuarantineError:
                    found = None  # removed or replaced since: look again (and create it again)
            if found is None:
                found = self._by_dev[dev] = self._find(dev, parent) or ""
        if not found:
            self.ensure_primary()
            return self.primary, False
        return found, True

    def ensure_primary(self) -> None:
        _mkdir_private(self.primary)
        os.close(open_private_dir(self.primary))

    def _find(self, dev: int, parent: str) -> str | None:
        self.ensure_primary()
        for path in [self.primary, *self.extra]:
            try:
                fd = open_private_dir(path)
            except QuarantineError:
                if path == self.primary:
                    raise
                continue  # a configured dir on another host's mount, not created yet: not ours to use
            try:
                if os.fstat(fd).st_dev == dev:
                    return path
            finally:
                os.close(fd)
        if self.per_filesystem:
            return self._per_filesystem_dir(dev, filesystem_top(parent, dev))
        return None

    def _per_filesystem_dir(self, dev: int, top: str) -> str | None:
        try:
            tfd = os.open(top, DIR_FLAGS)
        except OSError:
            return None
        try:
            st = os.fstat(tfd)
            owner_ok = st.st_uid in (0, os.geteuid())
            writable_by_others = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
            if st.st_dev != dev or not owner_ok or writable_by_others:
                return None  # a user could rename our directory away: copy to the primary instead
            try:
                os.mkdir(PER_FS_NAME, 0o700, dir_fd=tfd)
            except FileExistsError:
                pass
            except OSError:
                return None  # read-only, full: copy to the primary instead
            try:
                qfd = os.open(PER_FS_NAME, DIR_FLAGS, dir_fd=tfd)
            except OSError:
                return None
            try:
                qst = os.fstat(qfd)
                path = os.path.join(top, PER_FS_NAME)
                if qst.st_dev != dev:
                    return None
                _check_private(qst, path)
                return path
            except QuarantineError:
                return None  # planted by someone else: never ours
            finally:
                os.close(qfd)
        finally:
            os.close(tfd)


class Store:
    """The ledger and the directories, as one object the mover, action and review share."""

    def __init__(self, state_dir: str, *, quarantine_dir: str | None = None, filesystem_dirs: list[str] = (),
                 per_filesystem: bool = True, tombstones: bool = True, rotate_bytes: int = DEFAULT_ROTATE_BYTES):
        self.state_dir = state_dir
        self.ledger = Ledger(os.path.join(state_dir, "ledger"), rotate_bytes=rotate_bytes)
        self.dirs = Dirs(quarantine_dir or os.path.join(state_dir, "quarantine"), filesystem_dirs, per_filesystem)
        self.tombstones = tombstones

    @classmethod
    def from_config(cls, cfg) -> "Store":
        q = cfg.data["quarantine"]
        return cls(cfg.state_dir, quarantine_dir=cfg.quarantine_dir,
                   filesystem_dirs=[os.path.expanduser(p) for p in q["filesystem_dirs"]],
                   per_filesystem=q["per_filesystem"], tombstones=q["tombstones"],
                   rotate_bytes=int(q["ledger_rotate_mb"] * (1 << 20)))

    def index(self, detail: bool = True) -> Index:
        return Index.of(self.ledger.records(), detail)

    def listing(self) -> Index:
        """Entries as `list` shows them, from record digests (no findings, no HF details)."""
        return Index.of(self.ledger.digests(), history=False)
