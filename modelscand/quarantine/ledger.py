"""The quarantine ledger: append-only JSON Lines, fsync'd, each record chained to the one before.

Why a chain: operators review this file after an incident, so an edited, inserted or
deleted line must show. Each record carries ``seq``, ``prev`` (the hash of the record before)
and its own ``hash``: sha256 of its canonical JSON (sorted keys, no spaces, ASCII) without
``hash``. ``HEAD`` remembers the last seq and hash, so a tail cut off shows too. Rotation
starts a new segment whose first record (``ledger.segment``) chains to the last record of the
previous one: the chain runs unbroken over every segment and `verify` walks them in order.

Damage is recorded, never repaired away: a tail cut short (a crash mid-write, a disk that
lost blocks) or a ledger that ends before the record HEAD names is set right so appending can
go on with a valid chain, and a record says what was lost (``ledger.damaged``: a record that
HEAD had committed is gone; its bytes are kept beside the segment) or dropped
(``ledger.repaired``: a write a crash cut before its fsync, never acted on). `verify` reports
every ``ledger.damaged`` for good, so a later append cannot hide a loss.

Why it is also the journal: every step of a move is announced by a record that is fsync'd
before the step is taken, and recovery reads the ledger to finish what a kill interrupted.

Concurrency: the daemon and ``modelscand quarantine restore|purge`` both write. Every write
happens under `locked()` (a thread lock plus an flock on ``lock``), held for a whole
operation, so a process never mistakes another's operation in progress for an interrupted one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import socket
import threading
import time
from typing import Iterator

from modelscand.quarantine import QuarantineError

GENESIS = "0" * 64
DEFAULT_ROTATE_BYTES = 64 << 20
_SEGMENT = re.compile(r"^ledger-(\d{6})\.jsonl$")
_FILE_FLAGS = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
HOST = socket.gethostname()


class LedgerError(QuarantineError):
    """The ledger cannot be read or written safely."""


class Busy(QuarantineError):
    """Another process holds the quarantine lock for longer than we wait."""


def canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(body: dict) -> str:
    """sha256 of the canonical form of a record without its own ``hash``."""
    return hashlib.sha256(canonical({k: v for k, v in body.items() if k != "hash"})).hexdigest()


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Ledger:
    LOCK = "lock"
    HEAD = "HEAD"
    SUMMARY = "summary.tsv"  # a digest per record for `list` (a cache: the ledger decides)
    #: how long an operation waits for another process's (a cross-filesystem copy can take minutes)
    LOCK_TIMEOUT = 120.0

    def __init__(self, directory: str, *, rotate_bytes: int = DEFAULT_ROTATE_BYTES):
        self.dir = directory
        self.rotate_bytes = rotate_bytes
        self._tlock = threading.RLock()
        self._depth = 0
        self._lockfd: int | None = None
        self._tail: tuple[str, int, int, str] | None = None  # segment, size, seq, hash
        self._last: dict = {}
        self._repairing = False  # recording damage appends: that append must not look again

    # -- files -----------------------------------------------------------------------------
    def exists(self) -> bool:
        """Is there a ledger? (A permission error is raised, never taken for "no".)"""
        try:
            os.stat(self.dir)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def segments(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise LedgerError(f"cannot read the ledger directory {self.dir}: {exc.strerror or exc}") from None
        return sorted(n for n in names if _SEGMENT.match(n))

    def _prepare_dir(self) -> None:
        from modelscand.state import check_state_dir

        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        check_state_dir(self.dir)  # ours, not writable by others: whoever can write it can forge history

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _own_file(self, name: str) -> None:
        from modelscand.state import _check_own_file

        _check_own_file(self._path(name))

    # -- the lock --------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, timeout: float | None = None):
        """Exclusive over threads and processes for a whole operation; re-entrant."""
        timeout = self.LOCK_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not self._tlock.acquire(timeout=max(0.0, timeout)):
            raise Busy(f"the quarantine is busy (another operation in this process for {timeout:g}s)")
        try:
            if self._depth == 0:
                self._take_flock(deadline, timeout)
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lockfd is not None:
                    fcntl.flock(self._lockfd, fcntl.LOCK_UN)
                    os.close(self._lockfd)
                    self._lockfd = None
        finally:
            self._tlock.release()

    def _take_flock(self, deadline: float, timeout: float) -> None:
        self._prepare_dir()
        self._own_file(self.LOCK)
        fd = os.open(self._path(self.LOCK), os.O_RDWR | os.O_CREAT | _FILE_FLAGS, 0o600)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise Busy(f"the quarantine is busy: pid {holder} holds {self._path(self.LOCK)} "
                               f"(waited {timeout:g}s)") from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lockfd = fd

    # -- writing ---------------------------------------------------------------------------
    def append(self, type_: str, **fields) -> dict:
        """Write one record and fsync it before returning: the caller may then act on it."""
        with self.locked():
            seg, size, seq, prev = self._tail_state()
            if size >= self.rotate_bytes:
                old, seg = seg, self._next_segment(seg)
                seq, prev = self._write(seg, seq, prev, {"type": "ledger.segment", "previous": old})
            seq, prev = self._write(seg, seq, prev, {"type": type_, **fields})
            return self._last

    def _write(self, seg: str, seq: int, prev: str, fields: dict) -> tuple[int, str]:
        now = time.time()
        body = {**fields, "seq": seq + 1, "prev": prev, "time": round(now, 6), "ts": iso(now), "host": HOST,
                "pid": os.getpid()}
        body["hash"] = record_hash(body)
        line = canonical(body) + b"\n"
        new = not os.path.lexists(self._path(seg))
        if not new:
            self._own_file(seg)
        fd = os.open(self._path(seg), os.O_WRONLY | os.O_APPEND | os.O_CREAT | _FILE_FLAGS, 0o600)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if new:
            self._fsync_dir()
        self._tail = (seg, size, body["seq"], body["hash"])
        self._last = body
        self._write_head(seg, body["seq"], body["hash"])
        self._write_digest(body, seg, size)
        return body["seq"], body["hash"]

    def _write_digest(self, body: dict, seg: str, end: int) -> None:
        from modelscand.quarantine.index import digest, encode_digest

        try:
            fd = os.open(self._path(self.SUMMARY), os.O_WRONLY | os.O_APPEND | os.O_CREAT | _FILE_FLAGS, 0o600)
            try:
                os.write(fd, encode_digest(digest(body, seg, end)) + b"\n")
            finally:
                os.close(fd)
        except OSError:
            pass  # only a cache: `digests()` catches up from the ledger

    def _fsync_dir(self) -> None:
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | _FILE_FLAGS)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _write_head(self, seg: str, seq: int, h: str) -> None:
        tmp = self._path(self.HEAD + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o600)
        try:
            os.write(fd, json.dumps({"segment": seg, "seq": seq, "hash": h}).encode() + b"\n")
        finally:
            os.close(fd)
        os.replace(tmp, self._path(self.HEAD))

    def _next_segment(self, seg: str) -> str:
        return f"ledger-{int(_SEGMENT.match(seg).group(1)) + 1:06d}.jsonl"

    def _tail_state(self) -> tuple[str, int, int, str]:
        """(current segment, its size, last seq, last hash), re-read when another process wrote."""
        segs = self.segments()
        if not segs:
            return "ledger-000001.jsonl", 0, 0, GENESIS
        seg = segs[-1]
        size = os.lstat(self._path(seg)).st_size
        if self._tail is not None and self._tail[:2] == (seg, size):
            return self._tail
        if not self._repairing and self.repair_torn_tail():  # recorded what it found: read the tail again, that record included
            return self._tail_state()
        for name in reversed(segs):
            last = self._last_line(name)
            if last is not None:
                rec = _parse(last)
                if rec is None or not isinstance(rec.get("seq"), int) or not isinstance(rec.get("hash"), str):
                    # never stop quarantining over a damaged line: chain past it, loudly (verify flags it)
                    from modelscand import logging as mlog

                    seq = max((r["seq"] for r in self.records() if isinstance(r.get("seq"), int)), default=0)
                    mlog.get().error("ledger.damaged_tail", path=self._path(name),
                                     answer="chaining past it; run 'modelscand quarantine verify'")
                    rec = {"seq": seq, "hash": hashlib.sha256(last).hexdigest()}
                self._tail = (seg, os.lstat(self._path(seg)).st_size, rec["seq"], rec["hash"])
                return self._tail
        return seg, 0, 0, GENESIS

    def _last_line(self, name: str) -> bytes | None:
        with open(self._path(name), "rb", opener=_ro_opener) as fh:
            end = fh.seek(0, os.SEEK_END)
            chunk = 1 << 16
            while True:
                start = max(0, end - chunk)
                fh.seek(start)
                data = fh.read(end - start)
                body = data.rstrip(b"\n")
                cut = body.rfind(b"\n")
                if cut >= 0:
                    return body[cut + 1:]
                if start == 0:
                    return body or None
                chunk *= 4

    def repair_torn_tail(self) -> int:
        """Set right a tail a crash (or a disk) cut, and record it. Call under `locked()`.

        A partial last line is moved aside (kept in ``<segment>.torn-<offset>``) so appends
        chain on from the last whole record. When HEAD names a record the ledger no longer
        holds whole (cut mid-record, or whole records gone from the end), a committed record
        was lost: ``ledger.damaged``, which `verify` reports from then on. A partial line past
        HEAD was never fsync'd nor acted on: ``ledger.repaired``. Returns the bytes dropped
        (or 1 when only a loss was recorded): non-zero when a record was written."""
        segs = self.segments()
        if not segs:
            return 0
        seg = segs[-1]
        path = self._path(seg)
        self._own_file(seg)
        torn: dict | None = None
        fd = os.open(path, os.O_RDWR | _FILE_FLAGS)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                keep = size
                while keep > 0:
                    start = max(0, keep - (1 << 16))
                    block = os.pread(fd, keep - start, start)
                    cut = block.rfind(b"\n")
                    if cut >= 0:
                        keep = start + cut + 1
                        break
                    keep = start
                dropped = os.pread(fd, size - keep, keep)
                saved = f"{seg}.torn-{keep}"
                self._save(saved, dropped)
                os.ftruncate(fd, keep)
                os.fsync(fd)
                torn = {"segment": seg, "offset": keep, "dropped_bytes": size - keep,
                        "dropped_sha256": hashlib.sha256(dropped).hexdigest(), "saved": saved}
        finally:
            os.close(fd)
        self._tail = None
        lost = self._lost_against_head(segs)
        if torn is None and lost is None:
            return 0
        self._repairing = True
        try:
            self._record_damage(path, lost, torn)
        finally:
            self._repairing = False
        return torn["dropped_bytes"] if torn else 1

    def _record_damage(self, path: str, lost: dict | None, torn: dict | None) -> None:
        from modelscand import logging as mlog

        if lost is not None:
            mlog.get().error("ledger.damaged", path=path, lost=lost, torn=torn,
                             why="the ledger ends before the record HEAD names: committed records were cut",
                             answer="recorded in the ledger; 'modelscand quarantine verify' reports it")
            self.append("ledger.damaged", lost=lost, torn=torn)
        else:
            mlog.get().warning("ledger.torn_record", path=path, dropped_bytes=torn["dropped_bytes"],
                               why="a write was cut short by a crash; it was never fsync'd nor acted on")
            self.append("ledger.repaired", torn=torn)

    def _lost_against_head(self, segs: list[str]) -> dict | None:
        """What HEAD says was committed and the ledger no longer holds, or None."""
        head = self.head()
        if not head or head.get("unreadable") or not isinstance(head.get("seq"), int):
            return None
        last: dict = {"seq": 0, "hash": GENESIS}
        for name in reversed(segs):
            line = self._last_line(name)
            if line is not None:
                last = _parse(line) or {"seq": None, "hash": None}
                break
        if not isinstance(last.get("seq"), int):
            return None  # a damaged line: chained past and flagged elsewhere
        if head["seq"] > last["seq"] or (head["seq"] == last["seq"] and head.get("hash") != last.get("hash")):
            return {"head_seq": head["seq"], "head_hash": head.get("hash"), "head_segment": head.get("segment"),
                    "last_seq": last["seq"], "last_hash": last.get("hash")}
        return None

    def _save(self, name: str, data: bytes) -> None:
        fd = os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _FILE_FLAGS, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading ---------------------------------------------------------------------------
    def lines(self, start: tuple[str, int] | None = None) -> Iterator[tuple[str, int, bytes, bool, int]]:
        """(segment, line number, raw line, complete, end offset) for every line of every
        segment, or only those after byte `start[1]` of segment `start[0]`."""
        segs = self.segments()
        if start is not None:
            segs = segs[segs.index(start[0]):] if start[0] in segs else []
        for seg in segs:
            skip = start[1] if start is not None and seg == start[0] else 0
            try:
                with open(self._path(seg), "rb", opener=_ro_opener) as fh:
                    fh.seek(skip)
                    data = fh.read()
            except OSError as exc:
                if isinstance(exc, PermissionError):
                    raise
                raise LedgerError(f"cannot read {self._path(seg)}: {exc.strerror or exc}") from None
            parts = data.split(b"\n")
            end = skip
            for n, raw in enumerate(parts[:-1], 1):
                end += len(raw) + 1
                yield seg, n, raw, True, end
            if parts[-1]:
                yield seg, len(parts), parts[-1], False, end + len(parts[-1])

    def records(self, start: tuple[str, int] | None = None, *, with_end: bool = False) -> Iterator:
        """Every complete, parseable record in order (what `show` and recovery fold; `verify`
        judges the lines); with_end: (record, segment, end offset)."""
        for seg, _n, raw, complete, end in self.lines(start):
            if complete:
                rec = _parse(raw)
                if rec is not None:
                    yield (rec, seg, end) if with_end else rec

    def digests(self) -> list[dict]:
        """A digest of every record (what `list` folds): the summary, caught up from the ledger
        where it lags behind HEAD; the whole ledger when there is no usable summary."""
        from modelscand.quarantine.index import decode_digest, digest, encode_digest

        out: list = []
        try:
            with open(self._path(self.SUMMARY), "rb", opener=_ro_opener) as fh:
                data = fh.read()
            out = [decode_digest(line) for line in data.splitlines()]
        except FileNotFoundError:
            pass
        if None in out:
            out = []  # damaged: the ledger decides

        def same(rec: dict, seg: str, end: int) -> dict:  # exactly what the summary would have held
            return decode_digest(encode_digest(digest(rec, seg, end)))
        head = self.head() or {}
        last = out[-1] if out else None
        mark = last.get("hash") or "-" if last is not None else "-"
        if last is not None and last.get("seq") == head.get("seq") and str(head.get("hash")).startswith(mark):
            return out
        if last is not None and isinstance(last.get("seq"), int) and last["seq"] < head.get("seq", 0):
            tail = list(self.records((last.get("seg"), last.get("end", 0)), with_end=True))
            if tail and tail[0][0].get("seq") == last["seq"] + 1 and str(tail[0][0].get("prev")).startswith(mark):
                return out + [same(rec, seg, end) for rec, seg, end in tail]
        return [same(rec, seg, end) for rec, seg, end in self.records(with_end=True)]

    def records_of(self, qid: str) -> list[dict]:
        """Every record of one id, read where the digests say they are (no full parse); from
        the whole ledger when the digests know no such id or a record is not where they say."""
        digests = self.digests()
        spans, start = [], {}
        for d in digests:
            seg = d["seg"]
            if d["id"] == qid:
                spans.append((d, seg, start.get(seg, 0)))
            start[seg] = d["end"]
        out = []
        for d, seg, begin in spans:
            try:
                with open(self._path(seg), "rb", opener=_ro_opener) as fh:
                    fh.seek(begin)
                    rec = _parse(fh.read(d["end"] - begin).rstrip(b"\n"))
            except OSError:
                rec = None
            if rec is None or rec.get("id") != qid or rec.get("seq") != d["seq"] or \
                    not str(rec.get("hash")).startswith(d["hash"] or "-"):
                out = []
                break
            out.append(rec)
        return out or [r for r in self.records() if r.get("id") == qid]

    def head(self) -> dict | None:
        try:
            with open(self._path(self.HEAD), "rb", opener=_ro_opener) as fh:
                return json.loads(fh.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"unreadable": True}

    def verify(self) -> tuple[int, list[str]]:
        """(records checked, problems): every hash, every link of the chain, sequence, HEAD."""
        problems: list[str] = []
        prev, seq, count = GENESIS, 0, 0
        segs = self.segments()
        for seg, n, raw, complete, _end in self.lines():
            where = f"{seg}:{n}"
            if not complete:
                problems.append(f"{where}: a record cut short" + ("" if seg == segs[-1] else " inside the ledger"))
                continue
            rec = _parse(raw)
            if rec is None or not isinstance(rec.get("hash"), str):
                problems.append(f"{where}: not a ledger record (edited or corrupt)")
                continue
            count += 1
            if record_hash(rec) != rec["hash"]:
                problems.append(f"{where}: seq {rec.get('seq')}: its hash does not match its content (edited)")
            elif canonical(rec) != raw:
                problems.append(f"{where}: seq {rec.get('seq')}: not in canonical form (edited)")
            if rec.get("prev") != prev:
                problems.append(f"{where}: seq {rec.get('seq')}: does not chain to the record before it "
                                f"(a record was inserted, removed or rewritten before it)")
            if rec.get("seq") != seq + 1:
                problems.append(f"{where}: seq {rec.get('seq')} follows seq {seq} (records missing or reordered)")
            if rec.get("type") == "ledger.damaged":
                lost = rec.get("lost") or {}
                problems.append(f"{where}: seq {rec.get('seq')}: records were lost before it: the ledger ended at seq "
                                f"{lost.get('last_seq')} where HEAD named seq {lost.get('head_seq')}"
                                + (f" (the cut bytes are kept in {(rec.get('torn') or {}).get('saved')})"
                                   if rec.get("torn") else ""))
            prev = rec["hash"]
            seq = rec["seq"] if isinstance(rec.get("seq"), int) else seq + 1
        head = self.head()
        if head is not None:
            if head.get("unreadable"):
                problems.append(f"{self._path(self.HEAD)} is unreadable")
            elif head.get("seq", 0) > seq:
                problems.append(f"the ledger ends at seq {seq} but HEAD says seq {head['seq']}: records were cut "
                                f"from the end")
            elif head.get("seq") == seq and head.get("hash") != prev:
                problems.append(f"the last record (seq {seq}) is not the one HEAD names: it was rewritten")
        elif count:
            problems.append(f"{self._path(self.HEAD)} is missing")
        return count, problems


class Follower:
    """Reads the records appended since the last call (the daemon's view of CLI restores)."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.segment: str | None = None
        self.offset = 0

    def poll(self) -> list[dict]:
        out: list[dict] = []
        segs = self.ledger.segments()
        if self.segment is not None and self.segment in segs:
            segs = segs[segs.index(self.segment):]
        elif self.segment is not None:  # our segment vanished: nothing sane to resume from
            segs = segs[-1:]
            self.offset = 0
        for seg in segs:
            if seg != self.segment:
                self.segment, self.offset = seg, 0
            try:
                with open(self.ledger._path(seg), "rb", opener=_ro_opener) as fh:
                    fh.seek(self.offset)
                    data = fh.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n")
            if end < 0:
                continue
            for raw in data[:end].split(b"\n"):
                rec = _parse(raw)
                if rec is not None:
                    out.append(rec)
            self.offset += end + 1
        return out


def _parse(raw: bytes) -> dict | None:
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _ro_opener(path: str, flags: int) -> int:
    return os.open(path, flags | _FILE_FLAGS)
