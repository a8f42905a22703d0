"""A Hugging Face blob as users know it, recorded so that restore can put the layout back.

`modelscand.hfcache.describe` maps a blob to its repo and the ``snapshots/<rev>/<file>``
links that point at it. For the ledger we add what a restore needs: the exact text of each
link (``../../blobs/<etag>``, deeper for nested files), the repo folder, the refs
(``main -> <commit>``), and for a shared-store blob (huggingface_hub >= 1.32) the repo's
``blobs/<etag>`` link to it. Quarantine leaves links alone (they resolve to the tombstone);
restore re-creates only links that are missing, one directory fd at a time below the root,
and never replaces an entry that is there.
"""

from __future__ import annotations

import errno
import os

from modelscand import hfcache
from modelscand.quarantine.store import DIR_FLAGS

_MAX_REF = 256


def describe(path: str) -> dict | None:
    """hfcache.describe plus repo folder, refs and link texts; None outside a hub cache."""
    info = hfcache.describe(path)
    if not info:
        return None
    folder = f"{info['repo_type']}s--{info['repo_id'].replace('/', '--')}"
    if info.get("shared_blob"):
        repo_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(path))), folder)
        link = os.path.join(repo_dir, "blobs", info["etag"])
        info["blob_link"] = {"name": f"blobs/{info['etag']}", "link": _readlink(link)}
    else:
        parts = path.split(os.sep)
        repo_dir = os.sep.join(parts[: parts.index(folder) + 1]) if folder in parts else None
    if repo_dir is None:
        return info
    info["repo_dir"] = repo_dir
    for f in info.get("files", []):
        f["link"] = _readlink(os.path.join(repo_dir, "snapshots", f["revision"], *f["file"].split("/")))
    refs = {}
    try:
        for name in sorted(os.listdir(os.path.join(repo_dir, "refs")))[:50]:
            text = _read_small(os.path.join(repo_dir, "refs", name))
            if text is not None:
                refs[name] = text
    except OSError:
        pass
    if refs:
        info["refs"] = refs
    return info


def names(info: dict | None) -> list[str]:
    return [f["file"] for f in (info or {}).get("files", [])]


def restore_links(root: str, info: dict | None, uid: int, gid: int) -> dict:
    """Re-create missing recorded links below `root`; {"created": [...], "conflicts": [...]}."""
    out: dict = {"created": [], "conflicts": []}
    if not info or not info.get("repo_dir"):
        return out
    wanted = [(["snapshots", f["revision"], *f["file"].split("/")], f.get("link"))
              for f in info.get("files", []) if f.get("link")]
    if info.get("blob_link", {}).get("link"):
        wanted.append((info["blob_link"]["name"].split("/"), info["blob_link"]["link"]))
    rel = os.path.relpath(info["repo_dir"], root)
    if rel.startswith("..") or os.path.isabs(rel):
        return out
    base = [] if rel == "." else rel.split(os.sep)
    for parts, text in wanted:
        shown = "/".join(parts)
        try:
            if _link_beneath(root, base + parts, text, uid, gid):
                out["created"].append(shown)
        except OSError as exc:
            out["conflicts"].append(f"{shown}: {exc.strerror or exc}")
    return out


def _link_beneath(root: str, parts: list[str], text: str, uid: int, gid: int) -> bool:
    if any(p in ("", ".", "..") for p in parts):
        raise OSError(errno.EINVAL, "not a plain relative path")
    dfd = os.open(root, DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o755, dir_fd=dfd)
                _chown_entry(part, dfd, uid, gid)
            except FileExistsError:
                pass
            nfd = os.open(part, DIR_FLAGS, dir_fd=dfd)  # a symlinked component fails here
            os.close(dfd)
            dfd = nfd
        try:
            current = os.readlink(parts[-1], dir_fd=dfd)
        except FileNotFoundError:
            current = None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise OSError(errno.EEXIST, "exists and is not a link; left alone") from None
            raise
        if current is not None:
            if current != text:
                raise OSError(errno.EEXIST, f"a link to {current!r} is there; left alone")
            return False
        os.symlink(text, parts[-1], dir_fd=dfd)
        _chown_entry(parts[-1], dfd, uid, gid)
        return True
    finally:
        os.close(dfd)


def _chown_entry(name: str, dfd: int, uid: int, gid: int) -> None:
    if os.geteuid() == 0:
        try:
            os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
        except PermissionError:
            pass  # left root's: the link still resolves, the user can still replace it


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _read_small(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        return os.read(fd, _MAX_REF).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
