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

import collections
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


def open_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection that also works where the directory itself is read-only (a WAL
    database then cannot make its -shm file: read it as immutable instead)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, check_same_thread=False)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.Error:
        db.close()
    db = sqlite3.connect(f"file:{path}?immutable=1", uri=True, timeout=10, check_same_thread=False)
    db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    return db


class Baseline:
    """The verdict cache on disk, and what to do when the disk will not take it.

    A failed write never swallows a verdict: the caller logs the verdict first, and a row
    (or meta value) that cannot be written stays in memory (`_pending`), where lookups see
    it, while the state is *degraded*: ``state.degraded`` is logged once (error), `retry()`
    (the maintenance timer) writes the pending rows when space or write access returns and
    logs ``state.recovered``. A state dir that cannot be opened for writing at all (read-only
    mount) is read read-only, or not at all; the daemon runs on from memory either way.
    Only an untrusted state dir (`StateDirError`) stops it."""

    FILE = "baseline.sqlite3"
    SIDE_FILES = ("-wal", "-shm", "-journal")

    def __init__(self, state_dir: str, fingerprint: str, log=None):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, self.FILE)
        self.fingerprint = fingerprint
        self.log = log
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None  # read-write, when the disk takes writes
        self._ro: sqlite3.Connection | None = None  # read-only fallback for lookups
        self._pending: dict[tuple[int, int], tuple] = {}  # rows not on disk yet
        self._pending_meta: dict[str, str] = {}
        self.degraded: str | None = None  # why, while the disk does not have everything
        try:
            self._open()
        except StateDirError:
            raise
        except (OSError, sqlite3.Error) as exc:
            self._degrade(exc, "open")
            try:
                self._ro = open_readonly(self.path)
            except (OSError, sqlite3.Error):
                self._ro = None

    def _open(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        check_state_dir(self.state_dir)
        for suffix in self.SIDE_FILES:
            _check_own_file(self.path + suffix)
        if not _check_own_file(self.path):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            for suffix in self.SIDE_FILES:  # sqlite copies the db's mode; make sure
                _check_own_file(self.path + suffix)
            db.execute("PRAGMA synchronous=NORMAL")
            cols = [r[1] for r in db.execute("PRAGMA table_info(files)").fetchall()]
            if cols and "ctime_ns" not in cols:  # pre-ctime baseline: its identities can be forged
                db.execute("DROP TABLE files")
            db.executescript(SCHEMA)
        except BaseException:
            db.close()
            raise
        self._db = db

    # ------------------------------------------------------------------ degraded state
    def _degrade(self, exc: BaseException, doing: str) -> None:
        first = self.degraded is None
        self.degraded = f"{doing}: {getattr(exc, 'strerror', None) or exc}"
        if first and self.log is not None:
            self.log.error("state.degraded", state_dir=self.state_dir, error=self.degraded,
                           pending=len(self._pending),
                           answer="verdicts are logged and kept in memory; the baseline is written again "
                                  "when the state dir takes writes",
                           fix=f"free space on, or make writable, {self.state_dir}")

    def retry(self) -> bool:
        """Write what is pending; True when the disk has everything again."""
        with self._lock:
            if self.degraded is None:
                return True
            if self._db is None:
                try:
                    self._open()
                except (OSError, sqlite3.Error, StateDirError):
                    return False
            n = len(self._pending)
            if not self._flush_locked():
                return False
            self.degraded = None
        if self.log is not None:
            self.log.warning("state.recovered", state_dir=self.state_dir, flushed=n)
        return True

    def _flush_locked(self) -> bool:
        if self._db is None:
            return False
        try:
            if self._pending:
                self._db.executemany(
                    "INSERT OR REPLACE INTO files (dev, ino, size, mtime_ns, ctime_ns, path, sha256, verdict, severity, "
                    "rule_ids, fingerprint, scanned_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", list(self._pending.values()))
            if self._pending_meta:
                self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                     list(self._pending_meta.items()))
        except (OSError, sqlite3.Error) as exc:
            self._degrade(exc, "write")
            return False
        self._pending.clear()
        self._pending_meta.clear()
        return True

    def _reader(self) -> sqlite3.Connection | None:
        return self._db or self._ro

    def _query(self, sql: str, args=()) -> list:
        db = self._reader()
        if db is None:
            return []
        try:
            return db.execute(sql, args).fetchall()
        except (OSError, sqlite3.Error):
            return []

    def close(self) -> None:
        with self._lock:
            if self._pending and self.log is not None:
                self.log.error("state.unsaved", state_dir=self.state_dir, rows=len(self._pending),
                               error=self.degraded, answer="these files are scanned again at the next start")
            for db in (self._db, self._ro):
                if db is not None:
                    db.close()
            self._db = self._ro = None

    # ------------------------------------------------------------------ rows
    def lookup(self, ident: Identity) -> Row | None:
        """The stored verdict for exactly this inode, size and mtime, under this scanner."""
        with self._lock:
            p = self._pending.get(ident.inode)
            if p is not None:
                if tuple(p[:5]) == (ident.dev, ident.ino, ident.size, ident.mtime_ns, ident.ctime_ns) \
                        and p[10] == self.fingerprint:
                    return Row(ident, os.fsdecode(p[5]), p[6], p[7], p[8], tuple(json.loads(p[9] or "[]")), p[11])
                return None
            rows = self._query(
                "SELECT path, sha256, verdict, severity, rule_ids, scanned_at FROM files "
                "WHERE dev=? AND ino=? AND size=? AND mtime_ns=? AND ctime_ns=? AND fingerprint=?",
                (ident.dev, ident.ino, ident.size, ident.mtime_ns, ident.ctime_ns, self.fingerprint),
            )
        if not rows:
            return None
        r = rows[0]
        return Row(ident, os.fsdecode(r[0]), r[1], r[2], r[3], tuple(json.loads(r[4] or "[]")), r[5])

    def record(self, ident: Identity, path: str, sha256: str | None, verdict: str, severity: str | None, rule_ids) -> None:
        """Never raises for a disk that will not take the row: it stays pending (degraded)."""
        row = (ident.dev, ident.ino, ident.size, ident.mtime_ns, ident.ctime_ns, os.fsencode(path), sha256, verdict,
               severity, json.dumps(sorted(set(rule_ids))), self.fingerprint, time.time())
        with self._lock:
            self._pending[ident.inode] = row
            if self.degraded is None:
                self._flush_locked()

    def same_content(self, sha256: str, ident: Identity) -> list[Row]:
        """Other inodes already seen with these bytes (a re-download of a known file)."""
        with self._lock:
            rows = self._query(
                "SELECT dev, ino, size, mtime_ns, ctime_ns, path, verdict, severity, rule_ids, scanned_at FROM files "
                "WHERE sha256=? AND NOT (dev=? AND ino=?) LIMIT 5",
                (sha256, ident.dev, ident.ino),
            )
        return [Row(Identity(*r[:5]), os.fsdecode(r[5]), sha256, r[6], r[7], tuple(json.loads(r[8] or "[]")), r[9]) for r in rows]

    def prune(self, root: str, seen: set[tuple[int, int]]) -> int:
        """Forget rows under `root` whose inode the last full walk did not see."""
        prefix = os.fsencode(root.rstrip("/") + "/")
        with self._lock:
            for key in [k for k, p in self._pending.items() if p[5].startswith(prefix) and k not in seen]:
                del self._pending[key]
            if self._db is None or self.degraded is not None:
                return 0
            try:
                rows = self._db.execute(
                    "SELECT dev, ino FROM files WHERE substr(path, 1, ?) = ?", (len(prefix), prefix)
                ).fetchall()
                gone = [r for r in rows if (r[0], r[1]) not in seen]
                self._db.executemany("DELETE FROM files WHERE dev=? AND ino=?", gone)
            except (OSError, sqlite3.Error) as exc:
                self._degrade(exc, "prune")
                return 0
        return len(gone)

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(r.verdict for r in self.all_rows()))

    def rows(self, verdicts: tuple[str, ...] = ("issues", "error", "incomplete"), limit: int = 50) -> list[Row]:
        marks = ",".join("?" * len(verdicts))
        with self._lock:
            rows = self._query(
                f"SELECT dev, ino, size, mtime_ns, ctime_ns, path, sha256, verdict, severity, rule_ids, scanned_at FROM files "
                f"WHERE verdict IN ({marks}) ORDER BY scanned_at DESC LIMIT ?",
                (*verdicts, limit),
            )
            pending = [p for p in self._pending.values() if p[7] in verdicts]
        out = {(r[0], r[1]): Row(Identity(*r[:5]), os.fsdecode(r[5]), r[6], r[7], r[8], tuple(json.loads(r[9] or "[]")),
                                 r[10]) for r in rows}
        for p in pending:  # not on disk yet: newer than what is
            out[(p[0], p[1])] = Row(Identity(*p[:5]), os.fsdecode(p[5]), p[6], p[7], p[8],
                                    tuple(json.loads(p[9] or "[]")), p[11])
        return sorted(out.values(), key=lambda r: -r.scanned_at)

    def all_rows(self) -> list[Row]:
        return self.rows(("clean", "issues", "error", "incomplete", "skipped"), limit=-1)

    def set_meta(self, **values) -> None:
        with self._lock:
            self._pending_meta.update({k: json.dumps(v, default=str) for k, v in values.items()})
            if self.degraded is None:
                self._flush_locked()

    def meta(self) -> dict:
        with self._lock:
            rows = dict(self._query("SELECT key, value FROM meta"))
            rows.update(self._pending_meta)
        return {k: json.loads(v) for k, v in rows.items()}
