"""Quarantine mode: the daemon's `Action` once a verdict has been logged.

What is moved: a finding at or above ``scan.severity_threshold``; bytes already quarantined
once (same sha256: a re-download) whatever the scan of the copy says, unless it now reads as
clean; with ``quarantine.fail_closed`` also ``error``/``incomplete`` verdicts. Never: bytes
whose hash a restore allowed, and our own tombstones (recognised by their exact sha256).

The first quarantine of some bytes is the alert: a ``quarantine.moved`` warning and the
configured hook. A repeat (a re-download of bytes already quarantined) is moved at once as
well, logged as ``quarantine.repeat`` with the first id, and alerts no one again. With a
tombstone in the file's place the downloader finds its file and the loader fails naming the
quarantine, so there is no download loop to begin with.

The ledger is the only state. The index here follows it (`Follower`), so a restore done by
``modelscand quarantine restore`` in another process is seen before the next decision.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import threading
import time
from typing import Callable

from modelscan_core._version import __version__ as CORE_VERSION
from modelscan_core.model import Severity

from modelscand import logging as mlog
from modelscand.quarantine import QuarantineError, mover, tombstone
from modelscand.quarantine.index import Index
from modelscand.quarantine.ledger import Follower
from modelscand.quarantine.store import Store

_REPEATABLE = ("issues", "error", "incomplete")


class QuarantineAction:
    name = "quarantine"

    def __init__(self, config, *, fingerprint: str | None = None):
        q = config.data["quarantine"]
        self.threshold = config.threshold
        self.fail_closed = bool(q["fail_closed"])
        self.store = Store.from_config(config)
        self.scanner = {"version": CORE_VERSION, "fingerprint": fingerprint}
        self.log = mlog.get()
        self.index = Index(detail=False)
        self._tombstones: set[str] = set()
        self._follower = Follower(self.store.ledger)
        self._lock = threading.Lock()
        self.hook = Hook(list(q["hook"]), float(q["hook_timeout"]), self.store.ledger,
                         self._hook_recorded) if q["hook"] else None

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Before the daemon reports ready: finish whatever a kill interrupted, read the ledger."""
        from modelscand.config import ConfigError

        try:
            self.store.dirs.ensure_primary()
            recovered = mover.recover(self.store)
        except QuarantineError as exc:  # no usable quarantine: refuse to run rather than fail open
            raise ConfigError(f"quarantine: {exc}") from None
        for rec in recovered:
            level = "error" if rec.get("type") == "recovery.failed" else "warning"
            getattr(self.log, level)("quarantine.recovered", id=rec.get("id"), record=rec.get("type"),
                                     reason=rec.get("reason") or rec.get("error") or rec.get("note"))
        with self._lock:
            self._refresh()
            pending = self.index.pending_hooks()
        if pending and self.hook is None:
            self.log.warning("quarantine.hook_pending", ids=pending[:20], count=len(pending),
                             why="moves recorded with a hook due, and no quarantine.hook configured now: not run")
        elif pending:
            self.log.warning("quarantine.hook_due", ids=pending[:20], count=len(pending),
                             why="a kill or a stop came between the move and its hook: running it now")
            for qid in pending:
                self.hook.submit(qid, lambda qid=qid: self._hook_record(qid, recovered=True))

    def _hook_recorded(self, qid: str) -> bool:
        with self._lock:
            self._refresh()
            return not self.index.hook_pending(qid)

    def _hook_record(self, qid: str, recovered: bool = False) -> dict | None:
        """What the hook gets on stdin, from the ledger: the move's begin and done records."""
        recs = self.store.ledger.records_of(qid)
        begin = next((r for r in recs if r.get("type") == "quarantine.begin"), None)
        done = next((r for r in reversed(recs) if r.get("type") == "quarantine.done"), None)
        if begin is None or done is None:
            return None
        return {"event": "quarantine", "id": qid, "begin": begin, "done": done, "recovered": recovered}

    def stop(self, timeout: float = 5.0) -> None:
        if self.hook is not None:
            self.hook.close(timeout)

    def _refresh(self) -> None:
        for rec in self._follower.poll():
            self.index.add(rec)
            if rec.get("type") == "quarantine.begin" and rec.get("id"):
                for kind in (tombstone.PICKLE, tombstone.SAFETENSORS):
                    self._tombstones.add(hashlib.sha256(tombstone.build(rec["id"], kind)).hexdigest())

    # -- the decision ----------------------------------------------------------------------------
    def is_tombstone(self, sha256: str | None, size: int) -> bool:
        """One of our own tombstones (exact bytes of a ledger id): neither a finding nor a move."""
        if not sha256 or size > tombstone.MAX_SIZE:
            return False
        with self._lock:
            self._refresh()
            return sha256 in self._tombstones

    def acts_on(self, row) -> bool:
        """Would this action move a file whose cached verdict is `row` (a baseline Row)? Such
        a verdict is not settled while the file is still in place: a kill between the
        verdict and the move, a `modelscand scan` or a detect-mode run that shares the state
        dir, a move that failed, all leave a cached finding whose file never moved. The
        scheduler and the walks scan it again, and the move follows. Never for bytes a
        restore allowed, nor for our own tombstones."""
        if row.verdict not in _REPEATABLE:
            return False
        try:
            severity = Severity.parse(row.severity) if row.severity else None
        except ValueError:
            severity = None
        with self._lock:
            self._refresh()
            if row.sha256 in self._tombstones or self.index.allowed_by(row.sha256):
                return False
            first = self.index.first_by_sha.get(row.sha256) if row.sha256 else None
        return self._reason_for(row.verdict, severity, first) is not None

    def handle(self, outcome) -> dict | None:
        started = time.monotonic()
        sha = outcome.sha256
        with self._lock:
            self._refresh()
            if sha in self._tombstones:
                self.log.debug("quarantine.tombstone_seen", path=outcome.path)
                return None
            first = self.index.first_by_sha.get(sha) if sha else None
            allowed = self.index.allowed_by(sha)
        reason = self._reason(outcome, first)
        if reason is None:
            return None
        if allowed:
            self.log.info("quarantine.allowed", path=outcome.path, sha256=sha, restored_as=allowed,
                          why="these bytes were restored by an operator; left in place")
            return {"action": "allowed", "id": allowed}
        extra = outcome.extra or {}
        if extra.get("outside_roots"):
            self.log.error("quarantine.not_moved", path=outcome.path, via=extra.get("via"), sha256=sha, reason=reason,
                           why="reached through a link, outside every watched root: the daemon moves nothing it "
                               "does not watch", answer="act on it by hand (or remove the link)")
            return {"action": "outside_roots"}
        if extra.get("root_gone"):
            self.log.warning("quarantine.not_moved", path=outcome.path, sha256=sha, reason=reason,
                             why="its root is no longer watched (a reload removed it, or it moved away) since the "
                                 "scan began: the daemon moves nothing it does not watch",
                             answer="act on it by hand, or watch the root again")
            return {"action": "root_gone"}
        ident = outcome.identity
        scanned = (ident.dev, ident.ino, ident.size, ident.mtime_ns, ident.ctime_ns) if ident is not None else None
        subject = mover.Subject(outcome.root or os.path.dirname(outcome.path), outcome.path, scanned, sha)
        meta = {
            "reason": reason, "verdict": outcome.verdict,
            "severity": outcome.severity.name.lower() if outcome.severity is not None else None,
            "format": extra.get("format"), "rule_ids": list(outcome.rule_ids), "findings": list(outcome.findings),
            "errors": list(extra.get("errors") or []), "scan_error": extra.get("error"), "scanner": self.scanner,
            "repeat_of": first, "threshold": self.threshold.name.lower(), "via": extra.get("via"),
            "hook_due": self.hook is not None and not first,  # the alert, until hook.done says it ran
        }
        try:
            begin, done = mover.quarantine(self.store, subject, meta)
        except mover.Changed as exc:
            self.log.info("quarantine.not_moved", path=outcome.path, why=str(exc),
                          answer="nothing moved; the file is scanned again as it is now")
            return {"action": "changed"}
        except (QuarantineError, OSError) as exc:
            self.log.error("quarantine.failed", path=outcome.path, sha256=sha, reason=reason,
                           error=str(exc) if isinstance(exc, QuarantineError) else f"{exc.strerror or exc}",
                           answer="the file is still in place: act on it by hand")
            return {"action": "failed"}
        with self._lock:
            self._refresh()
            times = self.index.times_by_sha.get(sha, 1)
        fields = dict(id=done["id"], path=outcome.path, sha256=sha, severity=meta["severity"], reason=reason,
                      tombstone=done.get("tombstone"), other_links=done.get("other_links"),
                      ms=round((time.monotonic() - started) * 1000, 2))
        if done.get("changed_during_move"):
            self.log.warning("quarantine.changed_during_move", id=done["id"], path=outcome.path,
                             why="a writer still held the file open; the quarantined bytes differ from the scan")
        if first:
            self.log.info("quarantine.repeat", repeat_of=first, times=times,
                          note="the same bytes again (a re-download?): moved at once, alerted before", **fields)
            return {"action": "repeat", "id": done["id"]}
        self.log.warning("quarantine.moved", show=f"modelscand quarantine show {done['id']}", **fields)
        if self.hook is not None:
            self.hook.submit(done["id"], {"event": "quarantine", "id": done["id"], "begin": begin, "done": done})
        return {"action": "quarantine", "id": done["id"]}

    def _reason(self, outcome, first: str | None) -> str | None:
        return self._reason_for(outcome.verdict, outcome.severity, first)

    def _reason_for(self, verdict: str, severity: Severity | None, first: str | None) -> str | None:
        if verdict == "issues" and severity is not None and severity >= self.threshold:
            return "repeat" if first else "finding"
        if first and verdict in _REPEATABLE:
            return "repeat"  # bytes known to be bad, whatever this scan could or could not read
        if self.fail_closed and verdict in ("error", "incomplete"):
            return "fail_closed"
        return None


class Hook:
    """The operator's command per first quarantine (ClamAV's VirusEvent, without a shell):
    argv as configured, the record as JSON on stdin, killed with its process group after
    ``hook_timeout`` seconds, run on one thread so a slow hook never delays a move.

    At least once per event, across kills and restarts: the move's ``quarantine.begin`` says
    the hook is due, and a ``hook.done`` record (with how it ended) is written once it has run.
    A start runs every hook still due (a move finished by recovery, a kill between the move
    and the hook, a stop before the queue drained). A run is never repeated once its
    ``hook.done`` is recorded; only a kill between the run and that record repeats it."""

    #: ids whose hook is queued or running in this process (a reload starts a second Hook
    #: while the first may still be busy: one run per event, not one per Hook)
    _claimed: set[str] = set()
    _claimed_lock = threading.Lock()

    def __init__(self, argv: list[str], timeout: float, ledger=None, recorded=None):
        self.argv, self.timeout = argv, timeout
        self.ledger = ledger  # where hook.done goes (None: nothing is recorded, as in unit tests)
        self.recorded = recorded or (lambda qid: False)  # has hook.done been written for qid?
        self.log = mlog.get()
        self._jobs: queue.Queue = queue.Queue()  # ids are small; records are built when run
        self._thread = threading.Thread(target=self._run, name="modelscand-quarantine-hook", daemon=True)
        self._start_lock = threading.Lock()

    def submit(self, qid: str, record: dict | Callable[[], dict | None]) -> None:
        with self._claimed_lock:
            if qid in self._claimed:
                return
            self._claimed.add(qid)
        with self._start_lock:
            if self._thread.ident is None:
                self._thread.start()
        self._jobs.put((qid, record))

    def close(self, timeout: float) -> None:
        """Stop after the hooks queued so far, waiting at most `timeout`; any still due when
        it returns stay due in the ledger and run at the next start."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            qid, record = job
            try:
                if self.recorded(qid):
                    continue  # another Hook of this process (before a reload) ran it
                if callable(record):
                    record = record()
                    if record is None:
                        continue
                outcome = self._one(qid, record)
                if self.ledger is not None:
                    self.ledger.append("hook.done", id=qid, **outcome)
            except Exception as exc:  # the hook thread must outlive any one run
                self.log.error("quarantine.hook_failed", id=qid, error=f"{type(exc).__name__}: {exc}",
                               note="still due: run again at the next start")
            finally:
                with self._claimed_lock:
                    self._claimed.discard(qid)

    def _one(self, qid: str, record: dict) -> dict:
        """Run the hook once; how it ended (what ``hook.done`` records)."""
        data = json.dumps(record, default=str).encode()
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, close_fds=True)
        except OSError as exc:
            self.log.warning("quarantine.hook_failed", id=qid, argv=self.argv, error=exc.strerror or str(exc))
            return {"outcome": "not_started", "error": exc.strerror or str(exc)}
        try:
            _out, err = proc.communicate(data, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            self.log.warning("quarantine.hook_failed", id=qid, argv=self.argv,
                             error=f"did not finish within {self.timeout:g}s (quarantine.hook_timeout); killed")
            return {"outcome": "timeout"}
        if proc.returncode != 0:
            self.log.warning("quarantine.hook_failed", id=qid, argv=self.argv, exit=proc.returncode,
                             stderr=err.decode(errors="replace")[-500:])
            return {"outcome": "failed", "exit": proc.returncode}
        self.log.info("quarantine.hook_ran", id=qid, recovered=bool(record.get("recovered")))
        return {"outcome": "ok", "exit": 0}
