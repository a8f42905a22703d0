"""Strings from hostile files made safe to print, and the exact bytes behind them.

Paths come from the file system (undecodable bytes arrive as surrogate escapes), tar member
names likewise, and pickle operands may hold lone surrogates (`surrogatepass`). None of
those can be written as UTF-8, so a report that printed them as they are would either crash
or emit bytes that are not UTF-8 (and so not JSON). Every report renders text through
`printable`, which shows each undecodable byte as `\\xNN`; where the exact bytes matter (a
source path a user wants to find on disk) `raw_hex` gives them back.
"""

from __future__ import annotations


def is_clean(text: str) -> bool:
    """True when the text encodes to UTF-8 as it is (no surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def raw_bytes(text: str) -> bytes:
    """The bytes a string stands for: surrogate escapes (U+DC80..U+DCFF) are the bytes the
    file system or tar gave, other lone surrogates are encoded as UTF-8 would (surrogatepass)."""
    if is_clean(text):
        return text.encode("utf-8")
    out = bytearray()
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(code - 0xDC00)
        else:
            out += ch.encode("utf-8", "surrogatepass")
    return bytes(out)


def printable(text: str) -> str:
    """The text as valid UTF-8: undecodable bytes shown as `\\xNN`, everything else as is."""
    if is_clean(text):
        return text
    return raw_bytes(text).decode("utf-8", "backslashreplace")


def raw_hex(text: str) -> str | None:
    """The exact bytes of a string that `printable` had to change, in hex; None when it did not."""
    return None if is_clean(text) else raw_bytes(text).hex()


def clean_tree(value: object, *, keep_bytes: bool = True) -> object:
    """A JSON-ready structure with every string made printable. With `keep_bytes`, a dict
    value that had to be changed gets a sibling `<key>_bytes` with its exact bytes in hex."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list):
        return [clean_tree(v, keep_bytes=keep_bytes) for v in value]
    if isinstance(value, dict):
        out: dict = {}
        for key, v in value.items():
            out[printable(key) if isinstance(key, str) else key] = clean_tree(v, keep_bytes=keep_bytes)
            if keep_bytes and isinstance(v, str) and not is_clean(v):
                out[f"{key}_bytes"] = raw_hex(v)
        return out
    return value
