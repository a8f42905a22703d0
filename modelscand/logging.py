"""Structured logs: one JSON object per line, one event name per kind of thing that happened.

Event names are stable and grep-able: ``scan.clean``, ``scan.finding``, ``scan.error``,
``scan.incomplete``, ``scan.skipped``, ``scan.changed``, ``watch.start``, ``watch.overflow``,
``watch.root_missing``, ``watch.root_appeared``, ``watch.subwatch_failed``,
``watch.handler_error``, ``watch.queue_full``, ``reconcile.start``/``reconcile.done``,
``limits.*``, ``daemon.*``. The stdlib `logging` tree (watchdog included) is routed through
the same renderer, so the journal holds one format.

File names are arbitrary bytes on Linux; Python hands them to us as str with surrogate
escapes, which are not valid UTF-8 and would break a strict JSON consumer. Every string
value is made safe: undecodable bytes become ``\\xNN`` text and the event gains
``undecodable: true``; non-printable characters (ESC, BEL, C0/C1 controls, bidi overrides)
are escaped as ``\\xNN``/``\\uNNNN`` in both formats (no log or terminal injection).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Any, TextIO

import structlog

from modelscand.text import escape_controls, safe_text

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _safe_strings(_logger, _name, event: dict[str, Any]) -> dict[str, Any]:
    escaped = False

    def fix(v):
        nonlocal escaped
        if isinstance(v, str):
            out, e = safe_text(v)
            escaped |= e
            return out
        if isinstance(v, bytes):
            escaped = True
            return escape_controls(v.decode("utf-8", "backslashreplace"))
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v

    out = {k: fix(v) for k, v in event.items()}
    if escaped:
        out["undecodable"] = True
    return out


class LineWriter:
    """A structlog logger that writes whole lines under a lock and flushes each one."""

    _lock = threading.Lock()

    def __init__(self, stream: TextIO | None = None):
        self._stream = stream

    def msg(self, message: str) -> None:
        stream = self._stream or sys.stdout
        with LineWriter._lock:
            try:
                stream.write(message + "\n")
                stream.flush()
            except (OSError, ValueError):
                pass

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


class _Factory:
    def __init__(self, stream: TextIO | None, sink):
        self.stream, self.sink = stream, sink

    def __call__(self, *_args):
        return LineWriter(self.stream)


_sink_lock = threading.Lock()
_sinks: list = []


def add_sink(fn) -> None:
    """Also hand every event dict (after rendering-safe fixing) to `fn` (tests, status)."""
    with _sink_lock:
        _sinks.append(fn)


def remove_sink(fn) -> None:
    with _sink_lock:
        if fn in _sinks:
            _sinks.remove(fn)


def _to_sinks(_logger, _name, event: dict[str, Any]) -> dict[str, Any]:
    if _sinks:
        with _sink_lock:
            sinks = list(_sinks)
        for fn in sinks:
            try:
                fn(dict(event))
            except Exception:
                pass
    return event


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog and route the stdlib logging tree (watchdog included) into it."""
    lvl = _LEVELS.get(str(level).lower(), logging.INFO)
    renderer = (
        structlog.processors.JSONRenderer(serializer=lambda obj, **kw: json.dumps(obj, default=str, ensure_ascii=False))
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            _safe_strings,
            _to_sinks,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_Factory(stream, None),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _StdlibBridge):
            root.removeHandler(h)
    root.addHandler(_StdlibBridge())
    root.setLevel(logging.WARNING if lvl < logging.WARNING else lvl)
    # watchdog logs a debug line per inotify event: never let those records be built
    logging.getLogger("watchdog").setLevel(logging.INFO if lvl <= logging.DEBUG else logging.WARNING)


class _StdlibBridge(logging.Handler):
    """stdlib records -> structlog events named ``log.<logger>``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        log = structlog.get_logger()
        fields = {"logger": record.name, "message": message}
        if record.exc_info and record.exc_info[0] is not None:
            fields["exc"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        level = record.levelname.lower()
        getattr(log, level if level in ("debug", "info", "warning", "error", "critical") else "info")(
            f"log.{record.name}", **fields
        )


def get(name: str | None = None):
    return structlog.get_logger(name) if name else structlog.get_logger()
