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
import stat

from modelscand import hfcache
from modelscand.quarantine.store import DIR_FLAGS

_MAX_REF = 256
_MAX_REFS = 50  # refs recorded
_MAX_REF_ENTRIES = 1000  # refs/ entries looked at
_MAX_REF_DEPTH = 8


def describe(path: str, root: str | None = None) -> dict | None:
    """hfcache.describe plus repo folder, refs and link texts; None outside a hub cache.
    Everything is read below `root` by directory fd, never through a link (see hfcache):
    the record holds nothing of a file outside the root, whoever pointed a link at it."""
    info = hfcache.describe(path, root, links=True)
    if not info:
        return None
    folder = f"{info['repo_type']}s--{info['repo_id'].replace('/', '--')}"
    if info.get("shared_blob"):
        repo_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(path))), folder)
    else:
        parts = path.split(os.sep)
        repo_dir = os.sep.join(parts[: parts.index(folder) + 1]) if folder in parts else None
    if repo_dir is None:
        return info
    info["repo_dir"] = repo_dir
    try:
        rfd = hfcache.open_dir(repo_dir, root)
    except OSError:
        return info
    try:
        refs = _refs(rfd)
    finally:
        os.close(rfd)
    if refs:
        info["refs"] = refs
    return info


def _refs(repo_fd: int) -> dict[str, str]:
    """refs/ as {name: commit}: huggingface_hub writes ``revision="refs/pr/1"`` as the file
    refs/refs/pr/1, so the folder is walked (files only, bounded, no link followed) and each
    ref named by its path below refs/."""
    out: dict[str, str] = {}
    try:
        top = os.open("refs", DIR_FLAGS, dir_fd=repo_fd)
    except OSError:
        return out
    seen = 0
    try:
        for dirpath, dirs, files, dfd in os.fwalk(".", dir_fd=top):
            dirs.sort()
            if dirpath.count(os.sep) >= _MAX_REF_DEPTH:
                dirs.clear()
            for name in sorted(files):
                seen += 1
                if seen > _MAX_REF_ENTRIES or len(out) >= _MAX_REFS:
                    return out
                text = _read_small(dfd, name)
                if text is not None:
                    out[os.path.normpath(os.path.join(dirpath, name)).replace(os.sep, "/")] = text
    except OSError:
        pass
    finally:
        os.close(top)
    return out


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
    from modelscand.workers import open_root

    dfd = open_root(root)  # a root path swapped for a link is refused, not followed
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


def _read_small(dfd: int, name: str) -> str | None:
    """The first bytes of the regular file `name` in `dfd`; None for a link, a FIFO, a file
    with other names (HF writes refs as plain files), anything else."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), dir_fd=dfd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a hard link may be anyone's file
            return None
        return os.read(fd, _MAX_REF).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
