"""Decompressed bytes, bounded: every codec's output lands in a spool the scanners can seek.

Why spool rather than stream: a decompressor can only go forwards, but the engine seeks
back to detect a format, a zip inside a gzip needs its central directory at the end, and
the pickle VM seeks to skip long operands. So the output of a codec is written to a
`SpooledTemporaryFile` (kept in memory up to `MEMORY_LIMIT`, then on disk), read one chunk
at a time and never held whole. Decompression dominates the cost anyway; writing the
output once to the page cache is cheap next to it, and it makes every member an ordinary
seekable file with an exact size, so every scanner works on it unchanged.

Bombs are stopped here, while the bytes are produced: the output of one top-level file is
charged to `limits.max_total_bytes` (through `ScanContext.charge_bytes`) and compared with
the input consumed against `limits.max_ratio`. A limit that is hit stops the spool; the
bytes spooled so far are still scanned (a payload before the cut is still found) and the
caller records an explicit incomplete error naming the limit.
"""

from __future__ import annotations

import bz2
import lzma
import tempfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from modelscan_core.scanners.interface import ScanContext

CHUNK = 1 << 20
#: spools stay in memory up to this size, then move to a temporary file
MEMORY_LIMIT = 16 << 20


@dataclass
class Spooled:
    """The outcome of spooling: the bytes, and why spooling stopped early (if it did)."""

    stream: BinaryIO
    size: int
    limit: str | None = None  # "limits.max_total_bytes=..." when a limit cut the output
    error: str | None = None  # the codec's complaint about corrupt input, if any


class _Counted:
    """Counts what is read from the compressed input (for the ratio)."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.consumed = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.consumed += len(data)
        return data


class _Sink:
    """Where output goes: a spool, charged against the limits as it grows."""

    def __init__(self, ctx: ScanContext, counted: _Counted | None, declared_input: int | None):
        self.ctx = ctx
        self.counted = counted
        self.declared_input = declared_input
        self.out = tempfile.SpooledTemporaryFile(max_size=MEMORY_LIMIT)
        self.size = 0
        self.limit: str | None = None

    def write(self, data: bytes) -> bool:
        """Append data; False (and `limit` set) once a limit forbids going on."""
        if self.limit is not None:
            return False
        limits = self.ctx.limits
        if not self.ctx.charge_bytes(len(data)):
            self.limit = f"limits.max_total_bytes={limits.max_total_bytes} (decompressed bytes across the file)"
            return False
        consumed = self.counted.consumed if self.counted is not None else self.declared_input
        new_size = self.size + len(data)
        if consumed is not None and new_size > limits.ratio_after_bytes and new_size > limits.max_ratio * max(consumed, 1):
            self.limit = f"limits.max_ratio={limits.max_ratio} (output/input ratio of a compressed stream)"
            return False
        self.out.write(data)
        self.size = new_size
        return True

    def finish(self, error: str | None = None) -> Spooled:
        self.out.seek(0)
        return Spooled(self.out, self.size, self.limit, error)


def spool_codec(raw: BinaryIO, codec: str, ctx: ScanContext) -> Spooled:
    """Decompress `raw` (positioned at the start of the compressed data) with `codec`.

    Codecs: zlib, deflate (raw, as in zip), gzip (all members, as gzip.open reads them),
    bz2 (all streams), xz, lzma (FORMAT_ALONE), lz4 (all frames, as lz4.frame.open reads them).
    """
    counted = _Counted(raw)
    sink = _Sink(ctx, counted, None)
    try:
        if codec == "lz4":
            _lz4(counted, sink)
        else:
            _run(counted, sink, codec)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as exc:
        return sink.finish(f"{codec} data is corrupt: {exc}")
    return sink.finish()


def _new(codec: str):
    if codec == "zlib":
        return zlib.decompressobj(15)
    if codec == "deflate":
        return zlib.decompressobj(-15)
    if codec == "gzip":
        return zlib.decompressobj(31)
    if codec == "bz2":
        return bz2.BZ2Decompressor()
    if codec == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ)
    if codec == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE)
    raise ValueError(f"unknown codec {codec}")


def _run(counted: _Counted, sink: _Sink, codec: str) -> None:
    dec = _new(codec)
    pending = b""
    while True:
        if pending:
            data, pending = pending, b""
        else:
            data = counted.read(CHUNK)
            if not data:
                break
        # Bound each step's output so a bomb never materialises in memory.
        out = _step(dec, data)
        while True:
            if out and not sink.write(out):
                return
            if _needs_input(dec):
                break
            out = _step(dec, b"")
            if not out:
                break
        if _at_end(dec):
            rest = _unused(dec)
            if codec in ("gzip", "bz2", "xz") and rest.strip(b"\x00"):
                # gzip.open / bz2.open / lzma.open read every concatenated member
                dec = _new(codec)
                pending = rest
                continue
            return
    if not _at_end(dec):
        raise EOFError("compressed stream ends before its end marker")


def _step(dec, data: bytes) -> bytes:
    if isinstance(dec, (bz2.BZ2Decompressor, lzma.LZMADecompressor)):
        if dec.eof:
            return b""
        return dec.decompress(data, CHUNK)
    if dec.eof:
        return b""
    return dec.decompress(data or dec.unconsumed_tail, CHUNK)


def _needs_input(dec) -> bool:
    if isinstance(dec, (bz2.BZ2Decompressor, lzma.LZMADecompressor)):
        return dec.eof or dec.needs_input
    return not dec.unconsumed_tail


def _at_end(dec) -> bool:
    return bool(dec.eof)


def _unused(dec) -> bytes:
    return dec.unused_data


def _lz4(counted: _Counted, sink: _Sink) -> None:
    """Every concatenated frame: joblib reads through `lz4.frame.open`, which goes on after each
    frame's end marker the way gzip.open goes on after each member."""
    import lz4.frame

    pending = b""
    while True:
        data = pending or counted.read(CHUNK)
        if not data:
            return
        dec = lz4.frame.LZ4FrameDecompressor()
        while not dec.eof:
            if not data:
                data = counted.read(CHUNK)
                if not data:
                    raise EOFError("lz4 frame ends early")
            try:
                out = dec.decompress(data, max_length=CHUNK)
            except RuntimeError as exc:  # what lz4.frame raises for a corrupt frame
                raise ValueError(str(exc)) from None
            data = b""
            while True:
                if out and not sink.write(out):
                    return
                if dec.needs_input or dec.eof:
                    break
                out = dec.decompress(b"", max_length=CHUNK)
        pending = dec.unused_data
