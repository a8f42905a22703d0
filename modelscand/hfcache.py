"""Describe a file in a Hugging Face hub cache as a user knows it: repo, revision, file name.

The bytes live in ``<repo_folder>/blobs/<etag>`` (no extension), the names users know are
relative symlinks ``snapshots/<commit>/<path> -> ../../blobs/<etag>``, and since
huggingface_hub 1.32 a repo blob may itself be a symlink into a shared store
``<cache>/blobs/<2hex>/<hash>``. This module maps a scanned path back through those links.

The daemon runs as root and these directories belong to users, so nothing here follows a
symlink: every directory is opened one component at a time with ``O_NOFOLLOW`` (from the
watched root, or from ``/``), links are read with ``readlink`` by directory fd and resolved
as text, never through the filesystem. A ``snapshots`` (or ``refs``) that a user turned into
a link to somewhere else is simply not read. Walks are bounded.
"""

from __future__ import annotations

import errno
import os
import re

_REPO = re.compile(r"^(models|datasets|spaces)--(.+)$")
_MAX_LINKS = 20000
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def open_dir(path: str, root: str | None = None) -> int:
    """A dir fd for the absolute `path`, opened one component at a time, never through a
    symlink: below `root` (itself opened from / without following a link) when `path` is inside
    it, else from ``/`` (a file given as its own root, a root set inside a repo folder).
    Raises OSError (ELOOP or ENOTDIR for a linked component)."""
    if not os.path.isabs(path):
        raise OSError(errno.EINVAL, f"{path!r} is not an absolute path")
    base = root if root is not None and _below(path, root) else os.sep
    rel = os.path.relpath(path, base)
    parts = [] if rel == "." else rel.split(os.sep)
    if any(p in ("", ".", "..") for p in parts):
        raise OSError(errno.EINVAL, f"{path!r} is not a plain path")
    from modelscand.workers import descend, open_root

    return descend(open_root(base), parts)


def _below(path: str, root: str) -> bool:
    rel = os.path.relpath(path, root)
    return not (rel.startswith("..") or os.path.isabs(rel))


def _readlink_at(dfd: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError:  # not a link (EINVAL), or gone
        return None


def _resolves_to(link_dir: str, text: str, target: str) -> bool:
    """Does link text `text`, in directory `link_dir`, name `target` (both as plain text)?"""
    return os.path.normpath(os.path.join(link_dir, text)) == os.path.normpath(target)


def _repo_id(folder: str) -> tuple[str, str] | None:
    m = _REPO.match(folder)
    if not m:
        return None
    return m.group(1)[:-1], m.group(2).replace("--", "/")


def describe(path: str, root: str | None = None, *, links: bool = False) -> dict | None:
    """{repo_type, repo_id, etag?, files: [{revision, file}]} or None if not in an HF cache.
    Directories are read below `root` (else from ``/``), never through a link; with `links`
    each file also carries its link text (``link``), as restore re-creates it."""
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
            out["files"] = _links_to(repo_dir, rest[1], root, links)
        elif len(rest) >= 3 and rest[0] == "snapshots":
            out["files"] = [{"revision": rest[1], "file": "/".join(rest[2:])}]
        else:
            return None
        return out
    # >= 1.32 shared store: <cache>/blobs/<2hex>/<hash>, pointed at by repo blobs
    if _shared_shape(parts):
        cache = os.sep.join(parts[:-3])
        return _shared_blob(cache, path, root, links)
    return None


def _links_to(repo_dir: str, etag: str, root: str | None, links: bool) -> list[dict]:
    """The snapshots/<rev>/<file> links whose text names blobs/<etag> of this repo."""
    found: list[dict] = []
    try:
        sfd = open_dir(os.path.join(repo_dir, "snapshots"), root)
    except OSError:
        return found
    blob = os.path.join("blobs", etag)
    seen = 0
    try:
        # fwalk does not descend into a link to a directory, and opens each level by dir fd
        for dirpath, _dirs, files, dfd in os.fwalk(".", dir_fd=sfd):
            for name in files:
                seen += 1
                if seen > _MAX_LINKS:
                    return found
                text = _readlink_at(dfd, name)
                rel = os.path.normpath(os.path.join(dirpath, name)).split(os.sep)
                if text is None or len(rel) < 2:
                    continue
                here = os.path.join("snapshots", *rel[:-1])
                if (_resolves_to(here, text, blob) if not os.path.isabs(text)
                        else _resolves_to("/", text, os.path.join(repo_dir, blob))):
                    entry = {"revision": rel[0], "file": "/".join(rel[1:])}
                    if links:
                        entry["link"] = text
                    found.append(entry)
    except OSError:
        pass
    finally:
        os.close(sfd)
    return found


def _shared_blob(cache: str, path: str, root: str | None, links: bool) -> dict | None:
    try:
        cfd = open_dir(cache, root)
    except OSError:
        return None
    seen = 0
    try:
        for folder in sorted(os.listdir(cfd)):
            rid = _repo_id(folder)
            if rid is None:
                continue
            try:
                rfd = os.open(folder, DIR_FLAGS, dir_fd=cfd)
            except OSError:
                continue
            try:
                bfd = os.open("blobs", DIR_FLAGS, dir_fd=rfd)
            except OSError:
                continue
            finally:
                os.close(rfd)
            try:
                for name in os.listdir(bfd):
                    seen += 1
                    if seen > _MAX_LINKS:
                        return None
                    text = _readlink_at(bfd, name)
                    if text is not None and _resolves_to(os.path.join(cache, folder, "blobs"), text, path):
                        repo_dir = os.path.join(cache, folder)
                        out = {"repo_type": rid[0], "repo_id": rid[1], "etag": name,
                               "files": _links_to(repo_dir, name, root, links), "shared_blob": True}
                        if links:
                            out["blob_link"] = {"name": f"blobs/{name}", "link": text}
                        return out
            finally:
                os.close(bfd)
    except OSError:
        return None
    finally:
        os.close(cfd)
    return None


def maybe(path: str) -> bool:
    """Could `describe` find anything (no I/O): a repo folder on the way, or the shared
    store's ``blobs/<2hex>/<hash>`` shape (whose path holds no ``--``)?"""
    return "--" in path or _shared_shape(path.split(os.sep))


def _shared_shape(parts: list[str]) -> bool:
    return len(parts) >= 3 and parts[-3] == "blobs" and re.fullmatch(r"[0-9a-f]{2}", parts[-2] or "") is not None


def metadata(path: str) -> bool:
    """Is this where Hugging Face keeps its own bookkeeping: ``<repo>/refs/...`` (commit
    hashes), ``<repo>/.no_exist/...`` (empty negative-cache files), ``.locks/<repo>/<x>.lock``?
    Such files are scanned like any other (a name is no proof: `hf download --local-dir` can
    write a repo's own ``refs/`` folder), only their clean verdicts are not worth an info line."""
    parts = path.split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if _REPO.match(parts[i]):
            return parts[i + 1] in ("refs", ".no_exist") or (parts[i - 1] == ".locks" and i + 2 == len(parts))
    return False


def snapshot_link(path: str) -> bool:
    """Is this a snapshots/<rev>/<file> entry of a hub cache?"""
    parts = path.split(os.sep)
    for i in range(len(parts) - 1, 0, -1):
        if _REPO.match(parts[i]):
            return len(parts) - i >= 4 and parts[i + 1] == "snapshots"
    return False
