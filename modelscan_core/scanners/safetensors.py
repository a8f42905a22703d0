"""safetensors: an 8-byte header length, a JSON header, raw tensor bytes. Nothing in it runs.

The format is safe by design, so what matters is whether a file is what it claims. The
header is validated the way the Rust `safetensors` crate validates it (length bound,
JSON, dtypes, shapes against byte ranges, ranges contiguous from 0 and covering the data
exactly), plus what its JSON parser lets through that a second reader may see differently
(duplicate keys, numbers beyond 64 bits, NaN). Every anomaly is MEDIUM. Bytes no tensor
covers (a gap, or anything appended after the last tensor: a polyglot that `zipfile` or
another loader opens) are handed back to the engine and scanned as what they are.
Tensor data is never read.
"""

from __future__ import annotations

import json
import math
from typing import Any, BinaryIO

from modelscan_core.detect import Rule
from modelscan_core.model import Severity
from modelscan_core.scanners import Format, ScannerSettings
from modelscan_core.scanners.interface import Item, ScanContext, ScanFailed, Scanner
from modelscan_core.sources.window import Window

#: the Rust crate refuses longer headers (MAX_HEADER_SIZE)
MAX_HEADER = 100_000_000
#: bits per element of every dtype the crate knows
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
_U64 = 2**64 - 1
_WHITESPACE = b" \t\r\n"


def sniff_safetensors(head: bytes, name: str, stream: BinaryIO) -> bool:
    if len(head) < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    if n < 2 or (n > MAX_HEADER and not name.endswith(".safetensors")):
        return False
    return head[8:].lstrip(_WHITESPACE)[:1] == b"{"


class _Strict:
    """JSON hooks that note what serde_json and Python's json disagree on."""

    def __init__(self):
        self.duplicates: list[str] = []
        self.constants: list[str] = []

    def pairs(self, pairs: list[tuple[str, Any]]) -> dict:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                self.duplicates.append(key)
            seen[key] = value
        return seen

    def constant(self, text: str) -> float:
        self.constants.append(text)
        return float("nan")


