"""The move out of reach, the way back (restore), the end (purge), and recovery after a kill.

Quarantine, on the file's own filesystem. Each ledger record is fsync'd before the step
after it, and the file is only ever touched through directory fds opened below its root one
component at a time (`modelscand.workers.open_beneath`): a directory swapped for a symlink
cannot redirect anything, and only the entry that was re-identified is moved.

  0. open below the root; re-identify (dev, ino, size, mtime, ctime as scanned; the name
     still refers to that inode; sha256 re-read unless the identity is the one scanned)
  1. ledger ``quarantine.begin``: everything about the file and where it goes
  2. ``renameat2(dir fd, name, quarantine dir fd, generated name, RENAME_NOREPLACE)``
  3. locked down: owner root, mode 0000 (every other hard link of the inode with it)
  4. re-identified after: the new name is our inode, size and mtime unchanged, sha256 re-read
  5. a tombstone in the emptied name (tombstone.py)
  6. ledger ``quarantine.done`` (then the caller's alert: the hook is due until ``hook.done``)

Across filesystems step 2 is: copy into the quarantine dir, fsync, re-read and verify the
sha256, ledger ``quarantine.copied``, check the name is still our unchanged file, unlink it
through its dir fd. A rename that fails with EXDEV (a bind mount) takes that path too.

`recover()` runs before anything else writes (daemon start, restore, purge, verify) and
finishes every operation the ledger shows without its last record, from what is on disk:
moved -> finish; copied and verified -> unlink the original and finish; nothing moved and
the file unchanged -> move it now; nothing moved and the file gone or changed -> aborted
(a changed file is scanned again). No file ends both gone and unrecorded, and no
``quarantined`` entry lacks its file.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import grp
import os
import pwd
import secrets
import stat
import time
from dataclasses import dataclass
from typing import Callable

from modelscand import hfcache
from modelscand.text import safe_text
from modelscand.quarantine import QuarantineError, tombstone
from modelscand.quarantine import hf as hfnames
from modelscand.quarantine.index import Entry, Index
from modelscand.quarantine.store import DIR_FLAGS, Store, open_private_dir, try_chown
from modelscand.workers import Escape, open_beneath, open_root

#: Test seam: called with the name of each step right after it is taken (tests SIGKILL here).
STEP_HOOK: Callable[[str], None] | None = None

_OPEN_RO = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_RENAME_NOREPLACE = 1
_CHUNK = 1 << 20


class Changed(QuarantineError):
    """The file is not what was scanned any more (or is gone): nothing moved; scan it again."""


@dataclass(frozen=True)
class Subject:
    """What to quarantine, as the scan saw it. Without `identity` the bytes are hashed now."""

    root: str
    path: str
    identity: tuple[int, int, int, int, int] | None = None  # dev, ino, size, mtime_ns, ctime_ns
    sha256: str | None = None


def _step(name: str) -> None:
    if STEP_HOOK is not None:
        STEP_HOOK(name)


def new_id() -> str:
    return time.strftime("Q%Y%m%d-", time.gmtime()) + secrets.token_hex(4)


def identity(st: os.stat_result) -> dict:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _same_bytes(st: os.stat_result, ident: dict) -> bool:
    """Same inode, size and mtime (ctime moves with our own rename and chmod)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
        ident["dev"], ident["ino"], ident["size"], ident["mtime_ns"])


def original_path(rec: dict) -> str:
    return os.fsdecode(base64.b64decode(rec["path_b64"]))


def hash_fd(fd: int) -> str:
    from modelscan_core.engine import sha256_stream

    with os.fdopen(os.dup(fd), "rb", buffering=0) as stream:
        return sha256_stream(stream)


def _lstat(dfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def open_quarantined(qfd: int, name: str) -> int:
    """Open a quarantined (mode 0000) file for reading; a non-root owner lifts the mode briefly."""
    try:
        return os.open(name, _OPEN_RO, dir_fd=qfd)
    except PermissionError:
        if os.geteuid() == 0:
            raise
    os.chmod(name, 0o400, dir_fd=qfd, follow_symlinks=False)
    try:
        return os.open(name, _OPEN_RO, dir_fd=qfd)
    finally:
        os.chmod(name, 0, dir_fd=qfd, follow_symlinks=False)


_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def rename_noreplace(src_dfd: int, src: str, dst_dfd: int, dst: str) -> None:
    """renameat2(RENAME_NOREPLACE): never over an existing entry. Falls back to link+unlink
    (also refuses an existing name) where the filesystem does not support the flag."""
    if _renameat2 is not None:
        if _renameat2(src_dfd, os.fsencode(src), dst_dfd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), src)
    os.link(src, dst, src_dir_fd=src_dfd, dst_dir_fd=dst_dfd, follow_symlinks=False)
    os.unlink(src, dir_fd=src_dfd)


