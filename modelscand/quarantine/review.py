"""What operators ask of the quarantine, as data: list, show, restore, purge, verify.

The CLI renders these; tests assert on them. Reading (list, show) never takes the lock and
never writes. Everything that writes (restore, purge, verify) first runs `mover.recover` so it
never acts on an entry a kill left half done.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time

from modelscand.quarantine import QuarantineError
from modelscand.quarantine.index import Entry, Index, worst
from modelscand.quarantine.ledger import iso
from modelscand.quarantine.store import Store, open_private_dir

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'90s', '15m', '24h', '30d', '2w' -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise QuarantineError(f"{text!r} is not a duration (like 30d, 24h, 15m, 2w)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_since(text: str, now: float | None = None) -> float:
    """A duration back from now, or an ISO date/time (UTC unless it says otherwise)."""
    now = time.time() if now is None else now
    if _DURATION.match(text):
        return now - parse_age(text)
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise QuarantineError(f"--since {text!r}: expected a duration (7d, 24h) or a date (2026-11-01)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def describe_finding(f: dict | None) -> str:
    if not f:
        return ""
    what = f.get("call") or ".".join(p for p in (f.get("module"), f.get("operator")) if p) or f.get("description") or ""
    return what or f.get("rule_id") or ""


def summary(e: Entry) -> dict:
    """One line of `list`: id, when, where, repo/file, worst finding, state."""
    b = e.begin
    hf = b.get("hf") or {}
    top = worst(b.get("findings") or [])
    return {
        "id": e.id, "time": e.time, "when": iso(e.time), "state": e.state, "path": b.get("path"),
        "user": b.get("owner", {}).get("user"), "uid": b.get("owner", {}).get("uid"),
        "size": b.get("identity", {}).get("size"), "sha256": e.sha256,
        "severity": b.get("severity"), "verdict": b.get("verdict"), "reason": b.get("reason"),
        "worst": {"severity": top.get("severity"), "rule_id": top.get("rule_id"), "what": describe_finding(top)}
        if top else None,
        "repo": hf.get("repo_id"), "repo_type": hf.get("repo_type"),
        "files": [{"revision": f.get("revision"), "file": f.get("file")} for f in hf.get("files") or []],
        "repeat_of": b.get("repeat_of"), "updated": e.updated,
    }


def select(index: Index, *, since: float | None = None, user: str | None = None, repo: str | None = None,
           state: str | None = None) -> list[Entry]:
    out = []
    for e in index.entries.values():
        b = e.begin
        if since is not None and e.time < since:
            continue
        if state is not None and e.state != state:
            continue
        if user is not None:
            owner = b.get("owner") or {}
            if user not in (owner.get("user"), str(owner.get("uid"))):
                continue
        if repo is not None:
            rid = (b.get("hf") or {}).get("repo_id") or ""
            if repo != rid and repo not in rid:
                continue
        out.append(e)
    out.sort(key=lambda e: (e.time, e.id))
    return out


def entry(store: Store, qid: str) -> Entry:
    e = Index.of(store.ledger.records_of(qid)).entries.get(qid)
    if e is None:
        raise QuarantineError(f"no quarantine entry {qid!r} (see 'modelscand quarantine list')")
    return e


def restore(store: Store, qid: str, force: bool = False) -> dict:
    from modelscand.quarantine import mover

    mover.recover(store)
    return mover.restore(store, qid, force=force, by=mover.who())


def purge_candidates(index: Index, older_than: float, now: float | None = None) -> list[Entry]:
    now = time.time() if now is None else now
    return sorted((e for e in index.entries.values() if e.state == "quarantined" and now - e.time > older_than),
                  key=lambda e: e.time)


def purge(store: Store, *, ids: list[str] = (), older_than: float | None = None, dry_run: bool = False) -> list[dict]:
    """Purge `ids`, or every entry older than `older_than` seconds; one record pair per file."""
    from modelscand.quarantine import mover

    if not dry_run:
        mover.recover(store)
    index = store.index()
    if ids:
        targets = []
        for qid in ids:
            e = index.entries.get(qid)
            if e is None:
                raise QuarantineError(f"no quarantine entry {qid!r} (see 'modelscand quarantine list')")
            if e.state != "quarantined":
                raise QuarantineError(f"{qid} is {e.state}, not quarantined: nothing to purge")
            targets.append(e)
        why = "by id"
    else:
        targets = purge_candidates(index, older_than or 0)
        why = f"older than {older_than / 86400:g} days"
    if dry_run:
        return [{"id": e.id, "path": e.begin.get("path"), "dry_run": True} for e in targets]
    by = mover.who()
    return [mover.purge(store, e.id, reason=why, by=by) | {"path": e.begin.get("path")} for e in targets]


def verify(store: Store) -> dict:
    """The chain and every file: a non-empty ``problems`` means a mismatch."""
    from modelscand.quarantine import mover

    recovered = mover.recover(store)
    records, problems = store.ledger.verify()
    index = store.index()
    for rec in index.orphans:
        problems.append(f"seq {rec.get('seq')}: a {rec.get('type')} record for an id with no quarantine.begin "
                        f"({rec.get('id')})")
    held: dict[str, set[str]] = {store.dirs.primary: set(), **{d: set() for d in store.dirs.extra}}
    checked = 0
    for e in index.entries.values():
        b = e.begin
        names = held.setdefault(b["dir"], set())
        expect_file = e.state not in ("aborted", "restored", "purged")
        if expect_file:
            names.add(b["name"])
        problem, hashed = _check_file(b, e, expect_file)
        checked += hashed
        if problem:
            problems.append(f"{e.id}: {problem}")
    for qdir, names in sorted(held.items()):
        try:
            present = os.listdir(qdir)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"{qdir}: {exc.strerror or exc}")
            continue
        for name in sorted(set(present) - names):
            problems.append(f"{os.path.join(qdir, name)}: in the quarantine but no ledger entry holds it")
    return {"records": records, "entries": len(index.entries), "files_checked": checked, "problems": problems,
            "recovered": [r.get("id") for r in recovered]}


def _check_file(b: dict, e: Entry, expect_file: bool) -> tuple[str | None, int]:
    from modelscand.quarantine import mover

    try:
        qfd = open_private_dir(b["dir"])
    except QuarantineError as exc:
        return (str(exc) if expect_file else None), 0
    try:
        try:
            fd = mover.open_quarantined(qfd, b["name"])
        except FileNotFoundError:
            return (f"{e.state}, but its file {b['dir']}/{b['name']} is missing" if expect_file else None), 0
        try:
            if not expect_file:
                return f"{e.state}, but a file is still at {b['dir']}/{b['name']}", 0
            done = e.last("quarantine.done") or {}
            want = done.get("sha256") or b.get("sha256")
            got = mover.hash_fd(fd)
            if got != want:
                return f"the file {b['dir']}/{b['name']} has sha256 {got}, the ledger says {want}", 1
            return None, 1
        finally:
            os.close(fd)
    finally:
        os.close(qfd)
