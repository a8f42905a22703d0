"""The engine: take a path or a stream, decide each format, run its scanner, fold results.

Nesting is recursion in one place: a container scanner hands what it holds back through
`ScanContext.scan_member`, which detects, scans and names the member `outer:inner` under
one set of limits. Whatever a scanner raises becomes an error for that item; findings it
reported before raising are kept.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import stat
import time
from typing import BinaryIO, Callable

from modelscan_core import detect
from modelscan_core._version import __version__
from modelscan_core.model import FileResult, Finding, ScanError, ScanReport, Severity, Skipped
from modelscan_core.scanners import scanner_for
from modelscan_core.scanners.interface import Item, ScanContext, ScanFailed
from modelscan_core.settings import Settings
from modelscan_core.sources.filesystem import FileEntry, walk

#: files larger than this get no sha256 in reports (hashing 2 GB would dwarf the scan itself)
HASH_LIMIT = 512 * 1024 * 1024

Progress = Callable[[int, str], None]  # (files done so far, current source)


def scan_path(path: str | os.PathLike, settings: Settings | None = None, *, progress: Progress | None = None) -> ScanReport:
    """Scan a file or a directory tree. Never raises for bad input: it is in the report."""
    settings = settings or Settings()
    started = time.monotonic()
    input_path = os.fspath(path)
    absolute = os.path.abspath(input_path)
    base = absolute if os.path.isdir(absolute) else os.path.dirname(absolute)
    files: list[FileResult] = []
    errors: list[ScanError] = []
    if not os.path.lexists(absolute):
        errors.append(ScanError("PATH", "path does not exist", input_path))
    else:
        for n, entry in enumerate(walk(absolute, base)):
            if isinstance(entry, ScanError):
                errors.append(entry)
                continue
            if progress is not None:
                progress(n, entry.source)
            files.append(scan_file(entry, settings))
    return ScanReport(
        input_path=input_path,
        absolute_path=base,
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(),
        version=__version__,
        files=tuple(files),
        errors=tuple(errors),
        elapsed_s=time.monotonic() - started,
    )


def scan_file(entry: FileEntry, settings: Settings) -> FileResult:
    try:
        fd = os.open(entry.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return FileResult(entry.source, "unknown", errors=(ScanError("PATH", f"cannot open: {exc.strerror or exc}", entry.source),), scanned=False)
    with os.fdopen(fd, "rb", buffering=0) as raw:
        st = os.fstat(raw.fileno())
        if not stat.S_ISREG(st.st_mode):
            return FileResult(entry.source, "unknown", errors=(ScanError("PATH", "not a regular file; not opened", entry.source),), scanned=False)
        return scan_stream(raw, entry.source, settings, size=st.st_size, name=os.path.basename(entry.path), path=entry.path)


def scan_stream(
    stream: BinaryIO,
    source: str,
    settings: Settings | None = None,
    *,
    size: int | None = None,
    name: str | None = None,
    compute_hash: bool = True,
    path: str | None = None,
) -> FileResult:
    """Scan one seekable stream (a file the caller opened, e.g. through a verified fd).

    `path`, when given, is where the stream's file lives: formats that name other files
    (ONNX external data) check where those resolve."""
    settings = settings or Settings()
    if size is None:
        size = _stream_size(stream)
    sha256 = None
    try:
        if compute_hash and size <= HASH_LIMIT:
            sha256 = sha256_stream(stream)
        return _Scan(settings).scan_item(stream, source, size, name or source, None, sha256=sha256, path=path)
    except OSError as exc:
        return FileResult(source, "unknown", size=size, errors=(ScanError("PATH", f"read failed: {exc.strerror or exc}", source),), scanned=False)


class _Scan:
    """One top-level file: shared limits (members, bytes) across everything it contains."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.limits = settings.limits
        self.members = 0
        self.decompressed = 0  # bytes produced by decompression/extraction, for limits.max_total_bytes

    def scan_item(
        self,
        stream: BinaryIO,
        source: str,
        size: int,
        name: str,
        format_hint: str | None,
        *,
        depth: int = 0,
        sha256: str | None = None,
        path: str | None = None,
    ) -> FileResult:
        try:
            stream.seek(0)
            head = stream.read(detect.HEAD)
            stream.seek(0)
            formats = [format_hint] if format_hint else readings(head, name, stream)
            stream.seek(0)
        except OSError as exc:
            return FileResult(source, "unknown", size, sha256, errors=(ScanError("MODEL_SCAN", f"read failed: {exc.strerror or exc}", source),))
        except Exception as exc:  # a detection bug costs this file an error verdict, never the whole scan
            desc = f"internal error while detecting the format: {type(exc).__name__}: {exc}"
            return FileResult(source, "unknown", size, sha256, errors=(ScanError("MODEL_SCAN", desc, source),))
        if not formats:
            if size == 0:
                if detect.claims_model_format(name):
                    return FileResult(source, "empty", size, sha256, errors=(ScanError("MODEL_SCAN", "empty file: nothing a loader could read", source),), scanned=False)
                return FileResult(source, "empty", size, sha256, skipped=Skipped("SCAN_NOT_SUPPORTED", "empty file", source), scanned=False)
            if detect.claims_model_format(name) and not _is_text(head):
                desc = "the name claims a model format but the content matches none the scanner knows"
                return FileResult(source, "unknown", size, sha256, errors=(ScanError("MODEL_SCAN", desc, source),), scanned=False)
            what = "text, not a model format" if _is_text(head) else "no model format recognised in the content"
            return FileResult(source, "unknown", size, sha256, skipped=Skipped("SCAN_NOT_SUPPORTED", what, source), scanned=False)
        results = [self._scan_as(fmt, stream, source, size, sha256, depth, path) for fmt in formats]
        first, others = results[0], [r for r in results[1:] if r.all_findings()]
        if not others:
            return first
        # Also another format (a tar whose first member name is a pickle, a pickle in an HDF5
        # user block): each reading that found something counts. A reading that found nothing
        # is bytes that loader rejects at once, and its errors are no error of the file.
        return FileResult(
            source,
            "+".join(r.format for r in [first, *others]),
            size,
            sha256,
            findings=tuple(f for r in [first, *others] for f in r.findings),
            errors=tuple(e for r in [first, *others] for e in r.errors),
            members=tuple(m for r in [first, *others] for m in r.members),
            skipped=first.skipped,
            scanned=first.scanned or any(r.scanned for r in others),
        )

    def _scan_as(self, fmt: str, stream: BinaryIO, source: str, size: int, sha256: str | None, depth: int,
                 path: str | None) -> FileResult:
        """The stream read as one format, by its scanner, inside the guard."""
        stream.seek(0)
        try:
            found = scanner_for(fmt)
        except Exception as exc:  # e.g. the scanner module (or its dependency) fails to import
            desc = f"no scanner could be loaded for format {fmt}: {type(exc).__name__}: {exc}"
            return FileResult(source, fmt, size, sha256, errors=(ScanError("MODEL_SCAN", desc, source),))
        if found is None:
            return FileResult(source, fmt, size, sha256, skipped=Skipped("SCAN_NOT_SUPPORTED", f"format {fmt} has no scanner", source), scanned=False)
        key, scanner = found
        if not self.settings.scanner_enabled(key):
            return FileResult(source, fmt, size, sha256, skipped=Skipped("SCAN_NOT_SUPPORTED", f"scanner {scanner.name} is disabled in settings", source), scanned=False)
        ctx = _Context(self, source, scanner.name, depth)
        try:
            scanner.scan(Item(source, stream, size, fmt, path), ctx)
        except ScanFailed as exc:
            ctx.error(exc.description, exc.category, exc.incomplete)
        except (MemoryError, RecursionError) as exc:
            ctx.error(f"scan stopped: {type(exc).__name__}", "MODEL_SCAN", incomplete=True)
        except OSError as exc:
            ctx.error(f"read failed: {exc.strerror or exc}", "MODEL_SCAN")
        except Exception as exc:  # a scanner bug must cost one error verdict, not the whole scan
            ctx.error(f"internal error in {scanner.name}: {type(exc).__name__}: {exc}", "MODEL_SCAN")
        return FileResult(
            source,
            fmt,
            size,
            sha256,
            findings=tuple(ctx.findings),
            errors=tuple(ctx.errors),
            members=tuple(ctx.members),
        )


