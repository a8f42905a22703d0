"""Building pickles by hand for tests: opcodes, and objects that pickle as a call.

Nothing built here is ever unpickled; `Reduce` only makes `pickle.dumps` write a call.
"""

from __future__ import annotations

import struct


class Reduce:
    """pickle.dumps(Reduce(f, args)) writes a call of f(*args) without calling it."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def global_op(module: str, name: str) -> bytes:
    """GLOBAL (protocol 0): module and name as text lines."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def unicode_op(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4): up to 255 bytes of UTF-8."""
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def binunicode_op(text: str) -> bytes:
    """BINUNICODE (protocol 1+): a 4-byte length and UTF-8."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def stack_global_op(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4) fed by two SHORT_BINUNICODE operands."""
    return unicode_op(module) + unicode_op(name) + b"\x93"


def call_op(func: bytes, *args: bytes) -> bytes:
    """func(*args) with REDUCE: each argument is the opcodes that push it."""
    return func + b"(" + b"".join(args) + b"tR"


def dict_op(*pairs: tuple[bytes, bytes]) -> bytes:
    """A dict literal: EMPTY_DICT, then SETITEMS of (key, value) opcodes."""
    if not pairs:
        return b"}"
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def build_op(target: bytes, state: bytes) -> bytes:
    """target, then BUILD with state."""
    return target + state + b"b"


def proto(body: bytes, version: int = 4) -> bytes:
    """PROTO, body, STOP."""
    return b"\x80" + bytes([version]) + body + b"."
