"""The persisted baseline: ``(dev, ino, size, mtime_ns, ctime_ns) -> sha256, verdict`` in sqlite.

Why an inode key and not a path: an HF blob and its snapshot link are one inode (scan it
once), and a rename keeps the inode (nothing to rescan). Why size and mtime too: an
in-place rewrite (Keras) keeps the inode but changes both. Why ctime: size and mtime can be
put back with `os.utime` after a same-size rewrite; ctime cannot be set by a user (a rename
or chmod also moves it: one extra scan, never a stale verdict). A table without the ctime
column (an older daemon) is dropped and rebuilt: every file is scanned once. A row also remembers the scanner
fingerprint (core version + settings): a new policy means old verdicts are not trusted.

Restarting over an unchanged tree is therefore one `lstat` and one indexed lookup per
file and no scan. The `meta` table carries what `modelscand status` shows.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass

from modelscand.config import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    path BLOB NOT NULL,
    sha256 TEXT,
    verdict TEXT NOT NULL,
    severity TEXT,
    rule_ids TEXT,
    fingerprint TEXT NOT NULL,
    scanned_at REAL NOT NULL,
    PRIMARY KEY (dev, ino)
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Identity:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Identity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def inode(self) -> tuple[int, int]:
        return (self.dev, self.ino)


@dataclass(frozen=True)
class Row:
    identity: Identity
    path: str
    sha256: str | None
    verdict: str
    severity: str | None
    rule_ids: tuple[str, ...]
    scanned_at: float


class StateDirError(ConfigError):
    """The state dir (or a file in it) is not safely ours: a config error (exit 78)."""


def check_state_dir(state_dir: str) -> None:
    """Whoever can write the state dir can pre-seed "clean" verdicts or plant a symlink
    that sqlite (run as root) would follow: refuse one not owned by our euid or writable by
    group/other."""
    try:
        st = os.stat(state_dir)
    except OSError as exc:
        raise StateDirError(f"state dir {state_dir}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state dir {state_dir} is not a directory")
    if st.st_uid != os.geteuid():
        raise StateDirError(f"state dir {state_dir} is owned by uid {st.st_uid}, not by the daemon's euid "
                            f"{os.geteuid()}: chown it or choose another state.dir")
    if st.st_mode & 0o022:
        raise StateDirError(f"state dir {state_dir} is group/other-writable (mode {stat.S_IMODE(st.st_mode):04o}): "
                            f"chmod 0700 it or choose another state.dir")


def _check_own_file(path: str) -> bool:
    """True if `path` exists as a regular file of ours (then made 0600), False if absent;
    anything else (a symlink, someone else's file) is refused, never opened."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        raise StateDirError(f"{path} is not a regular file owned by uid {os.geteuid()} (a symlink or a planted "
                            f"file?): refusing to open it; remove it")
    if stat.S_IMODE(st.st_mode) != 0o600:
        os.chmod(path, 0o600, follow_symlinks=False)
    return True


class Baseline:
    FILE = "baseline.sqlite3"
    SIDE_FILES = ("-wal", "-shm", "-journal")

    def __init__(self, state_dir: str, fingerprint: str):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        check_state_dir(state_dir)
        self.path = os.path.join(state_dir, self.FILE)
        self.fingerprint = fingerprint
        self._lock = threading.Lock()
        for suffix in self.SIDE_FILES:
            _check_own_file(self.path + suffix)
        if not _check_own_file(self.path):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        for suffix in self.SIDE_FILES:  # sqlite copies the db's mode; make sure
            _check_own_file(self.path + suffix)
        self._db.execute("PRAGMA synchronous=NORMAL")
        cols = [r[1] for r in self._db.execute("PRAGMA table_info(files)").fetchall()]
        if cols and "ctime_ns" not in cols:  # pre-ctime baseline: its identities can be forged
            self._db.execute("DROP TABLE files")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def lookup(self, ident: Identity) -> Row | None:
        """The stored verdict for exactly this inode, size and mtime, under this scanner."""
        with self._lock:
            cur = self._db.execute(
                "SELECT path, sha256, verdict, severity, rule_ids, scanned_at FROM files "
                "WHERE dev=? AND ino=? AND size=? AND mtime_ns=? AND ctime_ns=? AND fingerprint=?",
                (ident.dev, ident.ino, ident.size, ident.mtime_ns, ident.ctime_ns, self.fingerprint),
            )
            r = cur.fetchone()
        if r is None:
            return None
        return Row(ident, os.fsdecode(r[0]), r[1], r[2], r[3], tuple(json.loads(r[4] or "[]")), r[5])

    def record(self, ident: Identity, path: str, sha256: str | None, verdict: str, severity: str | None, rule_ids) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO files (dev, ino, size, mtime_ns, ctime_ns, path, sha256, verdict, severity, "
                "rule_ids, fingerprint, scanned_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (ident.dev, ident.ino, ident.size, ident.mtime_ns, ident.ctime_ns, os.fsencode(path), sha256, verdict, severity,
                 json.dumps(sorted(set(rule_ids))), self.fingerprint, time.time()),
            )

    def same_content(self, sha256: str, ident: Identity) -> list[Row]:
        """Other inodes already seen with these bytes (a re-download of a known file)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT dev, ino, size, mtime_ns, ctime_ns, path, verdict, severity, rule_ids, scanned_at FROM files "
                "WHERE sha256=? AND NOT (dev=? AND ino=?) LIMIT 5",
                (sha256, ident.dev, ident.ino),
            ).fetchall()
        return [Row(Identity(*r[:5]), os.fsdecode(r[5]), sha256, r[6], r[7], tuple(json.loads(r[8] or "[]")), r[9]) for r in rows]

    def prune(self, root: str, seen: set[tuple[int, int]]) -> int:
        """Forget rows under `root` whose inode the last full walk did not see."""
        prefix = os.fsencode(root.rstrip("/") + "/")
        with self._lock:
            rows = self._db.execute(
                "SELECT dev, ino FROM files WHERE substr(path, 1, ?) = ?", (len(prefix), prefix)
            ).fetchall()
            gone = [r for r in rows if (r[0], r[1]) not in seen]
            self._db.executemany("DELETE FROM files WHERE dev=? AND ino=?", gone)
        return len(gone)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT verdict, count(*) FROM files GROUP BY verdict").fetchall()
        return {v: n for v, n in rows}

    def rows(self, verdicts: tuple[str, ...] = ("issues", "error", "incomplete"), limit: int = 50) -> list[Row]:
        marks = ",".join("?" * len(verdicts))
        with self._lock:
            rows = self._db.execute(
                f"SELECT dev, ino, size, mtime_ns, ctime_ns, path, sha256, verdict, severity, rule_ids, scanned_at FROM files "
                f"WHERE verdict IN ({marks}) ORDER BY scanned_at DESC LIMIT ?",
                (*verdicts, limit),
            ).fetchall()
        return [Row(Identity(*r[:5]), os.fsdecode(r[5]), r[6], r[7], r[8], tuple(json.loads(r[9] or "[]")), r[10]) for r in rows]

    def all_rows(self) -> list[Row]:
        return self.rows(("clean", "issues", "error", "incomplete", "skipped"), limit=-1)

    def set_meta(self, **values) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [(k, json.dumps(v, default=str)) for k, v in values.items()],
            )

    def meta(self) -> dict:
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM meta").fetchall()
        return {k: json.loads(v) for k, v in rows}
