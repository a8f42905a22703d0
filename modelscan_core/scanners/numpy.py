"""NumPy `.npy`: the header parsed as `np.lib.format` parses it, without importing numpy.

An array of plain numbers is raw bytes and runs nothing. An array whose dtype holds Python
objects (`O`, or a structured dtype with an `O` field) is stored as a pickle right after the
header, which `np.load(allow_pickle=True)` unpickles: that pickle is scanned. `.npz` files
are zips of `.npy` members and reach this scanner through the zip scanner.
"""

from __future__ import annotations

import ast
import re
import struct

from modelscan_core.detect import Rule
from modelscan_core.scanners import Format, ScannerSettings
from modelscan_core.scanners.interface import Item, ScanContext, Scanner, ScanFailed

MAGIC = b"\x93NUMPY"
#: np.lib.format refuses headers longer than 10000 by default (max_header_size), but not with
#: allow_pickle=True, which an object array needs: any length is read. Past this one the
#: scanner stops (incomplete) rather than parse an absurd header.
MAX_HEADER = 64 << 20


class NumpyScanner(Scanner):
    name = "modelscan.scanners.NumpyUnsafeOpScan"
    formats = ("numpy",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        stream = item.stream
        stream.seek(0)
        fixed = stream.read(8)
        if len(fixed) < 8 or not fixed.startswith(MAGIC):
            raise ScanFailed("not an .npy file (bad magic)", "MODEL_SCAN")
        major = fixed[6]
        if major == 1:
            (hlen,) = struct.unpack("<H", stream.read(2))
            start = 10
        elif major in (2, 3):
            (hlen,) = struct.unpack("<I", stream.read(4))
            start = 12
        else:
            raise ScanFailed(f".npy format version {major}.{fixed[7]} is not one numpy reads", "MODEL_SCAN")
        if hlen > MAX_HEADER:
            raise ScanFailed(f".npy header of {hlen} bytes is longer than the scan limit", "MODEL_SCAN", incomplete=True)
        raw = stream.read(hlen)
        if len(raw) < hlen:
            raise ScanFailed(".npy header is truncated", "MODEL_SCAN")
        header = _parse_header(raw, major)
        descr = header["descr"]
        if not _has_object(descr):
            return  # raw numbers: np.load never unpickles them
        data = start + hlen
        stream.seek(data)
        # np.load(allow_pickle=True) calls pickle.load on what follows the header
        from modelscan_core.scanners.pickle.scanner import scan_pickles

        scan_pickles(stream, item.size, ctx, scanner=self.name)


_PY2_LONG = re.compile(r"\b(\d+)[lL]\b")


def _parse_header(raw: bytes, major: int) -> dict:
    text = raw.decode("utf-8" if major >= 3 else "latin-1", "replace")
    # Python 2 wrote long integers with an L suffix (`(3L, 4L)`); numpy's loader drops it too
    text = _PY2_LONG.sub(r"\1", text)
    try:
        header = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ScanFailed(f".npy header is not a Python literal numpy accepts: {exc}", "MODEL_SCAN") from None
    if not isinstance(header, dict) or not {"descr", "fortran_order", "shape"} <= set(header):
        raise ScanFailed(".npy header lacks descr/fortran_order/shape", "MODEL_SCAN")
    return header


def _has_object(descr: object, depth: int = 0) -> bool:
    """True when a dtype description holds Python objects anywhere (np.dtype(descr).hasobject)."""
    if depth > 32:
        return True  # fail closed on absurd nesting
    if isinstance(descr, str):
        # comma lists ("i4,O") and subarrays ("(2,)O") too: no other type code or unit has an O
        return "O" in descr or "object" in descr
    if isinstance(descr, list):
        for field in descr:
            if isinstance(field, (tuple, list)) and len(field) >= 2 and _has_object(field[1], depth + 1):
                return True
        return False
    if isinstance(descr, tuple) and descr:
        return _has_object(descr[0], depth + 1)
    if isinstance(descr, dict):
        return any(_has_object(v, depth + 1) for v in descr.get("formats", []))
    return True  # a description the scanner does not understand: assume the worst


FORMATS = (
    Format("numpy", "NumpyScanner", "numpy",
           rules=(Rule(priority=310, magics=(MAGIC,), sniff="modelscan_core.sources.sniff:npy"),),
           extensions=(".npy", ".npz")),
)

SETTINGS = (ScannerSettings("numpy", "modelscan.scanners.NumpyUnsafeOpScan", {"enabled": True, "supported_extensions": [".npy"]}),)
