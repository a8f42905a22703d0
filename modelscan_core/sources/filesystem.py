"""Files on disk: walk a path, yield what can be scanned and a clear error for what cannot.

Symlinked directories are followed once (a loop is an error, not a hang), symlinked files
are scanned through their target, and sockets, FIFOs and devices are reported rather than
opened (opening a FIFO would block forever).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Iterator

from modelscan_core.model import ScanError


@dataclass(frozen=True)
class FileEntry:
    path: str  # absolute
    source: str  # relative to the scan root, as reports show it


def walk(root: str, base: str) -> Iterator[FileEntry | ScanError]:
    """Every regular file under `root` (a file or directory), named relative to `base`."""
    try:
        st = os.stat(root)
    except OSError as exc:
        yield ScanError("PATH", f"cannot access: {exc.strerror or exc}", _rel(root, base))
        return
    if not stat.S_ISDIR(st.st_mode):
        yield from _one(root, base, st)
        return
    seen: set[tuple[int, int]] = {(st.st_dev, st.st_ino)}
    yield from _walk_dir(root, base, seen)


def _walk_dir(directory: str, base: str, seen: set[tuple[int, int]]) -> Iterator[FileEntry | ScanError]:
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield ScanError("PATH", f"cannot list directory: {exc.strerror or exc}", _rel(directory, base))
        return
    for entry in entries:
        path = entry.path
        try:
            st = os.stat(path)  # follows symlinks: a link is judged by what it points at
        except OSError as exc:
            problem = "broken symlink" if os.path.islink(path) else (exc.strerror or str(exc))
            yield ScanError("PATH", f"cannot access: {problem}", _rel(path, base))
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in seen:
                yield ScanError("PATH", "directory loop: this symlink leads back to a directory already scanned", _rel(path, base))
                continue
            seen.add(key)
            yield from _walk_dir(path, base, seen)
        else:
            yield from _one(path, base, st)


def _one(path: str, base: str, st: os.stat_result) -> Iterator[FileEntry | ScanError]:
    if stat.S_ISREG(st.st_mode):
        yield FileEntry(os.path.abspath(path), _rel(path, base))
        return
    kind = "socket" if stat.S_ISSOCK(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode) else "device or special file"
    yield ScanError("PATH", f"not a regular file ({kind}); not opened", _rel(path, base))


def _rel(path: str, base: str) -> str:
    try:
        rel = os.path.relpath(path, base)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel
