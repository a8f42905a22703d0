"""The ledger folded into what operators and the daemon ask about: entries and hashes.

One entry per quarantine id. Its state follows from the last record of the id:

  quarantine.begin/.copied -> quarantining   (a move in progress, or interrupted)
  quarantine.done          -> quarantined
  quarantine.aborted       -> aborted        (nothing was moved: the file left or changed)
  restore.begin/.placed    -> restoring      restore.done -> restored   restore.aborted -> quarantined
  purge.begin              -> purging        purge.done   -> purged     purge.aborted   -> quarantined

The allow-list is derived, not stored: a hash is allowed while an entry with that hash is
restoring or restored. ``restore.begin`` is fsync'd before the file goes back, so the daemon
sees the hash allowed before the restored file lands in a watched root.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

STATES = ("quarantining", "quarantined", "aborted", "restoring", "restored", "purging", "purged")
UNFINISHED = ("quarantining", "restoring", "purging")
_NEXT = {
    "quarantine.begin": "quarantining",
    "quarantine.copied": "quarantining",
    "quarantine.done": "quarantined",
    "quarantine.aborted": "aborted",
    "restore.begin": "restoring",
    "restore.placed": "restoring",
    "restore.done": "restored",
    "restore.aborted": "quarantined",
    "purge.begin": "purging",
    "purge.done": "purged",
    "purge.aborted": "quarantined",
}


@dataclass
class Entry:
    id: str
    sha256: str | None
    state: str
    time: float
    updated: float
    begin: dict | None = None  # the full quarantine.begin record (detail indexes only)
    records: list[dict] = field(default_factory=list)  # every record of this id (detail only)

    def last(self, type_: str) -> dict | None:
        for rec in reversed(self.records):
            if rec.get("type") == type_:
                return rec
        return None


class Index:
    def __init__(self, detail: bool = True):
        self.detail = detail
        self.entries: dict[str, Entry] = {}
        self.first_by_sha: dict[str, str] = {}
        self.times_by_sha: collections.Counter = collections.Counter()
        self._allowed: dict[str, set[str]] = {}
        self.orphans: list[dict] = []  # records naming an id with no quarantine.begin

    @classmethod
    def of(cls, records, detail: bool = True) -> "Index":
        idx = cls(detail)
        for rec in records:
            idx.add(rec)
        return idx

    def add(self, rec: dict) -> None:
        kind = rec.get("type")
        state = _NEXT.get(kind)
        qid = rec.get("id")
        if state is None or not isinstance(qid, str):
            return
        entry = self.entries.get(qid)
        if kind == "quarantine.begin":
            entry = Entry(qid, rec.get("sha256"), state, rec.get("time", 0.0), rec.get("time", 0.0),
                          rec if self.detail else None)
            self.entries[qid] = entry
        elif entry is None:
            self.orphans.append(rec)
            return
        was = entry.state
        entry.state, entry.updated = state, rec.get("time", entry.updated)
        if self.detail:
            entry.records.append(rec)
        sha = entry.sha256
        if not sha:
            return
        if kind == "quarantine.done":
            self.first_by_sha.setdefault(sha, qid)
            self.times_by_sha[sha] += 1
        if state in ("restoring", "restored"):
            self._allowed.setdefault(sha, set()).add(qid)
        elif was in ("restoring", "restored"):
            self._allowed.get(sha, set()).discard(qid)

    def allowed_by(self, sha256: str | None) -> str | None:
        """The id of a restore that allows these bytes, if any."""
        ids = self._allowed.get(sha256 or "")
        return min(ids) if ids else None

    def unfinished(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.state in UNFINISHED]
