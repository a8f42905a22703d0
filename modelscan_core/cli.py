"""`modelscan`: the one-shot command, a drop-in for Protect AI's modelscan 0.8.8.

Same flags, exit codes and JSON report; where modelscan is wrong we are right: logs and
progress go to stderr (stdout of `-r json` is one JSON document), `-o` works for every
format, a settings file is read only when named, and findings are never masked by errors.

Exit codes: 0 clean, 1 issues found, 2 a file could not be (fully) scanned, 3 nothing
supported was found, 4 usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from modelscan_core._version import __version__

EXIT_USAGE = 4
FORMATS = ("console", "json", "custom", "sarif")
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
#: modelscan's report class names, mapped to ours for `-r custom` settings files
COMPAT_REPORTS = {
    "modelscan.reports.ConsoleReport": "modelscan_core.reports.console",
    "modelscan.reports.JSONReport": "modelscan_core.reports.json_report",
}

log = logging.getLogger("modelscan")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2; the contract says 4
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modelscan", description="Detect model files that would run code when loaded. "
                     "`modelscan -p PATH` scans (scan is the default command).")
    parser.add_argument("-v", "--version", action="version", version=f"modelscan, version {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    scan = sub.add_parser("scan", help="scan a file or directory (default)")
    scan.add_argument("-p", "--path", help="file or folder to scan (recursive)")
    scan.add_argument("-l", "--log", choices=LOG_LEVELS, default="INFO", help="log level (logs go to stderr)")
    scan.add_argument("--show-skipped", action="store_true", help="list the files that were not scanned")
    scan.add_argument("--settings-file", help="TOML settings merged over the defaults")
    scan.add_argument("-r", "--reporting-format", choices=FORMATS, default="console")
    scan.add_argument("-o", "--output-file", help="write the report to this file instead of stdout")
    scan.add_argument("-v", "--version", action="version", version=f"modelscan, version {__version__}")
    create = sub.add_parser("create-settings-file", help="write the default settings as commented TOML")
    create.add_argument("-f", "--force", action="store_true", help="overwrite an existing file")
    create.add_argument("-l", "--location", default="modelscan-settings.toml", help="where to write it")
    return parser


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else argv))


def run(argv: list[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] not in ("scan", "create-settings-file", "-h", "--help", "-v", "--version"):
        argv.insert(0, "scan")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "create-settings-file":
            return _create_settings(args)
        return _scan(args, parser)
    except UsageError as exc:
        print(f"Usage error: {exc}", file=sys.stderr)
        print(parser.format_usage().rstrip(), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _scan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    logging.basicConfig(level=getattr(logging, args.log), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if not args.path:
        raise UsageError("command line must include a path (-p PATH)")
    if not os.path.lexists(args.path):
        raise UsageError(f"path {args.path!r} does not exist")

    from modelscan_core.settings import Settings, SettingsError

    try:
        settings = Settings.load(args.settings_file)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None
    if args.settings_file:
        log.info("using settings file %s (merged over the defaults)", args.settings_file)

    render = _renderer(args.reporting_format, settings)
    from modelscan_core.engine import scan_path
    from modelscan_core.reports.interface import ReportOptions

    progress = _Progress() if sys.stderr.isatty() else None
    report = scan_path(args.path, settings, progress=progress)
    if progress is not None:
        progress.done()
    to_terminal = not args.output_file and sys.stdout.isatty()
    text = render(report, ReportOptions(show_skipped=args.show_skipped, color=to_terminal and "NO_COLOR" not in os.environ))
    if args.output_file:
        try:
            with open(args.output_file, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            print(f"cannot write report to {args.output_file}: {exc.strerror or exc}", file=sys.stderr)
            return 2 if report.exit_code in (0, 3) else report.exit_code
        log.info("report written to %s", args.output_file)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return report.exit_code


def _renderer(fmt: str, settings):
    import importlib

    modules = {
        "console": "modelscan_core.reports.console",
        "json": "modelscan_core.reports.json_report",
        "sarif": "modelscan_core.reports.sarif",
    }
    name = modules.get(fmt)
    if fmt == "custom":
        name = settings.data.get("reporting", {}).get("module") or modules["console"]
        name = COMPAT_REPORTS.get(name, name)
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise UsageError(f"report module {name!r} cannot be imported: {exc}") from None
    if not callable(getattr(module, "render", None)):
        raise UsageError(f"report module {name!r} has no render(report, options) function")
    return module.render


class _Progress:
    """A one-line progress display on stderr, shown only once a scan takes over a second."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.shown = False
        self.after = float(os.environ.get("MODELSCAN_PROGRESS_AFTER", "1.0"))

    def __call__(self, n: int, source: str) -> None:
        if time.monotonic() - self.started < self.after:
            return
        self.shown = True
        name = source if len(source) <= 60 else "..." + source[-57:]
        sys.stderr.write(f"\r\033[Kscanning file {n + 1}: {name}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _create_settings(args: argparse.Namespace) -> int:
    from modelscan_core.settings import settings_toml

    path = args.location
    if os.path.exists(path) and not args.force:
        print(f"{path} already exists; use --force to overwrite it", file=sys.stderr)
        return 1
    text = settings_toml()
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)  # never leave a half-written (or empty) settings file behind
    except OSError as exc:
        print(f"cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return 2
    print(f"wrote default settings to {path}", file=sys.stderr)
    return 0