#: rule families whose scanner reads a pickle at offset 0 itself (a zip scans the bytes
#: before its first header as a member; legacy torch files are pickles)
_READS_OFFSET_ZERO = {"zip"}


def readings(head: bytes, name: str, stream: BinaryIO) -> list[str]:
    """Every format some loader could read the stream as: the first rule that matches decides
    what the file is, and offset 0 is also read as a pickle whenever it parses as one, and as
    each other container that claims it (one format per rule family, see detect.py)."""
    found = list(detect.detect_all(head, name, stream))
    if "pickle" in found and found[0] != "pickle":
        families = {rule.family for rule in detect.rules() if rule.format in found}
        if families & _READS_OFFSET_ZERO:
            found.remove("pickle")
    return found


class _Context(ScanContext):
    def __init__(self, scan: _Scan, source: str, scanner: str, depth: int):
        self._scan = scan
        self.settings = scan.settings
        self.limits = scan.limits
        self.depth = depth
        self.source = source
        self.scanner = scanner
        self.findings: list[Finding] = []
        self.errors: list[ScanError] = []
        self.members: list[FileResult] = []

    def report(self, rule_id, severity, description, *, module="", operator="", offset=None, call=None, source=None) -> Finding:
        finding = Finding(
            rule_id=rule_id,
            severity=Severity(severity),
            description=description,
            source=source or self.source,
            scanner=self.scanner,
            module=module,
            operator=operator,
            offset=offset,
            call=call,
        )
        self.findings.append(finding)
        return finding

    def error(self, description, category="MODEL_SCAN", incomplete=False) -> ScanError:
        err = ScanError(category, description, self.source, incomplete)
        self.errors.append(err)
        return err

    def charge_bytes(self, nbytes: int) -> bool:
        self._scan.decompressed += nbytes
        return self._scan.decompressed <= self.limits.max_total_bytes

    def scan_member(self, name, open_stream, size, format_hint=None) -> None:
        source = f"{self.source}:{name}"
        if self.depth + 1 > self.limits.max_depth:
            error = ScanError("NESTED_ZIP", f"nesting deeper than limits.max_depth={self.limits.max_depth}; not scanned", source, True)
            self.members.append(FileResult(source, "unknown", size, errors=(error,), scanned=False))
            return
        self._scan.members += 1
        if self._scan.members > self.limits.max_members:
            if self._scan.members == self.limits.max_members + 1:
                self.error(f"more than limits.max_members={self.limits.max_members} members; the rest were not scanned", "NESTED_ZIP", incomplete=True)
            return
        stream = open_stream()
        try:
            self.members.append(self._scan.scan_item(stream, source, size, name, format_hint, depth=self.depth + 1))
        finally:
            stream.close()


_PRINTABLE_ASCII = bytes(range(32, 127)) + b"\t\n\r"


def _is_text(head: bytes) -> bool:
    """Text (any 8-bit encoding): no NUL bytes and almost no control characters. No loader of
    a claimed model format executes text (a protocol-0 pickle is text too, but detection has
    already claimed those)."""
    if not head or b"\x00" in head:
        return False
    controls = sum(head.count(bytes([c])) for c in range(1, 32) if c not in (9, 10, 12, 13, 27))
    ascii_printable = len(head) - len(head.translate(None, _PRINTABLE_ASCII))
    return controls <= len(head) // 100 and ascii_printable >= len(head) * 3 // 4


def sha256_stream(stream: BinaryIO) -> str:
    """The sha256 of a whole seekable stream, read in 1 MiB chunks; leaves it at 0."""
    digest = hashlib.sha256()
    stream.seek(0)
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    stream.seek(0)
    return digest.hexdigest()


def _stream_size(stream: BinaryIO) -> int:
    pos = stream.tell()
    end = stream.seek(0, os.SEEK_END)
    stream.seek(pos)
    return end
