"""Zip archives read the way PyTorch's miniz reader reads them, plus what other readers see.

Python's `zipfile` and miniz (PyTorch's `PyTorchStreamReader`) disagree on purpose-built
files, and an attacker picks whichever the scanner does not use. So this reader parses the
headers itself and returns every *candidate* member a loader could read:

- the end record is the last one in the file (both readers search backwards);
- a member's data starts after its *local* header's name and extra field (miniz and zipfile
  both do this), its size comes from the central directory;
- CRCs are never checked, flag bits never refuse a member (miniz loads bad CRCs);
- every copy of a duplicated name is a candidate (zipfile reads the last, miniz the first);
- a local header whose sizes or method disagree with the central directory adds a second
  candidate with the local values; a local header no central entry points at (found by
  walking the local headers) is a candidate too;
- bytes before the archive are handled both ways: offsets as written (miniz) and shifted by
  the prepended length (zipfile); the prepended bytes themselves are reported as `prefix`
  so the caller can scan them (torch.load reads such a file as a legacy pickle).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

EOCD_SIG = b"PK\x05\x06"
EOCD64_LOC_SIG = b"PK\x06\x07"
EOCD64_SIG = b"PK\x06\x06"
CENTRAL_SIG = b"PK\x01\x02"
LOCAL_SIG = b"PK\x03\x04"

_EOCD = struct.Struct("<4sHHHHIIH")
_EOCD64_LOC = struct.Struct("<4sIQI")
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")

TAIL = 65536 + 22
#: a central directory larger than this is not read (an incomplete error, not a guess)
MAX_CENTRAL = 256 << 20
#: local headers walked looking for members the central directory does not list
MAX_WALK = 200_000


class ZipFormatError(Exception):
    """Not a zip any loader would open."""


@dataclass
class ZipMember:
    name: str
    method: int
    data_offset: int
    compressed_size: int
    size: int
    flags: int
    why: str = ""  # "" for the central directory's view; else what makes this candidate differ


@dataclass
class ZipListing:
    members: list[ZipMember] = field(default_factory=list)
    prefix: int = 0  # bytes before the first local header / the archive (0: none)
    problems: list[str] = field(default_factory=list)  # oddities a person may want to know


#: offsets and lengths past this come from a damaged or hostile record (zip64 fields are 64-bit)
_MAX_OFFSET = 1 << 60


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    """n bytes at offset; nothing for an offset or length no file has."""
    if not (0 <= offset < _MAX_OFFSET and 0 <= n < _MAX_OFFSET):
        return b""
    f.seek(offset)
    return f.read(n)


def _size(f: BinaryIO) -> int:
    return f.seek(0, os.SEEK_END)


def find_end(f: BinaryIO, size: int | None = None) -> tuple[int, tuple] | None:
    """The last end-of-central-directory record: (offset, fields) or None."""
    size = _size(f) if size is None else size
    start = max(0, size - TAIL)
    tail = _read_at(f, start, size - start)
    end = len(tail)
    while True:
        pos = tail.rfind(EOCD_SIG, 0, end)
        if pos < 0:
            return None
        if pos + 22 <= len(tail):
            fields = _EOCD.unpack_from(tail, pos)
            # A real end record describes a directory that fits before it.
            if all(v == 0xFFFFFFFF or v <= start + pos for v in (fields[5], fields[6])):
                return start + pos, fields
        end = pos + 3


def looks_like_zip(f: BinaryIO, head: bytes) -> bool:
    """A zip by content: local header magic at 0, or an end record whose directory parses."""
    if head.startswith((LOCAL_SIG, EOCD_SIG)):
        return True
    try:
        listing = read_listing(f, walk=False)
    except (ZipFormatError, OSError, struct.error):
        return False
    return bool(listing.members)


def read_listing(f: BinaryIO, *, walk: bool = True, size: int | None = None) -> ZipListing:
    size = _size(f) if size is None else size
    end = find_end(f, size)
    listing = ZipListing()
    if end is None:
        if walk and _read_at(f, 0, 4) == LOCAL_SIG:
            listing.problems.append("no end-of-central-directory record; members found by walking local headers")
            _walk_locals(f, size, listing, set(), 0)
            if listing.members:
                return listing
        raise ZipFormatError("no end-of-central-directory record")
    eocd_pos, fields = end
    entries, cd_size, cd_offset = fields[4], fields[5], fields[6]
    cd_end = eocd_pos
    z64 = _zip64(f, eocd_pos)  # torch writes zip64 records even for small archives
    if z64 is not None:
        entries, cd_size, cd_offset, cd_end = z64
    # zipfile: everything is shifted by the bytes prepended before the archive
    shift = max(0, cd_end - cd_size - cd_offset)
    if cd_size > MAX_CENTRAL:
        raise ZipFormatError(f"central directory of {cd_size} bytes is larger than the scan limit")
    bases = [0] + ([shift] if shift else [])
    central = None
    for base in bases:
        data = _read_at(f, cd_offset + base, cd_size)
        if data[:4] == CENTRAL_SIG or (entries == 0 and not data):
            central, central_base = data, base
            break
    if central is None:
        raise ZipFormatError("central directory not found where the end record says")
    seen: set[tuple[int, int, int]] = set()
    local_offsets: set[int] = set()
    pos = 0
    count = 0
    while pos + 46 <= len(central) and central[pos : pos + 4] == CENTRAL_SIG:
        (_, _vm, _vn, flags, method, _t, _d, _crc, csize, usize, nlen, xlen, clen, _disk, _ia, _ea, lho) = _CENTRAL.unpack_from(
            central, pos
        )
        raw_name = central[pos + 46 : pos + 46 + nlen]
        extra = central[pos + 46 + nlen : pos + 46 + nlen + xlen]
        pos += 46 + nlen + xlen + clen
        count += 1
        usize, csize, lho = _apply_zip64(extra, usize, csize, lho)
        name = _decode_name(raw_name, flags)
        offsets = [lho] + ([lho + shift] if shift else [])
        if central_base and lho + central_base not in offsets:
            offsets.append(lho + central_base)
        found = False
        for lo in offsets:
            local = _read_at(f, lo, 30)
            if len(local) < 30 or local[:4] != LOCAL_SIG:
                continue
            found = True
            local_offsets.add(lo)
            (_, _v, lflags, lmethod, _lt, _ld, _lcrc, lcsize, lusize, lnlen, lxlen) = _LOCAL.unpack_from(local, 0)
            data_offset = lo + 30 + lnlen + lxlen
            _add(listing, seen, ZipMember(name, method, data_offset, csize, usize, flags, "" if lo == lho else "shifted by prepended bytes"))
            if lnlen + lxlen and lcsize not in (0, 0xFFFFFFFF) and not (lflags & 8) and (lcsize != csize or lmethod != method):
                lextra = _read_at(f, lo + 30 + lnlen, lxlen)
                lusize, lcsize, _ = _apply_zip64(lextra, lusize, lcsize, lo)
                _add(listing, seen, ZipMember(name, lmethod, data_offset, lcsize, lusize, lflags, "local header values"))
                listing.problems.append(f"{name}: local header disagrees with the central directory")
        if not found:
            listing.problems.append(f"{name}: no local header at offset {lho}; not readable")
    if count < entries and entries != 0xFFFF:
        listing.problems.append(f"end record announces {entries} members, the central directory holds {count}")
    first = min(local_offsets) if local_offsets else 0
    if walk:
        _walk_locals(f, size, listing, seen, first, local_offsets)
    if first > 0:
        listing.prefix = first
    return listing


def _add(listing: ZipListing, seen: set, member: ZipMember) -> None:
    key = (member.data_offset, member.compressed_size, member.method)
    if key in seen:
        return
    seen.add(key)
    listing.members.append(member)


def _walk_locals(f: BinaryIO, size: int, listing: ZipListing, seen: set, start: int, known: set[int] | None = None) -> None:
    """Follow local headers one after another; members the directory does not list are candidates."""
    known = known or set()
    by_offset = {m.data_offset: m for m in listing.members}
    pos = start
    for _ in range(MAX_WALK):
        local = _read_at(f, pos, 30)
        if len(local) < 30 or local[:4] != LOCAL_SIG:
            return
        (_, _v, lflags, lmethod, _lt, _ld, _lcrc, lcsize, lusize, lnlen, lxlen) = _LOCAL.unpack_from(local, 0)
        name_extra = _read_at(f, pos + 30, lnlen + lxlen)
        data_offset = pos + 30 + lnlen + lxlen
        lusize, lcsize, _ = _apply_zip64(name_extra[lnlen:], lusize, lcsize, pos)
        listed = by_offset.get(data_offset)
        if listed is not None:
            csize = listed.compressed_size
        else:
            csize = lcsize
            if lflags & 8 and csize == 0:
                return  # sizes only in a data descriptor: cannot walk past without inflating
            name = _decode_name(name_extra[:lnlen], lflags)
            if pos not in known:
                _add(listing, seen, ZipMember(name, lmethod, data_offset, lcsize, lusize, lflags, "local header not in the central directory"))
                listing.problems.append(f"{name}: local header at offset {pos} is not in the central directory")
        nxt = data_offset + csize
        if lflags & 8:
            desc = _read_at(f, nxt, 4)
            nxt += 16 if desc == b"PK\x07\x08" else 12
        if nxt <= pos or nxt >= size:
            return
        pos = nxt


def _zip64(f: BinaryIO, eocd_pos: int) -> tuple[int, int, int, int] | None:
    if eocd_pos < 20:
        return None
    loc = _read_at(f, eocd_pos - 20, 20)
    if loc[:4] != EOCD64_LOC_SIG:
        return None
    _, _disk, rec_offset, _disks = _EOCD64_LOC.unpack(loc)
    for candidate in (rec_offset, eocd_pos - 20 - 56):
        rec = _read_at(f, candidate, 56)
        if len(rec) == 56 and rec[:4] == EOCD64_SIG:
            fields = _EOCD64.unpack(rec)
            return fields[7], fields[8], fields[9], candidate
    return None


def _apply_zip64(extra: bytes, usize: int, csize: int, lho: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + n]
        pos += 4 + n
        if tag != 1:
            continue
        i = 0
        if usize == 0xFFFFFFFF and i + 8 <= len(body):
            usize = struct.unpack_from("<Q", body, i)[0]
            i += 8
        if csize == 0xFFFFFFFF and i + 8 <= len(body):
            csize = struct.unpack_from("<Q", body, i)[0]
            i += 8
        if lho == 0xFFFFFFFF and i + 8 <= len(body):
            lho = struct.unpack_from("<Q", body, i)[0]
        break
    return usize, csize, lho


def _decode_name(raw: bytes, flags: int) -> str:
    if flags & 0x800:
        return raw.decode("utf-8", "replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp437")
