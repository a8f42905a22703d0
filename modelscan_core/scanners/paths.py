"""Paths a file names for a loader to open or an extractor to write: do they stay inside?

One judgement for every format that carries paths: archive members (tar, the `.keras`
zip), the external data of ONNX tensors, Keras layer and asset names that become paths.
A path escapes when it is absolute (POSIX, Windows drive or UNC), climbs with `..`, or
holds a NUL byte (C code stops at it, Python does not).
"""

from __future__ import annotations

import posixpath
import re

_DRIVE = re.compile(r"[A-Za-z]:")


def escapes(path: str) -> str | None:
    """Why `path` leaves the directory it is relative to, or None when it stays inside."""
    if "\x00" in path:
        return "a path with a NUL byte"
    if path.startswith(("/", "\\")) or _DRIVE.match(path):
        return "an absolute path"
    if ".." in re.split(r"[/\\]", path):
        return "a path that climbs out with '..'"
    return None


def link_escapes(member: str, target: str) -> str | None:
    """Why a symbolic link stored as `member` and pointing at `target` leads outside the
    extraction directory, or None when it stays inside (tarfile's 'data' filter rule)."""
    if "\x00" in target:
        return "a link target with a NUL byte"
    if target.startswith(("/", "\\")) or _DRIVE.match(target):
        return f"a link to the absolute path {target!r}"
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(member.replace("\\", "/")), target.replace("\\", "/")))
    if joined == ".." or joined.startswith("../"):
        return f"a link to {target!r}, outside the extraction directory"
    return None