class SafetensorsScanner(Scanner):
    name = "modelscan.scanners.SafetensorsScan"
    formats = ("safetensors",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        stream = item.stream
        stream.seek(0)
        n = int.from_bytes(stream.read(8), "little")
        if n > MAX_HEADER:
            self._anomaly(ctx, "header-length", f"header length {n} is beyond the {MAX_HEADER}-byte limit the safetensors "
                          "loader enforces: not a file it reads")
            raise ScanFailed(f"safetensors header of {n} bytes was not read")
        if 8 + n > item.size:
            raise ScanFailed(f"safetensors header of {n} bytes runs past the end of the file ({item.size} bytes): truncated")
        raw = stream.read(n)
        if len(raw) != n:
            raise ScanFailed("short read in the safetensors header")
        header = self._parse(raw, ctx)
        data_start = 8 + n
        self._validate(header, item, ctx, data_start)

    @staticmethod
    def _anomaly(ctx: ScanContext, rule: str, description: str, operator: str = "") -> None:
        ctx.report(f"safetensors/{rule}", Severity.MEDIUM, description, module="safetensors", operator=operator or rule)

    def _parse(self, raw: bytes, ctx: ScanContext) -> dict:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._anomaly(ctx, "header-encoding", f"the header is not UTF-8 ({exc.reason} at byte {exc.start})")
            raise ScanFailed("safetensors header is not UTF-8 JSON") from None
        strict = _Strict()
        try:
            header = json.loads(text, object_pairs_hook=strict.pairs, parse_constant=strict.constant)
        except (ValueError, RecursionError) as exc:
            self._anomaly(ctx, "header-json", f"the header is not valid JSON ({exc})")
            raise ScanFailed(f"safetensors header is not valid JSON: {exc}", "JSON_DECODE") from None
        if strict.duplicates:
            keys = ", ".join(repr(k) for k in strict.duplicates[:5])
            self._anomaly(ctx, "duplicate-key", f"the header repeats key(s) {keys}: readers disagree on which copy counts")
        if strict.constants:
            self._anomaly(ctx, "json-constant", f"the header uses {', '.join(sorted(set(strict.constants)))}, which strict "
                          "JSON parsers refuse")
        if not isinstance(header, dict):
            self._anomaly(ctx, "header-json", f"the header is a JSON {type(header).__name__}, not an object")
            raise ScanFailed("safetensors header is not a JSON object")
        return header

    def _validate(self, header: dict, item: Item, ctx: ScanContext, data_start: int) -> None:
        data_len = item.size - data_start
        metadata = header.get("__metadata__")
        if metadata is not None:
            if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                self._anomaly(ctx, "metadata", "__metadata__ must map strings to strings; the loader refuses anything else")
        spans: list[tuple[int, int, str]] = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            span = self._tensor(name, info, ctx)
            if span is not None:
                spans.append(span)
        spans.sort()
        position = 0
        for begin, end, name in spans:
            if begin > position:
                self._anomaly(ctx, "gap", f"bytes {position}-{begin} of the data belong to no tensor (before {name!r})")
                self._hidden(item, ctx, data_start + position, begin - position, "<bytes between tensors>")
            elif begin < position:
                self._anomaly(ctx, "overlap", f"tensor {name!r} overlaps the tensor before it (starts at {begin}, "
                              f"previous ends at {position})", operator=name)
            position = max(position, end)
        if position > data_len:
            raise ScanFailed(f"tensor data ends at {position} but the file holds {data_len} data bytes: truncated")
        if position < data_len:
            self._anomaly(ctx, "appended-data", f"{data_len - position} bytes follow the last tensor; the safetensors "
                          "loader refuses such a file, other readers open what is appended")
            self._hidden(item, ctx, data_start + position, data_len - position, "<bytes after the tensors>")

    def _tensor(self, name: str, info: Any, ctx: ScanContext) -> tuple[int, int, str] | None:
        if not isinstance(info, dict):
            self._anomaly(ctx, "tensor-entry", f"entry {name!r} is not an object", operator=name)
            return None
        extra = sorted(set(info) - {"dtype", "shape", "data_offsets"})
        if extra:
            self._anomaly(ctx, "tensor-entry", f"tensor {name!r} carries unknown fields {extra}", operator=name)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
        if bits is None:
            self._anomaly(ctx, "dtype", f"tensor {name!r} has dtype {dtype!r}, which the loader does not know", operator=name)
        if not (isinstance(shape, list) and all(_u64(d) for d in shape)):
            self._anomaly(ctx, "shape", f"tensor {name!r} has shape {_short(shape)}, not a list of 64-bit sizes", operator=name)
            shape = None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_u64(o) for o in offsets) and offsets[0] <= offsets[1]):
            self._anomaly(ctx, "offsets", f"tensor {name!r} has data_offsets {_short(offsets)}", operator=name)
            return None
        begin, end = offsets
        if bits is not None and shape is not None:
            total_bits = math.prod(shape) * bits
            if total_bits % 8 or total_bits // 8 != end - begin:
                self._anomaly(ctx, "size", f"tensor {name!r} ({dtype} {shape}) needs {total_bits / 8:g} bytes but its "
                              f"range holds {end - begin}", operator=name)
        return begin, end, name

    @staticmethod
    def _hidden(item: Item, ctx: ScanContext, start: int, length: int, label: str) -> None:
        length = max(0, min(length, item.size - start))
        if length:
            ctx.scan_member(label, lambda: Window(item.stream, start, length), length)


def _u64(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _U64


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


FORMATS = (
    # early: the first 8 bytes are a length, and may look like anything (even a PROTO opcode)
    Format("safetensors", "SafetensorsScanner", "safetensors",
           rules=(Rule(priority=50, sniff=sniff_safetensors),), extensions=(".safetensors",)),
)

SETTINGS = (ScannerSettings("safetensors", "modelscan.scanners.SafetensorsScan",
                            {"enabled": True, "supported_extensions": [".safetensors"]}),)
