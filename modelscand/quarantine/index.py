"""The ledger folded into what operators and the daemon ask about: entries and hashes.

One entry per quarantine id. Its state follows from the last record of the id:

  quarantine.begin/.copied -> quarantining   (a move in progress, or interrupted)
  quarantine.done          -> quarantined
  quarantine.aborted       -> aborted        (nothing was moved: the file left or changed)
  restore.begin/.placed    -> restoring      restore.done -> restored   restore.aborted -> quarantined
  purge.begin              -> purging        purge.done   -> purged     purge.aborted   -> quarantined

`digest()` keeps of a record only what ``list`` shows; the ledger writes one per record to
``summary.tsv`` (tab-separated: splitting is ~10x cheaper than parsing JSON) so that listing
10,000 entries never parses 10,000 sets of findings.

The operator's hook is derived the same way: a ``quarantine.begin`` with ``hook_due`` (a hook
was configured and the bytes were new) whose move is done and which has no ``hook.done`` record
yet is pending (`pending_hooks`), whichever process or start finished the move.

The allow-list is derived, not stored: a hash is allowed while an entry with that hash is
restoring or restored. ``restore.begin`` is fsync'd before the file goes back, so the daemon
sees the hash allowed before the restored file lands in a watched root.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field

_RANK = {"low": 1, "medium": 2, "high": 3, "critical": 4}
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
    def __init__(self, detail: bool = True, history: bool = True):
        self.detail = detail  # keep each entry's begin record
        self.history = detail and history  # and every record of it
        self.entries: dict[str, Entry] = {}
        self.first_by_sha: dict[str, str] = {}
        self.times_by_sha: collections.Counter = collections.Counter()
        self._allowed: dict[str, set[str]] = {}
        self.orphans: list[dict] = []  # records naming an id with no quarantine.begin
        self._hook_due: dict[str, bool] = {}  # id -> its move is done (insertion order: oldest first)

    @classmethod
    def of(cls, records, detail: bool = True, history: bool = True) -> "Index":
        idx = cls(detail, history)
        for rec in records:
            idx.add(rec)
        return idx

    def add(self, rec: dict) -> None:
        kind = rec.get("type")
        state = _NEXT.get(kind)
        qid = rec.get("id")
        if kind == "hook.done" and isinstance(qid, str):
            self._hook_due.pop(qid, None)
            entry = self.entries.get(qid)
            if entry is not None and self.history:
                entry.records.append(rec)
            return
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
        if self.history:
            entry.records.append(rec)
        if kind == "quarantine.begin" and rec.get("hook_due"):
            self._hook_due[qid] = False
        elif kind == "quarantine.done" and qid in self._hook_due:
            self._hook_due[qid] = True
        elif kind == "quarantine.aborted":
            self._hook_due.pop(qid, None)  # nothing was moved: nothing to alert about
        if kind == "quarantine.done" and rec.get("sha256"):
            entry.sha256 = rec["sha256"]  # hashed once out of reach (the scan may have had no time to)
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

    def pending_hooks(self) -> list[str]:
        """Ids whose move is done and whose hook has not run (no ``hook.done``), oldest first."""
        return [qid for qid, moved in self._hook_due.items() if moved]

    def hook_pending(self, qid: str) -> bool:
        return bool(self._hook_due.get(qid))

    def unfinished(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.state in UNFINISHED]


def worst(findings: list[dict]) -> dict | None:
    return max(findings, key=lambda f: _RANK.get(f.get("severity") or "", 0), default=None)


def digest(rec: dict, seg: str, end: int) -> dict:
    """A record reduced to what `list` shows (same keys, fewer of them): for a begin record,
    the worst finding only and the HF repo and file names; for others, type, id and time.
    ``seg``/``end`` say where the record ends in the ledger (where to catch up from), ``hash``
    is a 16-hex prefix (enough to tell the summary is in step with HEAD)."""
    d = {"seq": rec.get("seq"), "hash": (rec.get("hash") or "")[:16], "type": rec.get("type"), "id": rec.get("id"),
         "time": rec.get("time"), "seg": seg, "end": end}
    if rec.get("type") == "quarantine.begin":
        for key in ("path", "owner", "sha256", "severity", "verdict", "reason", "repeat_of"):
            d[key] = rec.get(key)
        d["identity"] = {"size": (rec.get("identity") or {}).get("size")}
        top = worst(rec.get("findings") or [])
        if top:
            top = {k: top[k] for k in ("severity", "rule_id", "call", "module", "operator") if top.get(k)} or \
                {"severity": top.get("severity"), "description": (top.get("description") or "")[:100]}
        d["findings"] = [top] if top else []
        hf = rec.get("hf")
        if hf:
            d["hf"] = {"repo_type": hf.get("repo_type"), "repo_id": hf.get("repo_id"),
                       "files": [{"revision": f.get("revision"), "file": f.get("file")} for f in hf.get("files") or []]}
    return d


_BASE = ("seq", "hash", "seg", "end", "type", "id", "time")
_BEGIN = ("path", "uid", "user", "sha256", "severity", "verdict", "reason", "repeat_of", "size",
          "worst_severity", "worst_rule", "worst_what", "repo_type", "repo_id", "files")
_TSV_VERSION = "d1"


def _esc(value) -> str:
    text = "" if value is None else str(value)
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text


def _unesc(text: str) -> str | None:
    if not text:
        return None
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append({"t": "\t", "n": "\n", "r": "\r"}.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def encode_digest(d: dict) -> bytes:
    """One tab-separated line for ``summary.tsv``."""
    fields = [_TSV_VERSION] + [_esc(d.get(k)) for k in _BASE]
    if d.get("type") == "quarantine.begin":
        top = (d.get("findings") or [None])[0] or {}
        hf = d.get("hf") or {}
        owner = d.get("owner") or {}
        fields += [_esc(v) for v in (
            d.get("path"), owner.get("uid"), owner.get("user"), d.get("sha256"), d.get("severity"), d.get("verdict"),
            d.get("reason"), d.get("repeat_of"), (d.get("identity") or {}).get("size"), top.get("severity"),
            top.get("rule_id"), top.get("call") or ".".join(p for p in (top.get("module"), top.get("operator")) if p)
            or top.get("description"), hf.get("repo_type"), hf.get("repo_id"),
            json.dumps(hf["files"], separators=(",", ":")) if hf.get("files") else None)]
    return "\t".join(fields).encode("utf-8", "backslashreplace")


def decode_digest(line: bytes) -> dict | None:
    """The digest dict (as `digest()` returns it) from a ``summary.tsv`` line; None if malformed."""
    parts = line.decode("utf-8", "backslashreplace").split("\t")
    if parts[0] != _TSV_VERSION or len(parts) not in (1 + len(_BASE), 1 + len(_BASE) + len(_BEGIN)):
        return None
    try:  # seq, hash, segment, offset, type, id, time: never escaped (digits, hex, ASCII names)
        d = {"seq": int(parts[1]), "hash": parts[2], "seg": parts[3], "end": int(parts[4]), "type": parts[5],
             "id": parts[6], "time": float(parts[7])}
    except ValueError:
        return None
    if len(parts) > 8:  # the order of _BEGIN; only free text can hold an escape
        path, uid, user, sha, sev, verdict, reason, repeat, size, wsev, wrule, what, rtype, rid, files = parts[8:]
        d.update(path=_unesc(path), sha256=sha or None, severity=sev or None, verdict=verdict or None,
                 reason=reason or None, repeat_of=repeat or None,
                 owner={"uid": int(uid) if uid else None, "user": _unesc(user)},
                 identity={"size": int(size) if size else None},
                 findings=[{"severity": wsev or None, "rule_id": _unesc(wrule), "call": _unesc(what)}]
                 if wsev or wrule else [])
        if rid:
            d["hf"] = {"repo_type": rtype or None, "repo_id": _unesc(rid), "files": json.loads(_unesc(files) or "[]")}
    return d
