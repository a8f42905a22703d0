"""Describe a file in a Hugging Face hub cache as a user knows it: repo, revision, file name.

The bytes live in ``<repo_folder>/blobs/<etag>`` (no extension), the names users know are
relative symlinks ``snapshots/<commit>/<path> -> ../../blobs/<etag>``, and since
huggingface_hub 1.32 a repo blob may itself be a symlink into a shared store
``<cache>/blobs/<2hex>/<hash>``. This module maps a scanned path back through those links.
It only reads directory entries and links; the walk over snapshots is bounded.
"""

from __future__ import annotations

import os
import re

_REPO = re.compile(r"^(models|datasets|spaces)--(.+)$")
_MAX_LINKS = 20000


def _repo_id(folder: str) -> tuple[str, str] | None:
    m = _REPO.match(folder)
    if not m:
        return None
    return m.group(1)[:-1], m.group(2).replace("--", "/")


def describe(path: str) -> dict | None:
    """{repo_type, repo_id, etag?, files: [{revision, file}]} or None if not in an HF cache."""
    parts = path.split(os.sep)
    for i in range(len(parts) - 1, 0, -1):
        rid = _repo_id(parts[i])
        if rid is None:
            continue
        repo_type, repo_id = rid
        repo_dir = os.sep.join(parts[: i + 1])
        rest = parts[i + 1:]
        out: dict = {"repo_type": repo_type, "repo_id": repo_id}
        if len(rest) == 2 and rest[0] == "blobs":
            out["etag"] = rest[1]
            out["files"] = _links_to(repo_dir, path)
        elif len(rest) >= 3 and rest[0] == "snapshots":
            out["files"] = [{"revision": rest[1], "file": "/".join(rest[2:])}]
        else:
            return None
        return out
    # >= 1.32 shared store: <cache>/blobs/<2hex>/<hash>, pointed at by repo blobs
    if len(parts) >= 3 and parts[-3] == "blobs" and re.fullmatch(r"[0-9a-f]{2}", parts[-2] or ""):
        cache = os.sep.join(parts[:-3])
        return _shared_blob(cache, path)
    return None


def _links_to(repo_dir: str, blob: str) -> list[dict]:
    found: list[dict] = []
    snaps = os.path.join(repo_dir, "snapshots")
    seen = 0
    real_blob = os.path.realpath(blob)
    for dirpath, _dirs, files in os.walk(snaps):
        for name in files:
            seen += 1
            if seen > _MAX_LINKS:
                return found
            link = os.path.join(dirpath, name)
            if os.path.islink(link) and os.path.realpath(link) == real_blob:
                rel = os.path.relpath(link, snaps).split(os.sep)
                found.append({"revision": rel[0], "file": "/".join(rel[1:])})
    return found


def _shared_blob(cache: str, path: str) -> dict | None:
    try:
        entries = os.listdir(cache)
    except OSError:
        return None
    real = os.path.realpath(path)
    for folder in entries:
        rid = _repo_id(folder)
        if rid is None:
            continue
        blobs = os.path.join(cache, folder, "blobs")
        try:
            names = os.listdir(blobs)
        except OSError:
            continue
        for name in names:
            link = os.path.join(blobs, name)
            if os.path.islink(link) and os.path.realpath(link) == real:
                return {"repo_type": rid[0], "repo_id": rid[1], "etag": name,
                        "files": _links_to(os.path.join(cache, folder), link), "shared_blob": True}
    return None


def snapshot_link(path: str) -> bool:
    """Is this a snapshots/<rev>/<file> entry of a hub cache?"""
    parts = path.split(os.sep)
    for i in range(len(parts) - 1, 0, -1):
        if _REPO.match(parts[i]):
            return len(parts) - i >= 4 and parts[i + 1] == "snapshots"
    return False
