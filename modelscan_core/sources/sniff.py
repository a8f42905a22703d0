"""Detection tests for containers: content decides, the name never does.

Each function has detect.py's sniff signature `(head, lowered_basename, stream) -> bool`
and is imported lazily by its `Rule`. They run before the pickle rule, so each one must be
strict: a pickle wrongly claimed by a container rule would not be read as a pickle.
"""

from __future__ import annotations

import bz2
import lzma
import re
import struct
import zlib
from typing import BinaryIO

from modelscan_core.sources import ziparchive

#: torch.save's magic number pickled on its own, the first of a legacy file's pickles
_TORCH_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_LEGACY_TORCH = re.compile(
    rb"\x80[\x02-\x05](?:\x95.{8})?\x8a\x0a" + re.escape(_TORCH_MAGIC) + rb"|(?:\x80[\x00-\x05])?L119547037146038801333356L?\n",
    re.S,
)

_TORCH_MARKERS = ("data.pkl", "constants.pkl", "byteorder", "version", ".format_version", "archive_format", "serialization_id")


def legacy_torch(head: bytes, name: str, stream: BinaryIO) -> bool:
    return bool(_LEGACY_TORCH.match(head))


def torch_zip(head: bytes, name: str, stream: BinaryIO) -> bool:
    """A zip whose names are torch.save / torch.jit.save / torch.export's (`<root>/data.pkl`, ...)."""
    if not zip_any(head, name, stream):
        return False
    try:
        listing = ziparchive.read_listing(stream, walk=False)
    except (ziparchive.ZipFormatError, OSError, struct.error):
        return False
    for member in listing.members:
        parts = member.name.split("/")
        if len(parts) >= 2 and (parts[-1] in _TORCH_MARKERS and (len(parts) == 2 or parts[-2] == ".data")):
            return True
    return False


def zip_any(head: bytes, name: str, stream: BinaryIO) -> bool:
    return ziparchive.looks_like_zip(stream, head)


def tar(head: bytes, name: str, stream: BinaryIO) -> bool:
    """A tar header block: a valid checksum (ustar or v7), as tarfile accepts it."""
    if len(head) < 512:
        return False
    block = head[:512]
    stored = _tar_number(block[148:156])
    if stored is None or block.count(0) == 512:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = sum(struct.unpack("148b", block[:148])) + 8 * 32 + sum(struct.unpack("356b", block[156:]))
    return stored in (unsigned, signed)


def _tar_number(field: bytes) -> int | None:
    """A tar number field read as tarfile.nti reads it: base-256 (0x80/0xff first byte) or
    octal text up to the first NUL."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[:1] == b"\xff" else n
    text = field.split(b"\x00", 1)[0]
    try:
        return int(text.decode("ascii").strip() or "0", 8)
    except (ValueError, UnicodeDecodeError):
        return None


def npy(head: bytes, name: str, stream: BinaryIO) -> bool:
    return head.startswith(b"\x93NUMPY") and len(head) >= 10


def gzip(head: bytes, name: str, stream: BinaryIO) -> bool:
    return head.startswith(b"\x1f\x8b\x08")


def bzip2(head: bytes, name: str, stream: BinaryIO) -> bool:
    if not head.startswith(b"BZh"):
        return False
    try:
        bz2.BZ2Decompressor().decompress(head[:65536], 16)
    except (OSError, EOFError, ValueError):
        return False
    return True


def xz(head: bytes, name: str, stream: BinaryIO) -> bool:
    return head.startswith(b"\xfd7zXZ\x00")


def lzma_alone(head: bytes, name: str, stream: BinaryIO) -> bool:
    """joblib's 'lzma' (FORMAT_ALONE): starts `]\\x00`, which no pickle can (0x00 is no opcode)."""
    if not head.startswith(b"\x5d\x00"):
        return False
    try:
        lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(head[:65536], 16)
    except (lzma.LZMAError, EOFError):
        return False
    return True


def zlib_stream(head: bytes, name: str, stream: BinaryIO) -> bool:
    """joblib's default compression: a bare zlib stream (0x78 is no pickle opcode)."""
    if len(head) < 2 or head[0] != 0x78 or (head[0] << 8 | head[1]) % 31:
        return False
    try:
        zlib.decompressobj().decompress(head[:65536], 16)
    except zlib.error:
        return False
    return True


def lz4_frame(head: bytes, name: str, stream: BinaryIO) -> bool:
    return head.startswith(b"\x04\x22\x4d\x18")


def joblib_zfile(head: bytes, name: str, stream: BinaryIO) -> bool:
    """joblib <= 0.9's 'ZF' files: b'ZF' + hex length padded to 19 bytes + zlib data."""
    if not head.startswith(b"ZF") or len(head) < 23:
        return False
    try:
        # hex(length), padded with spaces; Python 2's joblib wrote a long with an L suffix
        int(head[2:21].decode("ascii").strip().rstrip("Ll"), 16)
    except ValueError:
        return False
    return True


def sevenzip(head: bytes, name: str, stream: BinaryIO) -> bool:
    return head.startswith(b"7z\xbc\xaf\x27\x1c")
