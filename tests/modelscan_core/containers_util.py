"""Helpers for the container tests: payloads, zip surgery, scanning a path as a user would.

Payloads are harmless (`touch` a temp file, `echo`) and are only ever written, never loaded.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

from modelscan_core import scan_path
from modelscan_core.model import ScanReport, Severity

from .pickle_ops import Reduce


def payload(proto: int = 2, marker: str = "/tmp/modelscand-test-marker") -> bytes:
    return pickle.dumps(Reduce(os.system, (f"touch {marker}",)), protocol=proto)


def payload_obj(marker: str = "/tmp/modelscand-test-marker"):
    return Reduce(os.system, (f"touch {marker}",))


def high(report: ScanReport) -> list:
    return [f for f in report.findings() if f.severity >= Severity.HIGH]


def assert_caught(path: Path, source_part: str | None = None, settings=None) -> ScanReport:
    """The file is flagged HIGH/CRITICAL for os.system, at a source naming `source_part`."""
    report = scan_path(path, settings)
    bad = high(report)
    assert bad, f"nothing HIGH in {path.name}: {report.findings()} errors={report.all_errors()}"
    assert any(f.operator == "system" for f in bad), bad
    assert report.files[0].verdict.value == "issues"
    if source_part is not None:
        assert any(source_part in f.source for f in bad), [f.source for f in bad]
    return report


def assert_clean(path: Path) -> ScanReport:
    report = scan_path(path)
    assert not report.findings(), [(f.severity.name, f.source, f.module, f.operator) for f in report.findings()]
    assert not report.all_errors(), report.all_errors()
    assert report.files[0].verdict.value == "clean"
    return report


def replace_member(src: bytes, name_suffix: str, data: bytes) -> bytes:
    """Rewrite a zip with `name_suffix`'s member replaced (stored), other members copied."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            body = data if info.filename.endswith(name_suffix) else zin.read(info.filename)
            zout.writestr(info.filename, body)
    return out.getvalue()


def corrupt_crcs(data: bytes) -> bytes:
    """Flip every CRC in local and central headers (zipfile refuses the members, torch does not)."""
    buf = bytearray(data)
    for sig, off in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):
        pos = buf.find(sig)
        while pos >= 0:
            crc = struct.unpack_from("<I", buf, pos + off)[0]
            struct.pack_into("<I", buf, pos + off, crc ^ 0xDEADBEEF)
            pos = buf.find(sig, pos + 4)
    return bytes(buf)


def zip_bytes(members: list[tuple[str, bytes]], method=zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as z:
        for name, body in members:
            with __import__("warnings").catch_warnings():
                __import__("warnings").simplefilter("ignore")
                z.writestr(name, body)
    return out.getvalue()


def zlib_crc(data: bytes) -> int:
    return zlib.crc32(data)
