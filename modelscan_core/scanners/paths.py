"""Paths a file names for a loader to open or an extractor to write: do they stay inside?

One judgement for every format that carries paths: archive members (tar, the `.keras`
zip), the external data of ONNX tensors, Keras layer and asset names that become paths,
the side files of old joblib pickles. A path escapes when it is absolute (POSIX, Windows
drive or UNC), climbs with `..` (also `.. ` and `...`, which Windows path normalisation
turns into `..` by dropping trailing dots and spaces), or holds a NUL byte (C code stops at
it, Python does not). `resolves_outside` says where a lexically harmless path really leads
on disk, through symbolic links in any of its components.
"""

from __future__ import annotations

import os
import posixpath
import re

_DRIVE = re.compile(r"[A-Za-z]:")
_SEPARATORS = re.compile(r"[/\\]")


def escapes(path: str) -> str | None:
    """Why `path` leaves the directory it is relative to, or None when it stays inside."""
    if "\x00" in path:
        return "a path with a NUL byte"
    if path.startswith(("/", "\\")) or _DRIVE.match(path):
        return "an absolute path"
    if any(_climbs(part) for part in _SEPARATORS.split(path)):
        return "a path that climbs out with '..'"
    return None


def _climbs(part: str) -> bool:
    return part == ".." or (".." in part and not part.rstrip(". "))


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


def resolves_outside(base: str | bytes, relative: str | bytes, roots: tuple[str | bytes, ...] = ()) -> str | None:
    """Where `relative`, opened under directory `base`, really leads when that is outside `base`
    (or outside every one of `roots`, directories that count as inside too): through a symbolic
    link in any component, whether or not the link's target exists yet. Pass bytes to resolve
    names that are not UTF-8 as the kernel sees them."""
    target = os.path.join(base, relative)
    if not os.path.lexists(target):
        return None  # nothing there: nothing to read
    real = os.path.realpath(target)
    inside = [os.path.realpath(base)] + [os.path.realpath(r) for r in roots]
    if any(_under(os.fsdecode(real), os.fsdecode(root)) for root in inside):
        return None
    return f"which resolves through a symbolic link to {os.fsdecode(real)!r}, outside the model's directory"


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
