"""`modelscand`: run the watcher, scan once with its config and cache, check config, status.

`scan PATH` is the check a user runs before loading a model: it reports and never moves a
file, whatever the config's ``scan.mode``, unless asked with ``--mode quarantine``.

Exit codes:
  run (service)      0 clean stop, 70 internal failure, 78 config error
  run --once, scan   0 nothing at/above the threshold, 1 findings at/above the threshold,
                     2 a file could not be (fully) scanned, 78 config error
  check-config       0 valid, 78 invalid
  status             0 state found (daemon running or not), 3 no state directory
  quarantine ...     0 ok, 1 verify mismatch, 2 refused/failed, 75 busy, 77 no permission (quarantine/cli.py)
  any                4 usage error, 141 stdout closed early (`| head`)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

EXIT_USAGE = 4
EXIT_SOFTWARE = 70
EXIT_CONFIG = 78
EXIT_NO_STATE = 3
EXIT_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from modelscan_core._version import __version__

    p = _Parser(prog="modelscand", description="Watch model caches and scan every model file that lands.")
    p.add_argument("--version", action="version", version=f"modelscand {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    def common(sp):
        sp.add_argument("--config", help="TOML config (default: /etc/modelscand/modelscand.toml if present, "
                        "else built-in defaults)")
        sp.add_argument("--state-dir", help="baseline/status directory (overrides state.dir)")

    run = sub.add_parser("run", help="watch in the foreground (as systemd runs it); JSON log lines on stdout")
    common(run)
    run.add_argument("--root", action="append", metavar="DIR", help="watch DIR instead of the configured roots "
                     "(repeatable; switches conventions off)")
    run.add_argument("--mode", choices=("detect", "quarantine"))
    run.add_argument("--once", action="store_true", help="reconcile the roots, drain the queue, report, exit")
    scan = sub.add_parser("scan", help="scan PATH once with the daemon's config and verdict cache; moves nothing "
                          "unless --mode quarantine")
    common(scan)
    scan.add_argument("--mode", choices=("detect", "quarantine"), default="detect",
                      help="detect (default, whatever the config's scan.mode says): report only; quarantine: also "
                      "move what is found, as the daemon would")
    scan.add_argument("path", nargs="+")
    check = sub.add_parser("check-config", help="validate the config and print what would be watched")
    common(check)
    check.add_argument("--json", action="store_true")
    status = sub.add_parser("status", help="what the state directory says")
    common(status)
    status.add_argument("--json", action="store_true")
    from modelscand.quarantine.cli import add_parser as add_quarantine

    add_quarantine(sub, common)
    return p


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
    except BrokenPipeError:  # `modelscand check-config | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        code = EXIT_PIPE
    sys.exit(code)


def run(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"modelscand: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.command:
        build_parser().print_help(sys.stderr)
        return EXIT_USAGE
    from modelscand import config as cfgmod

    try:
        cfg = cfgmod.load(getattr(args, "config", None))
        roots = getattr(args, "root", None)
        if args.command == "scan":
            roots = args.path
        cfg = cfg.with_overrides(roots=roots, state_dir=getattr(args, "state_dir", None),
                                 mode=getattr(args, "mode", None))
    except cfgmod.ConfigError as exc:
        print(f"modelscand: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        return _check_config(cfg, args.json)
    if args.command == "status":
        return _status(cfg, args.json)
    if args.command == "quarantine":
        from modelscand.quarantine.cli import run as quarantine

        return quarantine(cfg, args)
    return _run(cfg, args, roots)


def _run(cfg, args, roots) -> int:
    from modelscand import config as cfgmod
    from modelscand import logging as mlog
    from modelscand.daemon import Daemon

    mlog.configure(cfg.data["log"]["format"], cfg.data["log"]["level"])
    once = args.command == "scan" or args.once
    if args.command == "scan":
        for p in args.path:
            if not os.path.exists(p):
                print(f"modelscand: no such file or directory: {p}", file=sys.stderr)
                return EXIT_USAGE
    try:
        daemon = Daemon(cfg, watch=not once, report_cached=once)
        daemon.root_overrides = roots
        if once:
            return daemon.run_once()
        return daemon.run()
    except KeyboardInterrupt:
        return 130
    except cfgmod.ConfigError as exc:
        mlog.get().error("daemon.config_error", error=str(exc))
        print(f"modelscand: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        mlog.get().error("daemon.failed", error=f"{exc.strerror or exc}", path=getattr(exc, "filename", None))
        return EXIT_SOFTWARE


def _check_config(cfg, as_json: bool) -> int:
    roots = cfg.roots()
    info = {
        "config": cfg.source or "(built-in defaults)",
        "mode": cfg.mode,
        "severity_threshold": cfg.threshold.name.lower(),
        "state_dir": cfg.state_dir,
        "quarantine_dir": cfg.quarantine_dir,
        "workers": cfg.scan["workers"],
        "roots": [{"path": r.path, "configured": r.configured, "kind": r.kind, "origin": r.origin,
                   "exists": r.exists(), "refused": r.refused} for r in roots],
        "include": cfg.watch["include"],
        "exclude": cfg.watch["exclude"],
    }
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"config: {info['config']} (valid)")
    print(f"mode: {info['mode']}, threshold: {info['severity_threshold']}, workers: {info['workers']}")
    print(f"state dir: {info['state_dir']}")
    print("would watch:" if roots else "would watch: nothing (add [watch] roots or enable conventions)")
    for r in info["roots"]:
        mark = "" if r["exists"] else "   [missing: retried until it appears]"
        if r["refused"]:
            mark = f"   [refused: {r['refused']}]"
        print(f"  {r['path']}  ({r['kind']}, {r['origin']}){mark}")
    return 0


def _status(cfg, as_json: bool) -> int:
    from modelscand.state import Baseline

    path = os.path.join(cfg.state_dir, Baseline.FILE)
    if not os.path.exists(path):
        print(f"modelscand: no state in {cfg.state_dir} (has the daemon run?)", file=sys.stderr)
        return EXIT_NO_STATE
    import sqlite3

    from modelscand.state import open_readonly

    try:
        db = open_readonly(path)
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        counts = dict(db.execute("SELECT verdict, count(*) FROM files GROUP BY verdict").fetchall())
    except (OSError, sqlite3.Error) as exc:
        print(f"modelscand: cannot read {path}: {exc}", file=sys.stderr)
        return EXIT_SOFTWARE
    flagged = [
        {"path": os.fsdecode(p), "verdict": v, "severity": s, "sha256": h, "rule_ids": json.loads(r or "[]"),
         "scanned_at": t}
        for p, v, s, h, r, t in db.execute(
            "SELECT path, verdict, severity, sha256, rule_ids, scanned_at FROM files "
            "WHERE verdict IN ('issues','error','incomplete') ORDER BY scanned_at DESC LIMIT 20")
    ]
    db.close()
    pid = meta.get("pid")
    running = bool(pid) and not meta.get("stopped_at") and _alive(pid)
    info = {"state_dir": cfg.state_dir, "running": running, "pid": pid if running else None,
            "started_at": meta.get("started_at"), "ready_at": meta.get("ready_at"),
            "stopped_at": meta.get("stopped_at"), "roots": meta.get("roots", []), "missing": meta.get("missing", []),
            "last_overflow": meta.get("last_overflow"), "files": counts, "flagged": flagged,
            "reconciled": {k.split(":", 1)[1]: v for k, v in meta.items() if k.startswith("reconcile:")}}
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    fmt = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"  # noqa: E731
    print(f"modelscand: {'running (pid %s)' % pid if running else 'not running'}; state {cfg.state_dir}")
    print(f"started {fmt(info['started_at'])}, ready {fmt(info['ready_at'])}, last overflow {fmt(info['last_overflow'])}")
    print("roots: " + (", ".join(info["roots"]) or "-") + (f"; missing: {', '.join(info['missing'])}" if info["missing"] else ""))
    print("files: " + (", ".join(f"{n} {v}" for v, n in sorted(counts.items())) or "none scanned yet"))
    for f in flagged:
        print(f"  {f['verdict']:<10} {f['severity'] or '-':<8} {f['path']}  {' '.join(f['rule_ids'])}")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (ValueError, TypeError):
        return False


if __name__ == "__main__":
    main()
