"""File names as safe text: any bytes, no control characters (for logs, the ledger, terminals).

Kept apart from `modelscand.logging` so that commands that only print (``modelscand
quarantine list``) do not pay for importing structlog.
"""

from __future__ import annotations

import os


def escape_controls(value: str) -> str:
    """Non-printable characters (C0/C1 controls, ESC, BEL, bidi overrides and isolates, other
    format characters) as ``\\xNN`` / ``\\uNNNN`` text: a file name can't forge log lines or
    drive the terminal that shows the journal."""
    if value.isprintable():
        return value
    out = []
    for ch in value:
        if ch.isprintable():
            out.append(ch)
        else:
            n = ord(ch)
            out.append(f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}")
    return "".join(out)


def safe_text(value: str) -> tuple[str, bool]:
    """(printable text, whether undecodable bytes had to be escaped)."""
    if value.isascii():
        return escape_controls(value), False
    try:
        value.encode("utf-8")
        return escape_controls(value), False
    except UnicodeEncodeError:
        return escape_controls(os.fsencode(value).decode("utf-8", "backslashreplace")), True
