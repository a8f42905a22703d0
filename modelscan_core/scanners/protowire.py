"""Just enough of the protobuf wire format to walk TensorFlow's messages without TensorFlow.

We decode only the fields we need and step over the rest by their length, so a 2 GB
`saved_model.pb` full of constants costs one pass over its tags, never a copy of its
tensors. Every length is checked against the enclosing message: a truncated or
inconsistent file raises `WireError`, which the scanner turns into an error verdict.
"""

from __future__ import annotations

from typing import Iterator

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError(f"truncated varint at offset {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError(f"varint longer than 10 bytes at offset {pos}")


def fields(buf: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field number, wire type, value or start, end) for each field in buf[start:end].

    For LEN fields the value is the payload's start offset and `end` its end; for the
    others the value is the integer and `end` the offset after it; a group (deprecated, unused
    by ONNX and TensorFlow, skipped by their parsers as an unknown field) is one field whose
    value is its start.
    """
    if end is None:
        end = len(buf)
    pos = start
    while pos < end:
        key, pos = read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at offset {pos}")
        if wire == VARINT:
            value, pos = read_varint(buf, pos, end)
            yield number, wire, value, pos
        elif wire == LEN:
            length, pos = read_varint(buf, pos, end)
            stop = pos + length
            if stop > end:
                raise WireError(f"field {number} runs past its message ({stop} > {end})")
            yield number, wire, pos, stop
            pos = stop
        elif wire == I64:
            if pos + 8 > end:
                raise WireError(f"truncated fixed64 at offset {pos}")
            yield number, wire, int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
            pos += 8
        elif wire == I32:
            if pos + 4 > end:
                raise WireError(f"truncated fixed32 at offset {pos}")
            yield number, wire, int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
            pos += 4
        elif wire == SGROUP:
            # a (deprecated) group: protobuf parsers keep it as an unknown field; step over it whole
            start = pos
            pos = skip_group(buf, pos, end, number, 0)
            yield number, wire, start, pos
        else:
            raise WireError(f"unsupported wire type {wire} at offset {pos}")


MAX_GROUP_DEPTH = 100  # protobuf's own recursion limit


def skip_group(buf: bytes, pos: int, end: int, number: int, depth: int) -> int:
    """The offset after the END_GROUP that closes group `number` opened before `pos`."""
    if depth >= MAX_GROUP_DEPTH:
        raise WireError(f"groups nested deeper than {MAX_GROUP_DEPTH} at offset {pos}")
    while pos < end:
        key, pos = read_varint(buf, pos, end)
        inner, wire = key >> 3, key & 7
        if wire == EGROUP:
            if inner != number:
                raise WireError(f"group {number} closed as {inner} at offset {pos}")
            return pos
        if wire == VARINT:
            _, pos = read_varint(buf, pos, end)
        elif wire == LEN:
            length, pos = read_varint(buf, pos, end)
            pos += length
        elif wire == I64:
            pos += 8
        elif wire == I32:
            pos += 4
        elif wire == SGROUP:
            pos = skip_group(buf, pos, end, inner, depth + 1)
        else:
            raise WireError(f"unsupported wire type {wire} at offset {pos}")
        if pos > end:
            raise WireError(f"field {inner} runs past its message ({pos} > {end})")
    raise WireError(f"group {number} is never closed")


def text(buf: bytes, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode("utf-8", "replace")


def looks_like_message(head: bytes, first_fields: tuple[int, ...]) -> bool:
    """The head parses as fields and the first one is among `first_fields` (a cheap check)."""
    try:
        for i, (number, _wire, _value, _end) in enumerate(fields(head, 0, len(head))):
            if i == 0 and number not in first_fields:
                return False
            if i >= 2:
                return True
        return bool(head)
    except WireError as exc:
        # the head may cut a long field short; what parsed before it decides
        return "runs past" in str(exc) and bool(head) and head[0] >> 3 in first_fields
