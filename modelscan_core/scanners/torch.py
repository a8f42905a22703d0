"""PyTorch's pre-zip formats, read the way `torch.serialization._legacy_load` reads them.

- Legacy stream (`_use_new_zipfile_serialization=False`): five pickles in a row (magic
  number, protocol version, sys_info, the object, the storage keys), then raw storage bytes
  that torch never unpickles. All five are scanned (a payload may sit in any of them, and
  `pickle.load` runs each one); the raw bytes after them are not read as opcodes.
- Legacy tar (members `sys_info`, `storages`, `tensors`, `pickle`): the archive scanner
  hands `pickle`/`sys_info` over as pickles; `storages` and `tensors` interleave pickles with
  raw records, and are followed here record by record exactly as torch reads them.

The zip format (torch >= 1.6, TorchScript, torch.export) is a zip: see archives.py.
"""

from __future__ import annotations

import re
import struct

from modelscan_core.detect import Rule
from modelscan_core.scanners import Format, ScannerSettings
from modelscan_core.scanners.interface import Item, ScanContext, Scanner, ScanFailed
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelscan_core.scanners.pickle.vm import StreamFacts

LEGACY_PICKLES = 5

#: element size of torch's legacy storage classes (torch.FloatStorage, torch.cuda.HalfStorage, ...)
_ELEMENT_SIZE = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1, "Byte": 1,
    "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8, "QUInt8": 1, "QInt8": 1, "QInt32": 4, "QUInt4x2": 1,
    "QUInt2x4": 1, "Untyped": 1,
}
_STORAGE_NAME = re.compile(r"(\w*?)Storage\Z")


class LegacyTorchScanner(Scanner):
    name = "modelscan.scanners.PyTorchUnsafeOpScan"
    formats = ("pytorch_legacy",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        item.stream.seek(0)
        from modelscan_core.scanners.pickle.scanner import scan_pickles

        done = scan_pickles(item.stream, item.size, ctx, scanner=self.name, max_streams=LEGACY_PICKLES)
        complete = [f for f in done if f.stopped]
        if len(complete) < LEGACY_PICKLES and not any(f.error for f in done):
            ctx.error(f"legacy torch file holds {len(complete)} of its {LEGACY_PICKLES} pickles; torch.load would fail",
                      "MODEL_SCAN")


class _Records:
    """Reads torch's interleaved pickle/raw records from one tar member."""

    def __init__(self, item: Item, ctx: ScanContext, scanner: str):
        self.item, self.ctx, self.scanner = item, ctx, scanner
        self.pos = 0

    def pickle(self) -> StreamFacts:
        from modelscan_core.scanners.pickle.scanner import scan_pickles

        # torch opens the extracted member unbuffered (no peek): a frame is read whole, and
        # what follows the record starts where the frame holding its STOP ends
        stream = self.item.stream
        stream.seek(self.pos)
        done = scan_pickles(stream, self.item.size, self.ctx, scanner=self.scanner, max_streams=1, reader="file")
        if not done:
            raise ScanFailed(f"no pickle at offset {self.pos}", "PICKLE_GENOPS")
        facts = done[0]
        if not facts.stopped:
            raise ScanFailed(f"record pickle at offset {self.pos} is broken; torch.load stops here", "PICKLE_GENOPS")
        self.pos = facts.next_start
        return facts

    def raw(self, n: int) -> bytes:
        stream = self.item.stream
        stream.seek(self.pos)
        data = stream.read(n)
        if len(data) < n:
            raise ScanFailed(f"record at offset {self.pos} is truncated", "MODEL_SCAN")
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if self.pos + n > self.item.size:
            raise ScanFailed(f"raw storage at offset {self.pos} runs past the end of the member", "MODEL_SCAN")
        self.pos += n

    def count(self) -> int:
        """A pickle whose value is an int (the record count); scanned like any other."""
        start = self.pos
        value = self.pickle().value
        if not isinstance(value, int):
            raise ScanFailed(f"record count at offset {start} is not a plain integer; the rest was not scanned",
                             "MODEL_SCAN", incomplete=True)
        return value


class LegacyTarStoragesScanner(Scanner):
    """The `storages` member: count, then per storage a pickle (key, location, type) and raw data."""

    name = "modelscan.scanners.PyTorchUnsafeOpScan"
    formats = ("pytorch_tar_storages",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        rec = _Records(item, ctx, self.name)
        for _ in range(rec.count()):
            facts = rec.pickle()
            size = _element_size(facts.value)
            if size is None:
                raise ScanFailed(f"storage record before offset {rec.pos} names no storage type the scanner knows; "
                                 "the rest was not scanned", "MODEL_SCAN", incomplete=True)
            (numel,) = struct.unpack("<q", rec.raw(8))
            if numel < 0:
                raise ScanFailed(f"negative storage size at offset {rec.pos - 8}", "MODEL_SCAN")
            rec.skip(numel * size)
        rec.pickle()  # storage views


class LegacyTarTensorsScanner(Scanner):
    """The `tensors` member: count, then per tensor a pickle and a fixed binary record."""

    name = "modelscan.scanners.PyTorchUnsafeOpScan"
    formats = ("pytorch_tar_tensors",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        rec = _Records(item, ctx, self.name)
        for _ in range(rec.count()):
            rec.pickle()
            (ndim,) = struct.unpack("<i", rec.raw(4))
            if ndim < 0:
                raise ScanFailed(f"negative tensor rank at offset {rec.pos - 4}", "MODEL_SCAN")
            rec.skip(4 + 16 * ndim + 8)


def _element_size(record: object) -> int | None:
    """The element size of the storage type a record names: `(key, location, storage_type)`,
    the third item being what torch reads (`storage_type._dtype`), a torch storage class."""
    from modelscan_core.scanners.pickle.values import GlobalRef

    if not (type(record) is tuple and len(record) == 3 and isinstance(record[2], GlobalRef)):
        return None
    ref = record[2]
    m = _STORAGE_NAME.match(ref.name)
    if ref.module.startswith("torch") and m and m.group(1) in _ELEMENT_SIZE:
        return _ELEMENT_SIZE[m.group(1)]
    return None


FORMATS = (
    Format("pytorch_legacy", "LegacyTorchScanner", "pytorch",
           rules=(Rule(priority=300, magics=(b"\x80", b"L"), sniff="modelscan_core.sources.sniff:legacy_torch", family="pickle"),),
           extensions=(".pt", ".pth", ".ckpt")),
    # records of the legacy tar, handed over by the tar scanner (archives.LEGACY_TORCH_TAR)
    Format("pytorch_tar_storages", "LegacyTarStoragesScanner", "pytorch"),
    Format("pytorch_tar_tensors", "LegacyTarTensorsScanner", "pytorch"),
)

SETTINGS = (
    ScannerSettings("pytorch", "modelscan.scanners.PyTorchUnsafeOpScan",
                    {"enabled": True, "supported_extensions": [".bin", ".pt", ".pth", ".ckpt"]}),
)
