"""A read-only view of a byte range of another stream, without copying it."""

from __future__ import annotations

import io
from typing import BinaryIO


class Window(io.RawIOBase):
    """Bytes `offset .. offset+length` of `base`, as a seekable stream of their own.

    Used for a pickle nested in a pickle, an array inside a joblib file, a member stored
    uncompressed in a zip: the scanner reads them in place, never as one big copy.
    """

    def __init__(self, base: BinaryIO, offset: int, length: int):
        super().__init__()
        self._base = base
        self._offset = offset
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            pos += self._pos
        elif whence == io.SEEK_END:
            pos += self._length
        self._pos = max(0, pos)
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        self._base.seek(self._offset + self._pos)
        data = self._base.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        remaining = self._length - self._pos
        if size is None or size < 0 or size > remaining:
            size = remaining
        if size <= 0:
            return b""
        self._base.seek(self._offset + self._pos)
        data = self._base.read(size)
        self._pos += len(data)
        return data