def _name(uid: int, group: bool = False) -> str | None:
    try:
        return grp.getgrgid(uid).gr_name if group else pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def who() -> dict:
    """Who is acting: uid, and the human behind sudo or the login session."""
    uid = os.getuid()
    out: dict = {"uid": uid, "user": _name(uid)}
    if os.environ.get("SUDO_USER"):
        out["sudo_user"] = os.environ["SUDO_USER"]
    try:
        with open("/proc/self/loginuid") as fh:
            luid = int(fh.read().strip())
        if luid != 0xFFFFFFFF:
            out["login_uid"], out["login_user"] = luid, _name(luid)
    except (OSError, ValueError):
        pass
    return out


def open_parent(root: str, path: str) -> int:
    """A dir fd for the directory of `path`, opened below `root` (no symlinked component)."""
    parent = os.path.dirname(path)
    if path == root or parent == root:
        try:
            return open_root(parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise QuarantineError(f"{safe_text(parent)[0]} is reached through a symlink now (a directory was "
                                      f"swapped): refused") from None
            raise
    try:
        fd, dfd, _ = open_beneath(root, parent)
    except Escape as exc:
        raise QuarantineError(f"{safe_text(parent)[0]}: {exc}") from None
    os.close(dfd)
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise QuarantineError(f"{safe_text(parent)[0]} is not a directory")
    return fd


# -- quarantine ----------------------------------------------------------------------------

def quarantine(store: Store, subject: Subject, meta: dict | None = None) -> tuple[dict, dict]:
    """Move one file out of reach; returns its ``quarantine.begin`` and ``.done`` records.
    Raises Changed (nothing moved: it is not what was scanned) or QuarantineError."""
    with store.ledger.locked():
        try:
            fd, dfd, base = open_beneath(subject.root, subject.path)
        except Escape as exc:
            raise QuarantineError(f"not moved: the path escapes its root ({exc})") from None
        except FileNotFoundError:
            raise Changed("the file is gone") from None
        except OSError as exc:
            reason = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
            raise QuarantineError(f"not moved: cannot open it below its root: {reason}") from None
        try:
            _step("opened")
            begin = _begin(store, subject, dict(meta or {}), fd, dfd, base)
            _step("begun")
            qfd = open_private_dir(begin["dir"])
            try:
                done = _transfer(store, begin, fd, dfd, base, qfd)
            finally:
                os.close(qfd)
            _step("done")
            return begin, done
        finally:
            os.close(fd)
            os.close(dfd)


def _begin(store: Store, subject: Subject, meta: dict, fd: int, dfd: int, base: str) -> dict:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise QuarantineError("not moved: not a regular file")
    if subject.identity is not None and tuple(subject.identity) != _key(st):
        raise Changed("changed since it was scanned")
    now = _lstat(dfd, base)
    if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        raise Changed("its name now refers to another file")
    # the identity the scan saw (ctime included) vouches for its bytes: no second read before
    # the move, even when the scan could not hash them in time (then _finish hashes the
    # quarantined copy, out of reach); without it, hash now and compare
    sha = subject.sha256 if subject.identity is not None else hash_fd(fd)
    if subject.sha256 and sha != subject.sha256:
        raise Changed("its bytes are not the ones scanned")
    qdir, same_fs = store.dirs.for_file(st.st_dev, os.path.dirname(subject.path))
    hf = hfnames.describe(subject.path, subject.root) if hfcache.maybe(subject.path) else None
    qid = new_id()
    return store.ledger.append(
        "quarantine.begin", id=qid, method="rename" if same_fs else "copy", root=subject.root,
        path=safe_text(subject.path)[0], path_b64=base64.b64encode(os.fsencode(subject.path)).decode(),
        dir=qdir, name=qid, identity=identity(st), nlink=st.st_nlink, mode=stat.S_IMODE(st.st_mode),
        owner={"uid": st.st_uid, "user": _name(st.st_uid)}, group={"gid": st.st_gid, "group": _name(st.st_gid, True)},
        atime_ns=st.st_atime_ns, sha256=sha, hf=hf,
        tombstone_kind=tombstone.kind_for(hfnames.names(hf) or [base]), **meta)


def _transfer(store: Store, begin: dict, fd: int, dfd: int, base: str, qfd: int, recovered: bool = False) -> dict:
    if begin["method"] == "rename":
        try:
            rename_noreplace(dfd, base, qfd, begin["name"])
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                store.ledger.append("quarantine.aborted", id=begin["id"],
                                    reason=f"rename failed: {exc.strerror or exc}; the file is still in place")
                raise QuarantineError(f"not moved: rename failed: {exc.strerror or exc}") from None
        else:
            _step("renamed")
            return _finish(store, begin, qfd, dfd, base, renamed=True, recovered=recovered)
    try:
        _copy(store, begin, fd, qfd)
    except OSError as exc:  # ENOSPC, EDQUOT, EIO on the quarantine's filesystem: nothing half done stays
        _unlink_quiet(qfd, begin["name"])
        reason = f"the copy failed: {exc.strerror or exc}; the file is still in place"
        try:
            store.ledger.append("quarantine.aborted", id=begin["id"], reason=reason)
        except OSError:
            pass  # the ledger's filesystem is full too: recovery finds the begin and decides again
        raise QuarantineError(f"not moved: {reason}") from None
    note = _unlink_source(begin, fd, dfd, base)
    return _finish(store, begin, qfd, dfd, base, renamed=False, note=note, recovered=recovered)


def _copy(store: Store, begin: dict, fd: int, qfd: int) -> None:
    name = begin["name"]
    expected = begin["sha256"] or hash_fd(fd)  # what the copy must hold before the original goes
    out = os.open(name, _CREATE, 0o600, dir_fd=qfd)
    try:
        offset = 0
        while True:
            n = os.sendfile(out, fd, offset, _CHUNK)
            if n == 0:
                break
            offset += n
            if offset == n:
                _step("copying")
        os.fsync(out)
    finally:
        os.close(out)
    os.fsync(qfd)
    _step("copied")
    check = open_quarantined(qfd, name)
    try:
        got = hash_fd(check)
    finally:
        os.close(check)
    if got != expected:
        os.unlink(name, dir_fd=qfd)
        store.ledger.append("quarantine.aborted", id=begin["id"],
                            reason="the file changed while it was copied; left in place to be scanned again")
        raise Changed("it changed while it was copied")
    store.ledger.append("quarantine.copied", id=begin["id"], sha256=got, size=offset)
    _step("copy_logged")


def _unlink_source(begin: dict, fd: int | None, dfd: int, base: str) -> str | None:
    """Remove the original name once a verified copy is safe; a note if it was not ours."""
    now = _lstat(dfd, base)
    if now is None:
        return "the original name was already gone"
    ident = begin["identity"]
    if (now.st_dev, now.st_ino) != (ident["dev"], ident["ino"]):
        return "the original name now holds another file: left alone (it is scanned on its own)"
    if not _same_bytes(now, ident):
        return "the original changed after the verified copy: left in place to be scanned again"
    if now.st_nlink > 1 and fd is not None:
        _lock_down(fd)  # other names of this inode stay behind: make them unreadable too
    os.unlink(base, dir_fd=dfd)
    _step("unlinked")
    return None


def _lock_down(fd: int) -> bool:
    """Mode 0000 and, where allowed, owner root (so no other name of the inode can be
    chmod'ed back by its owner); whether the owner could be changed."""
    owned = try_chown(fd, 0, 0)
    os.fchmod(fd, 0)
    return owned


def _finish(store: Store, begin: dict, qfd: int, dfd: int | None, base: str | None, *, renamed: bool,
            note: str | None = None, recovered: bool = False) -> dict:
    qf = open_quarantined(qfd, begin["name"])
    try:
        st = os.fstat(qf)
        if renamed and (st.st_dev, st.st_ino) != (begin["identity"]["dev"], begin["identity"]["ino"]):
            return _raced(store, begin, qfd, dfd, base)
        owner_locked = _lock_down(qf)
        _step("locked")
        after = os.fstat(qf)
        sha = hash_fd(qf)
    finally:
        os.close(qf)
    changed = (begin["sha256"] is not None and sha != begin["sha256"]) or (
        renamed and not _same_bytes(after, begin["identity"]))
    tomb = None
    if store.tombstones and dfd is not None and base is not None:
        try:
            placed = tombstone.place(dfd, base, begin["id"], begin["tombstone_kind"], begin["owner"]["uid"],
                                     begin["group"]["gid"])
            tomb = {"kind": begin["tombstone_kind"], "placed": placed}
        except OSError as exc:  # the user's filesystem is full: the move stands, the name stays empty
            tomb = {"kind": begin["tombstone_kind"], "placed": False, "error": exc.strerror or str(exc)}
        _step("tombstoned")
    other_links = (after.st_nlink if renamed else begin["nlink"]) - 1
    return store.ledger.append("quarantine.done", id=begin["id"], after=identity(after), sha256=sha,
                               changed_during_move=changed, tombstone=tomb, other_links=other_links,
                               owner_locked=owner_locked, note=note, recovered=recovered)


def _raced(store: Store, begin: dict, qfd: int, dfd: int | None, base: str | None) -> dict:
    """The name was swapped between the check and the rename: what we moved is not the
    scanned file. Put it back where it was; the scanned file is scanned again wherever it is."""
    if dfd is not None and base is not None:
        try:
            rename_noreplace(qfd, begin["name"], dfd, base)
        except OSError:
            pass
    if _lstat(qfd, begin["name"]) is None:
        store.ledger.append("quarantine.aborted", id=begin["id"],
                            reason="its name was swapped for another file just before the move; that file was put back")
        raise Changed("its name was swapped for another file during the move")
    raise QuarantineError(f"{begin['id']}: its name was swapped during the move and the other file could not be "
                          f"put back; it stays in {begin['dir']}/{begin['name']} (recovered at the next start)")


# -- restore and purge -----------------------------------------------------------------------

def restore(store: Store, qid: str, *, force: bool = False, by: dict | None = None) -> dict:
    """Put a quarantined file back (hash checked, owner/mode/times and HF links restored);
    its hash is allowed from the moment ``restore.begin`` is written."""
    with store.ledger.locked():
        entry = _entry(store, qid, "quarantined", "restore")
        begin = entry.begin
        path, root = original_path(begin), begin["root"]
        qfd = open_private_dir(begin["dir"])
        try:
            try:
                qf = open_quarantined(qfd, begin["name"])
            except FileNotFoundError:
                raise QuarantineError(f"{qid}: the quarantined file is missing from {begin['dir']} "
                                      f"(run 'modelscand quarantine verify')") from None
            try:
                sha = hash_fd(qf)
                if sha != entry.sha256:
                    raise QuarantineError(f"{qid}: the quarantined file's sha256 is {sha[:16]}..., the ledger says "
                                          f"{entry.sha256}: not restored (run 'modelscand quarantine verify')")
                try:
                    pdfd = open_parent(root, path)
                except OSError as exc:
                    raise QuarantineError(f"{qid}: cannot open {safe_text(os.path.dirname(path))[0]} below "
                                          f"{root}: {exc.strerror or exc}") from None
                try:
                    return _restore_into(store, entry, qfd, qf, pdfd, os.path.basename(path), force, by or who())
                finally:
                    os.close(pdfd)
            finally:
                os.close(qf)
        finally:
            os.close(qfd)


def _entry(store: Store, qid: str, state: str, verb: str) -> Entry:
    entry = Index.of(store.ledger.records_of(qid)).entries.get(qid)
    if entry is None:
        raise QuarantineError(f"no quarantine entry {qid!r} (see 'modelscand quarantine list')")
    if entry.state != state:
        raise QuarantineError(f"{qid} is {entry.state}, not {state}: nothing to {verb}")
    return entry


def _restore_into(store: Store, entry: Entry, qfd: int, qf: int, pdfd: int, base: str, force: bool,
                  by: dict) -> dict:
    begin, qid = entry.begin, entry.id
    existing = _lstat(pdfd, base)
    tomb_id = tombstone.read(pdfd, base) if existing is not None else None
    overwrites = None
    if existing is not None and tomb_id is None:
        if not force:
            raise QuarantineError(f"{qid}: {begin['path']} exists and is not a modelscand tombstone: not overwritten "
                                  f"(restore --force replaces it)")
        overwrites = {"identity": identity(existing), "mode": stat.filemode(existing.st_mode)}
        if stat.S_ISREG(existing.st_mode):
            f = os.open(base, _OPEN_RO, dir_fd=pdfd)
            try:
                overwrites["sha256"] = hash_fd(f)
            finally:
                os.close(f)
    same_fs = os.fstat(qf).st_dev == os.fstat(pdfd).st_dev
    store.ledger.append("restore.begin", id=qid, sha256=entry.sha256, by=by, force=force, overwrites=overwrites,
                        replaces_tombstone=tomb_id, method="rename" if same_fs else "copy")
    _step("restore_begun")
    try:
        if same_fs:
            if existing is not None:
                os.rename(begin["name"], base, src_dir_fd=qfd, dst_dir_fd=pdfd)  # atomic over tombstone/forced file
            else:
                rename_noreplace(qfd, begin["name"], pdfd, base)
            _step("restore_renamed")
            missed = _set_attrs(qf, begin)
            placed = os.fstat(qf)
        else:
            placed, missed = _copy_back(store, begin, entry.sha256, qf, qfd, pdfd, base, replace=existing is not None)
    except OSError as exc:
        store.ledger.append("restore.aborted", id=qid, reason=f"{exc.strerror or exc}; still quarantined")
        raise QuarantineError(f"{qid}: not restored: {exc.strerror or exc}") from None
    links = hfnames.restore_links(begin["root"], begin.get("hf"), begin["owner"]["uid"], begin["group"]["gid"])
    return store.ledger.append("restore.done", id=qid, identity=identity(placed), links=links, not_restored=missed)


def _copy_back(store: Store, begin: dict, sha256: str, qf: int, qfd: int, pdfd: int, base: str,
               replace: bool) -> tuple[os.stat_result, list[str]]:
    tmp = f".modelscand-restore-{begin['id']}"
    _unlink_quiet(pdfd, tmp)
    out = os.open(tmp, (_CREATE & ~os.O_WRONLY) | os.O_RDWR, 0o600, dir_fd=pdfd)
    try:
        offset = 0
        while n := os.sendfile(out, qf, offset, _CHUNK):
            offset += n
        os.fsync(out)
        if hash_fd(out) != sha256:
            raise OSError(errno.EIO, "the copy back does not have the recorded sha256")
        missed = _set_attrs(out, begin)
        st = os.fstat(out)
    except BaseException:
        os.close(out)
        _unlink_quiet(pdfd, tmp)
        raise
    os.close(out)
    if replace:
        os.rename(tmp, base, src_dir_fd=pdfd, dst_dir_fd=pdfd)
    else:
        rename_noreplace(pdfd, tmp, pdfd, base)
    store.ledger.append("restore.placed", id=begin["id"])
    _step("restore_placed")
    os.unlink(begin["name"], dir_fd=qfd)
    return st, missed


def _unlink_quiet(dfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass


def _set_attrs(fd: int, begin: dict) -> list[str]:
    """Owner, mode and times as recorded; what could not be put back (said, not hidden)."""
    st = os.fstat(fd)
    missed = []
    if (st.st_uid, st.st_gid) != (begin["owner"]["uid"], begin["group"]["gid"]) and not try_chown(
            fd, begin["owner"]["uid"], begin["group"]["gid"]):
        missed.append(f"owner (uid {begin['owner']['uid']}, gid {begin['group']['gid']}): run restore as root")
    os.fchmod(fd, begin["mode"])
    os.utime(fd, ns=(begin["atime_ns"], begin["identity"]["mtime_ns"]))
    return missed


def purge(store: Store, qid: str, *, reason: str, by: dict | None = None) -> dict:
    """Delete a quarantined file for good; announced in the ledger before, confirmed after."""
    with store.ledger.locked():
        entry = _entry(store, qid, "quarantined", "purge")
        store.ledger.append("purge.begin", id=qid, reason=reason, by=by or who())
        _step("purge_begun")
        return _purge_file(store, entry.begin, recovered=False)


def _purge_file(store: Store, begin: dict, recovered: bool) -> dict:
    qfd = open_private_dir(begin["dir"])
    try:
        _unlink_quiet(qfd, begin["name"])
        os.fsync(qfd)
    finally:
        os.close(qfd)
    _step("purged")
    return store.ledger.append("purge.done", id=begin["id"], recovered=recovered)


# -- recovery ----------------------------------------------------------------------------------

def recover(store: Store) -> list[dict]:
    """Finish or roll back every operation a kill interrupted; the records written."""
    if not store.ledger.exists():
        return []
    out: list[dict] = []
    with store.ledger.locked():
        store.ledger.repair_torn_tail()
        for entry in store.index().unfinished():
            try:
                if entry.state == "quarantining":
                    out.append(_recover_quarantine(store, entry))
                elif entry.state == "restoring":
                    out.append(_recover_restore(store, entry))
                else:
                    out.append(_purge_file(store, entry.begin, recovered=True))
            except (QuarantineError, OSError) as exc:  # one entry never keeps the others (or the daemon) back
                error = str(exc) if isinstance(exc, QuarantineError) else f"{exc.strerror or exc}: {exc.filename}"
                out.append({"id": entry.id, "type": "recovery.failed", "error": error})
    return out


def _open_original(begin: dict) -> tuple[int | None, int | None, str]:
    """(file fd or None, dir fd or None, name) for the original path, below its root."""
    path = original_path(begin)
    try:
        fd, dfd, base = open_beneath(begin["root"], path)
        return fd, dfd, base
    except (Escape, OSError):
        pass
    try:
        return None, open_parent(begin["root"], path), os.path.basename(path)
    except (QuarantineError, OSError):
        return None, None, os.path.basename(path)


def _recover_quarantine(store: Store, entry: Entry) -> dict:
    begin, qid = entry.begin, entry.id
    ident = begin["identity"]
    fd, dfd, base = _open_original(begin)
    qfd = open_private_dir(begin["dir"])
    try:
        dst = _lstat(qfd, begin["name"])
        if dst is not None and (dst.st_dev, dst.st_ino) == (ident["dev"], ident["ino"]):
            return _finish(store, begin, qfd, dfd, base, renamed=True, recovered=True)  # the rename happened
        if dst is not None and entry.last("quarantine.copied") is not None:
            note = _unlink_source(begin, fd, dfd, base) if dfd is not None else "the original directory is gone"
            return _finish(store, begin, qfd, dfd, base, renamed=False, note=note, recovered=True)
        if dst is not None:
            os.unlink(begin["name"], dir_fd=qfd)  # a copy cut short: never verified, never acted on
        st = os.fstat(fd) if fd is not None else None
        if st is not None and _key(st) == tuple(ident[k] for k in ("dev", "ino", "size", "mtime_ns", "ctime_ns")) \
                and (_lstat(dfd, base) or st).st_ino == st.st_ino:
            return _transfer(store, begin, fd, dfd, base, qfd, recovered=True)  # nothing moved yet: move it now
        return store.ledger.append("quarantine.aborted", id=qid, recovered=True,
                                   reason="interrupted before the move, and the file is gone or changed since: "
                                          "nothing moved (a changed file is scanned again)")
    finally:
        os.close(qfd)
        for f in (fd, dfd):
            if f is not None:
                os.close(f)


def _recover_restore(store: Store, entry: Entry) -> dict:
    begin, qid = entry.begin, entry.id
    done = entry.last("quarantine.done") or {}
    held = done.get("after") or begin["identity"]
    qfd = open_private_dir(begin["dir"])
    try:
        q = _lstat(qfd, begin["name"])
        if entry.last("restore.placed") is not None:
            if q is not None:
                os.unlink(begin["name"], dir_fd=qfd)
            return _restore_done(store, entry, recovered=True)
        fd, dfd, base = _open_original(begin)
        if fd is not None:
            os.close(fd)
        try:
            if q is None and dfd is not None:
                now = _lstat(dfd, base)
                if now is not None and (now.st_dev, now.st_ino) == (held["dev"], held["ino"]):
                    f = os.open(base, _OPEN_RO, dir_fd=dfd)
                    try:
                        missed = _set_attrs(f, begin)
                    finally:
                        os.close(f)
                    return _restore_done(store, entry, recovered=True, missed=missed)
            if dfd is not None:
                _unlink_quiet(dfd, f".modelscand-restore-{qid}")
        finally:
            if dfd is not None:
                os.close(dfd)
        return store.ledger.append("restore.aborted", id=qid, recovered=True,
                                   reason="interrupted before the file went back; it is still quarantined")
    finally:
        os.close(qfd)


def _restore_done(store: Store, entry: Entry, recovered: bool, missed: list[str] = ()) -> dict:
    begin = entry.begin
    path = original_path(begin)
    try:
        fd, dfd, _ = open_beneath(begin["root"], path)
        os.close(dfd)
        try:
            placed = identity(os.fstat(fd))
        finally:
            os.close(fd)
    except (Escape, OSError):
        placed = None
    links = hfnames.restore_links(begin["root"], begin.get("hf"), begin["owner"]["uid"], begin["group"]["gid"])
    return store.ledger.append("restore.done", id=entry.id, identity=placed, links=links, recovered=recovered,
                               not_restored=list(missed))
