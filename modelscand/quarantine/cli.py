"""``modelscand quarantine list|show|restore|purge|verify``: review what the daemon moved.

Same ``--config`` / ``--state-dir`` as ``run``. Errors are one line on stderr and an exit code:

  0   done (verify: chain intact and every file matches)
  1   verify found a mismatch (a record edited/removed, a file missing or changed)
  2   refused or failed: unknown id, restore conflict without --force, hash mismatch, I/O error
  4   usage error
  75  busy: another operation holds the quarantine lock
  77  permission denied (the ledger is root's: run with sudo)
  78  config or state dir error
"""

from __future__ import annotations

import gc
import json
import sys
import time

from modelscand.text import escape_controls
from modelscand.quarantine import QuarantineError, review
from modelscand.quarantine.index import STATES
from modelscand.quarantine.ledger import Busy
from modelscand.quarantine.store import Store

EXIT_MISMATCH, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY, EXIT_NOPERM, EXIT_CONFIG, EXIT_SOFTWARE = 1, 2, 4, 75, 77, 78, 70


def add_parser(sub, common) -> None:
    q = sub.add_parser("quarantine", help="review the quarantine: list, show, restore, purge, verify")
    qs = q.add_subparsers(dest="qcommand", parser_class=type(q))
    lst = qs.add_parser("list", help="a table of quarantine entries (newest last)")
    common(lst)
    lst.add_argument("--since", help="only entries since a duration ago (7d, 24h) or a date (2026-11-01)")
    lst.add_argument("--user", help="only files owned by this user (name or uid)")
    lst.add_argument("--repo", help="only Hugging Face files of this repo id (or a part of it)")
    lst.add_argument("--state", choices=STATES)
    lst.add_argument("--json", action="store_true")
    show = qs.add_parser("show", help="everything about one entry: the file, its findings, its history")
    common(show)
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    restore = qs.add_parser("restore", help="put a file back (hash checked) and allow its bytes from now on")
    common(restore)
    restore.add_argument("id")
    restore.add_argument("--force", action="store_true", help="replace whatever is at the original path now")
    restore.add_argument("--json", action="store_true")
    purge = qs.add_parser("purge", help="delete quarantined files for good: by id, or by age "
                          "(default: quarantine.retention_days)")
    common(purge)
    purge.add_argument("ids", nargs="*", metavar="ID")
    purge.add_argument("--older-than", metavar="AGE", help="e.g. 30d, 12h (overrides the retention policy)")
    purge.add_argument("--dry-run", action="store_true", help="say what would be purged, purge nothing")
    purge.add_argument("--json", action="store_true")
    verify = qs.add_parser("verify", help="check the ledger's hash chain and every quarantined file's sha256")
    common(verify)
    verify.add_argument("--json", action="store_true")


def run(cfg, args) -> int:
    if not getattr(args, "qcommand", None):
        print("modelscand quarantine: say what to do: list, show, restore, purge or verify", file=sys.stderr)
        return EXIT_USAGE
    from modelscand.config import ConfigError

    store = Store.from_config(cfg)
    try:
        return _COMMANDS[args.qcommand](store, cfg, args)
    except Busy as exc:
        return _fail(str(exc), EXIT_BUSY)
    except ConfigError as exc:
        return _fail(f"config error: {exc}", EXIT_CONFIG)
    except QuarantineError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except BrokenPipeError:  # `list | head`: modelscand.cli.main says so with 141
        raise
    except PermissionError as exc:
        return _fail(f"permission denied: {exc.filename or exc} (the quarantine is root's: run it with sudo)",
                     EXIT_NOPERM)
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), EXIT_FAILED)
    except Exception as exc:  # never a traceback for an operator: one line and a distinct code
        return _fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_SOFTWARE)


def _fail(message: str, code: int) -> int:
    print(f"modelscand quarantine: {escape_controls(message)}", file=sys.stderr)
    return code


def _out(text: str) -> None:
    sys.stdout.write(escape_controls(text) + "\n")


def _json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _local(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _no_ledger(store: Store, as_json: bool, empty) -> int:
    if as_json:
        _json(empty)
    print(f"modelscand quarantine: no ledger in {store.ledger.dir}: nothing has been quarantined "
          f"(or another --state-dir / --config is meant)", file=sys.stderr)
    return 0


# -- list / show ---------------------------------------------------------------------------------

def _list(store: Store, cfg, args) -> int:
    if not store.ledger.exists():
        return _no_ledger(store, args.json, [])
    since = review.parse_since(args.since) if args.since else None
    gc.disable()  # tens of thousands of small dicts, no cycles, a short-lived process: collections cost ~25%
    entries = review.select(store.listing(), since=since, user=args.user, repo=args.repo, state=args.state)
    if args.json:  # one entry per line: readable, and json.dumps without indent is the C encoder
        sys.stdout.write("[\n" + ",\n".join(json.dumps(review.summary(e), default=str) for e in entries)
                         + ("\n]\n" if entries else "]\n"))
        return 0
    if not entries:
        print("no quarantine entries" + (" match" if any((args.since, args.user, args.repo, args.state)) else ""),
              file=sys.stderr)
        return 0
    lines = [("ID", "WHEN", "STATE", "USER", "WHERE", "WORST FINDING")]
    for e in entries:
        b = e.begin
        owner = b.get("owner") or {}
        top = (b.get("findings") or [None])[0]
        lines.append((e.id, _local(e.time), e.state, owner.get("user") or str(owner.get("uid")), _where(b),
                      f"{top.get('severity')} {_clip(review.describe_finding(top), 60)}" if top
                      else (b.get("verdict") or "")))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    out = ["  ".join(c.ljust(w) for c, w in zip(line[:5], widths)) + "  " + line[5] for line in lines]
    sys.stdout.write("".join(escape_controls(line) + "\n" for line in out))
    return 0


def _where(b: dict) -> str:
    hf = b.get("hf")
    if hf and hf.get("repo_id"):
        files = hf.get("files") or []
        first = f"{files[0]['file']}@{(files[0]['revision'] or '')[:8]}" if files else "(no snapshot link)"
        more = f" +{len(files) - 1}" if len(files) > 1 else ""
        return _clip(f"{hf['repo_id']}: {first}{more}", 70, left=False)
    return _clip(b.get("path") or "", 70, left=True)


def _clip(text: str, n: int, left: bool = False) -> str:
    if len(text) <= n:
        return text
    return "..." + text[-(n - 3):] if left else text[: n - 3] + "..."


def _show(store: Store, cfg, args) -> int:
    if not store.ledger.exists():
        return _fail(f"no quarantine entry {args.id!r}: no ledger in {store.ledger.dir}", EXIT_FAILED)
    e = review.entry(store, args.id)
    if args.json:
        _json({"entry": review.summary(e), "records": e.records})
        return 0
    b = e.begin
    ident = b.get("identity", {})
    owner, group = b.get("owner", {}), b.get("group", {})
    _out(f"{e.id}  {e.state}")
    _out(f"  path       {b.get('path')}")
    _out(f"  root       {b.get('root')}")
    _out(f"  owner      {owner.get('user') or '?'} ({owner.get('uid')}), group {group.get('group') or '?'} "
         f"({group.get('gid')}), mode {b.get('mode', 0):04o}, {b.get('nlink', 1)} link(s)")
    _out(f"  size       {ident.get('size')} bytes, modified {_local(ident.get('mtime_ns', 0) / 1e9)}")
    _out(f"  sha256     {b.get('sha256')}")
    hf = b.get("hf")
    if hf:
        refs = ", ".join(f"{k} -> {v[:12]}" for k, v in (hf.get("refs") or {}).items())
        _out(f"  hf         {hf.get('repo_type')} {hf.get('repo_id')}  etag {hf.get('etag')}"
             + (f"  refs: {refs}" if refs else ""))
        for f in hf.get("files") or [("(no snapshot link points at it)")]:
            _out(f"    {f['file']} @ {f['revision']}" if isinstance(f, dict) else f"    {f}")
    _out(f"  verdict    {b.get('verdict')}, worst {b.get('severity')} (threshold {b.get('threshold')}), "
         f"reason {b.get('reason')}" + (f", repeat of {b['repeat_of']}" if b.get("repeat_of") else ""))
    sc = b.get("scanner") or {}
    _out(f"  scanner    {sc.get('version')} ({sc.get('fingerprint')})")
    done = e.last("quarantine.done")
    held = f"{b.get('dir')}/{b.get('name')}"
    tomb = (done or {}).get("tombstone") or {}
    _out(f"  held in    {held} ({b.get('method')})" + (f"; tombstone ({tomb['kind']}) left in its place"
                                                          if tomb.get("placed") else ""))
    findings = b.get("findings") or []
    _out(f"  findings   {len(findings)}")
    for f in findings:
        where = f" (byte {f['offset']})" if f.get("offset") is not None else ""
        src = f" in {f['source']}" if f.get("source") else ""
        _out(f"    {str(f.get('severity')).upper():<8} {f.get('rule_id')}  {review.describe_finding(f)}{where}{src}")
        if f.get("description") and f.get("call"):
            _out(f"             {_clip(f['description'], 160)}")
    for err in b.get("errors") or []:
        _out(f"    ERROR    {err.get('category')}: {err.get('description')}")
    _out("  history")
    for rec in e.records:
        extra = _history_note(rec)
        _out(f"    {_local(rec.get('time'))}  {rec.get('type'):<20} {extra}".rstrip())
    if e.state == "quarantined":
        _out(f"  restore:   modelscand quarantine restore {e.id}    purge: modelscand quarantine purge {e.id}")
    return 0


def _history_note(rec: dict) -> str:
    parts = []
    by = rec.get("by")
    if by:
        parts.append("by " + (by.get("sudo_user") or by.get("login_user") or by.get("user") or str(by.get("uid"))))
    for key in ("reason", "note"):
        if rec.get(key):
            parts.append(str(rec[key]))
    if rec.get("recovered"):
        parts.append("(recovered at start)")
    if rec.get("force"):
        parts.append("--force")
    links = rec.get("links") or {}
    if links.get("created"):
        parts.append(f"re-created {len(links['created'])} HF link(s)")
    return "; ".join(parts)


# -- restore / purge / verify --------------------------------------------------------------------

def _restore(store: Store, cfg, args) -> int:
    done = review.restore(store, args.id, force=args.force)
    if args.json:
        _json(done)
        return 0
    e = review.entry(store, args.id)
    links = done.get("links") or {}
    _out(f"restored {args.id} to {e.begin['path']} (sha256 verified; owner, mode and times restored"
         + (f"; {len(links['created'])} Hugging Face link(s) re-created" if links.get("created") else "") + ")")
    for c in links.get("conflicts") or []:
        _out(f"  not re-created: {c}")
    for what in done.get("not_restored") or []:
        _out(f"  not restored: {what}")
    _out(f"its sha256 {e.sha256} is allowed from now on: the daemon will not quarantine these bytes again")
    return 0


def _purge(store: Store, cfg, args) -> int:
    if not store.ledger.exists():
        return _no_ledger(store, args.json, [])
    older = None
    if not args.ids:
        if args.older_than:
            older = review.parse_age(args.older_than)
        else:
            days = cfg.data["quarantine"]["retention_days"]
            if not days:
                return _fail("quarantine.retention_days is 0 (keep forever): name IDs or give --older-than",
                             EXIT_USAGE)
            older = days * 86400
    elif args.older_than:
        return _fail("give IDs or --older-than, not both", EXIT_USAGE)
    done = review.purge(store, ids=args.ids, older_than=older, dry_run=args.dry_run)
    if args.json:
        _json(done)
        return 0
    verb = "would purge" if args.dry_run else "purged"
    for rec in done:
        _out(f"{verb} {rec['id']}  {rec.get('path')}")
    if not done:
        print("nothing to purge", file=sys.stderr)
    return 0


def _verify(store: Store, cfg, args) -> int:
    if not store.ledger.exists():
        return _no_ledger(store, args.json, {"records": 0, "entries": 0, "files_checked": 0, "problems": []})
    result = review.verify(store)
    if args.json:
        _json(result)
    else:
        for qid in result["recovered"]:
            _out(f"recovered {qid}: an operation a kill had interrupted was finished")
        for p in result["problems"]:
            _out(f"MISMATCH  {p}")
        status = "MISMATCH" if result["problems"] else "ok"
        _out(f"{status}: {result['records']} ledger records, {result['entries']} entries, "
             f"{result['files_checked']} quarantined files hashed, {len(result['problems'])} problem(s)")
    return EXIT_MISMATCH if result["problems"] else 0


_COMMANDS = {"list": _list, "show": _show, "restore": _restore, "purge": _purge, "verify": _verify}
