"""JSON documents that a loader deserializes into code: recognised by their top-level keys.

Several formats are plain JSON files whose objects name Python callables (a Keras config, a
NeMo 2 `io.json`). Key order, `\\u` escapes and a BOM are the writer's choice, so a document
is recognised by parsing it, not by its head; parsing is skipped when none of the keys could
be there (not spelled out, and no escape that could spell them), which keeps the cost of
every other JSON file (tokenizers, HF configs) at one byte search.
"""

from __future__ import annotations

import json
import threading
from typing import Any, BinaryIO

MAX_JSON = 64 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"
TOO_LARGE = object()  # a document beyond MAX_JSON: claimed, and reported unread by the scanner


def looks_like_object(head: bytes) -> bool:
    return head.removeprefix(_BOM).lstrip()[:1] == b"{"


def parse_object(data: bytes, needles: tuple[bytes, ...]) -> dict | None:
    """The document's top-level object, when one of `needles` could be in it, else None."""
    if not any(n in data for n in needles) and b"\\u" not in data:
        return None
    return _parse(data)


def _parse(data: bytes) -> dict | None:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


#: the last stream read, per thread: every JSON rule asks about the same stream in turn, and a
#: tokenizer's 10 MB is read and parsed once, not once per rule (the stream is held, so `is`
#: cannot match another file's)
_local = threading.local()


def document(head: bytes, stream: BinaryIO, needles: tuple[bytes, ...]) -> Any:
    """`parse_object` of a whole stream that starts like a JSON object; TOO_LARGE for one beyond
    MAX_JSON whose head shows a needle; None otherwise."""
    if not looks_like_object(head):
        return None
    stream.seek(0, 2)
    if stream.tell() > MAX_JSON:
        return TOO_LARGE if any(n in head for n in needles) else None
    _last = getattr(_local, "last", None)
    if _last is None or _last[0] is not stream:
        stream.seek(0)
        _last = _local.last = [stream, stream.read(), None, False]  # stream, data, document, parsed yet
    data = _last[1]
    if not any(n in data for n in needles) and b"\\u" not in data:
        return None
    if not _last[3]:
        _last[2], _last[3] = _parse(data), True
    return _last[2]


def load(item, what: str) -> Any:
    """The whole JSON document of a scanned item, or ScanFailed (too large, or not JSON)."""
    from modelscan_core.scanners.interface import ScanFailed

    if item.size > MAX_JSON:
        raise ScanFailed(f"{what} of {item.size} bytes, beyond the {MAX_JSON} read", incomplete=True)
    item.stream.seek(0)
    try:
        return json.loads(item.stream.read())
    except (ValueError, RecursionError) as exc:
        raise ScanFailed(f"not valid JSON: {exc}", "JSON_DECODE") from None
