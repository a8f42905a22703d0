"""The move with real files and real renames: same filesystem, across filesystems (a real tmpfs
where root may mount one, and a simulated EXDEV everywhere), symlink swaps, hard links,
restore and purge, and a SIGKILL at every journaled step followed by recovery."""

from __future__ import annotations

import contextlib
import json
import os
import stat

import pytest

from modelscand.quarantine import QuarantineError, mover, review, tombstone
from modelscand.quarantine.store import PER_FS_NAME
from tests.modelscand.conftest import BENIGN, EVIL
from tests.modelscand.qhelpers import (EVIL_BIG, accounted, killed, make_store, no_rename_across, plant, run_killed,
                                       sha, tmpfs)

__all__ = ["tmpfs"]  # a fixture, imported for pytest
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="ownership changes need root")


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


def _q(store, root, path, **meta):
    return mover.quarantine(store, mover.Subject(str(root), path), {"verdict": "issues", "severity": "critical", **meta})


def test_same_filesystem_move_is_a_rename_into_a_private_dir(tmp_path, root):
    store = make_store(tmp_path)
    path = plant(root, "a/b/evil.pkl")
    os.chmod(path, 0o644)
    before = os.stat(path)
    begin, done = _q(store, root, path)
    qdir = tmp_path / "state" / "quarantine"
    held = qdir / begin["id"]
    st = os.stat(held)
    assert (st.st_dev, st.st_ino) == (before.st_dev, before.st_ino)  # renamed, not copied
    assert stat.S_IMODE(st.st_mode) == 0 and st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(qdir).st_mode) == 0o700 and os.stat(qdir).st_uid == os.geteuid()
    assert begin["method"] == "rename" and begin["sha256"] == done["sha256"] == sha(EVIL)
    assert begin["identity"] == {"dev": before.st_dev, "ino": before.st_ino, "size": before.st_size,
                                 "mtime_ns": before.st_mtime_ns, "ctime_ns": before.st_ctime_ns}
    assert begin["mode"] == 0o644 and begin["owner"]["uid"] == before.st_uid
    assert done["after"]["ino"] == before.st_ino and done["changed_during_move"] is False
    with open(path, "rb") as fh:  # the tombstone, ours, names the id
        assert tombstone.parse(fh.read()) == begin["id"]
    assert [r["type"] for r in store.ledger.records()] == ["quarantine.begin", "quarantine.done"]
    accounted(store, {path: EVIL})


def test_ledger_is_fsynced_before_the_rename_and_after_it(tmp_path, root, monkeypatch):
    store = make_store(tmp_path)
    path = plant(root, "evil.pkl")
    order = []
    real_fsync, real_rename = os.fsync, mover.rename_noreplace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if "/ledger/ledger-" in target:
            order.append("ledger")
        real_fsync(fd)

    def rename(*args):
        order.append("rename")
        real_rename(*args)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(mover, "rename_noreplace", rename)
    _q(store, root, path)
    assert order == ["ledger", "rename", "ledger"]


def test_a_file_changed_since_its_scan_is_not_moved(tmp_path, root):
    store = make_store(tmp_path)
    path = plant(root, "evil.pkl")
    st = os.stat(path)
    scanned = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with open(path, "ab") as fh:
        fh.write(b"more")
    with pytest.raises(mover.Changed):
        mover.quarantine(store, mover.Subject(str(root), path, scanned, sha(EVIL)), {})
    other = plant(root, "other.pkl", BENIGN)
    os.replace(other, path)  # the name now refers to another inode
    with pytest.raises(mover.Changed):
        mover.quarantine(store, mover.Subject(str(root), path, scanned, sha(EVIL)), {})
    assert open(path, "rb").read() == BENIGN and list(store.ledger.records()) == []


@pytest.mark.parametrize("across", [False, True])
def test_a_finding_the_scan_had_no_time_to_hash_is_moved_then_hashed(tmp_path, root, monkeypatch, across):
    """A 50 GB file may get its verdict without a sha256 (bounded hash phase): the scanned
    identity vouches for it, the move is not delayed, the ledger gets the hash afterwards."""
    store = make_store(tmp_path)
    path = plant(root, "big.bin", EVIL_BIG)
    st = os.stat(path)
    scanned = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with no_rename_across(monkeypatch) if across else contextlib.nullcontext():
        begin, done = mover.quarantine(store, mover.Subject(str(root), path, scanned, None), {"verdict": "issues"})
    assert begin["sha256"] is None and done["sha256"] == sha(EVIL_BIG) and done["changed_during_move"] is False
    entry = store.index().entries[begin["id"]]
    assert entry.sha256 == sha(EVIL_BIG) and store.index().first_by_sha[sha(EVIL_BIG)] == begin["id"]
    monkeypatch.undo()
    accounted(store, {path: EVIL_BIG})
    mover.restore(store, begin["id"])
    assert open(path, "rb").read() == EVIL_BIG and store.index().allowed_by(sha(EVIL_BIG)) == begin["id"]


def test_symlinked_parent_is_refused_and_nothing_outside_the_root_moves(tmp_path, root):
    store = make_store(tmp_path)
    outside = tmp_path / "outside"
    victim = plant(outside, "evil.pkl", EVIL)  # someone else's file, same name, outside every root
    os.symlink(outside, root / "cache")
    with pytest.raises(QuarantineError, match="escapes its root"):
        _q(store, root, str(root / "cache" / "evil.pkl"))
    os.symlink(victim, root / "link.pkl")
    with pytest.raises(QuarantineError, match="symlink"):
        _q(store, root, str(root / "link.pkl"))
    assert open(victim, "rb").read() == EVIL and list(store.ledger.records()) == []


def test_parent_swapped_for_a_symlink_mid_move_moves_nothing_outside_the_root(tmp_path, root, monkeypatch):
    """CVE-2020-3350's race: after the scanner resolved the path, the user swaps a directory
    for a symlink to someone else's directory. The move goes through the dir fd opened below
    the root, so only the scanned file can move; the victim's file stays."""
    store = make_store(tmp_path)
    path = plant(root, "a/b/evil.pkl")
    outside = tmp_path / "victim"
    victim = plant(outside, "evil.pkl", EVIL + b"victim")

    def swap(step):
        if step == "opened":
            os.rename(root / "a" / "b", root / "a" / "b.real")
            os.symlink(outside, root / "a" / "b")

    monkeypatch.setattr(mover, "STEP_HOOK", swap)
    begin, done = _q(store, root, path)
    assert open(victim, "rb").read() == EVIL + b"victim"
    assert sorted(os.listdir(outside)) == ["evil.pkl"]  # no tombstone planted through the link either
    assert done["sha256"] == sha(EVIL) and not (root / "a" / "b.real" / "evil.pkl").read_bytes().startswith(EVIL)
    held = tmp_path / "state" / "quarantine" / begin["id"]
    assert os.stat(held).st_size == len(EVIL)


@ROOT_ONLY
def test_hard_links_are_locked_with_the_inode_and_given_back_on_restore(tmp_path, root):
    store = make_store(tmp_path)
    path = plant(root, "evil.pkl")
    os.chown(path, 4321, 4321)
    os.chmod(path, 0o644)
    os.makedirs(root / "elsewhere")
    other = root / "elsewhere" / "copy.pkl"
    outside = tmp_path / "outside.pkl"
    os.link(path, other)
    os.link(path, outside)
    begin, done = _q(store, root, path)
    assert begin["nlink"] == 3 and done["other_links"] == 2
    for name in (other, outside):  # every other name of the inode: root's, mode 0000
        st = os.stat(name)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0)
    mover.restore(store, begin["id"])
    for name in (path, other, outside):
        st = os.stat(name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == (4321, 4321, 0o644, 3)
    accounted(store, {path: EVIL})


def test_a_sandbox_that_forbids_chown_still_quarantines(tmp_path, root, monkeypatch):
    """The shipped unit filters chown (~@privileged): the file is still moved into the 0700
    dir with mode 0000, and the record says the owner was left as it was."""
    store = make_store(tmp_path)
    path = plant(root, "evil.pkl")

    def eperm(*_a):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", eperm)
    begin, done = _q(store, root, path)
    held = tmp_path / "state" / "quarantine" / begin["id"]
    assert stat.S_IMODE(os.stat(held).st_mode) == 0 and done["owner_locked"] is False
    assert done["tombstone"]["placed"] and tombstone.parse(open(path, "rb").read()) == begin["id"]
    accounted(store, {path: EVIL})


def test_across_filesystems_a_verified_copy_then_unlink(tmp_path, root, monkeypatch):
    store = make_store(tmp_path)
    path = plant(root, "evil.bin", EVIL_BIG)
    with no_rename_across(monkeypatch):
        begin, done = _q(store, root, path)
    kinds = [r["type"] for r in store.ledger.records()]
    assert kinds == ["quarantine.begin", "quarantine.copied", "quarantine.done"]
    held = tmp_path / "state" / "quarantine" / begin["id"]
    assert sha(held.read_bytes()) == sha(EVIL_BIG) == done["sha256"]
    assert stat.S_IMODE(os.stat(held).st_mode) == 0
    assert tombstone.parse(open(path, "rb").read()) == begin["id"]
    accounted(store, {path: EVIL_BIG})


def test_across_a_real_tmpfs(tmp_path, tmpfs):
    """A root on its own filesystem: with per_filesystem a private dir at that filesystem's top
    (a rename); without, a journaled copy into the state dir's quarantine."""
    root = tmpfs / "cache"
    copy_store = make_store(tmp_path, "copy", per_filesystem=False)
    path = plant(root, "hub/evil.pkl", EVIL_BIG)
    begin, done = _q(copy_store, root, path)
    assert begin["method"] == "copy" and begin["dir"] == str(tmp_path / "copy" / "quarantine")
    assert not (tmpfs / PER_FS_NAME).exists()
    accounted(copy_store, {path: EVIL_BIG})

    rename_store = make_store(tmp_path, "per_fs")
    path2 = plant(root, "hub/evil2.pkl", EVIL)
    ino = os.stat(path2).st_ino
    begin2, _ = _q(rename_store, root, path2)
    assert begin2["method"] == "rename" and begin2["dir"] == str(tmpfs / PER_FS_NAME)
    qst = os.stat(tmpfs / PER_FS_NAME)
    assert stat.S_IMODE(qst.st_mode) == 0o700 and qst.st_uid == 0
    assert os.stat(tmpfs / PER_FS_NAME / begin2["id"]).st_ino == ino
    accounted(rename_store, {path2: EVIL})
    # restore across filesystems copies back and removes the quarantined copy
    mover.restore(copy_store, begin["id"])
    assert open(path, "rb").read() == EVIL_BIG and not (tmp_path / "copy" / "quarantine" / begin["id"]).exists()
    accounted(copy_store, {path: EVIL_BIG})


def test_a_planted_per_filesystem_dir_is_never_used(tmp_path, tmpfs):
    root = tmpfs / "cache"
    os.makedirs(tmpfs / "elsewhere")
    os.symlink(tmpfs / "elsewhere", tmpfs / PER_FS_NAME)  # planted by a user before the daemon needed it
    store = make_store(tmp_path)
    path = plant(root, "evil.pkl")
    begin, _ = _q(store, root, path)
    assert begin["method"] == "copy" and os.listdir(tmpfs / "elsewhere") == []
    accounted(store, {path: EVIL})


@ROOT_ONLY
def test_restore_puts_back_owner_mode_times_and_allows_the_hash(tmp_path, root):
    store = make_store(tmp_path)
    path = plant(root, "m/evil.pkl")
    os.chown(path, 4321, 54321)
    os.chmod(path, 0o640)
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_001_000_000_000))
    begin, _ = _q(store, root, path)
    assert store.index().allowed_by(sha(EVIL)) is None
    done = review.restore(store, begin["id"])
    st = os.stat(path)
    assert open(path, "rb").read() == EVIL
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 54321, 0o640)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_600_000_000_000_000_000, 1_600_000_001_000_000_000)
    assert done["type"] == "restore.done" and store.index().allowed_by(sha(EVIL)) == begin["id"]
    rb = [r for r in store.ledger.records() if r["type"] == "restore.begin"][0]
    assert rb["by"]["uid"] == os.getuid() and rb["replaces_tombstone"] == begin["id"]
    accounted(store, {path: EVIL})


def test_restore_conflicts_hash_mismatch_and_force(tmp_path, root):
    store = make_store(tmp_path)
    path = plant(root, "evil.pkl")
    begin, _ = _q(store, root, path)
    qid = begin["id"]
    os.unlink(path)
    plant(root, "evil.pkl", BENIGN)  # the user put something else there since
    with pytest.raises(QuarantineError, match="not overwritten"):
        mover.restore(store, qid)
    assert open(path, "rb").read() == BENIGN
    assert store.index().entries[qid].state == "quarantined"
    done = mover.restore(store, qid, force=True)
    assert open(path, "rb").read() == EVIL and done["type"] == "restore.done"
    rb = [r for r in store.ledger.records() if r["type"] == "restore.begin"][0]
    assert rb["force"] is True and rb["overwrites"]["sha256"] == sha(BENIGN)
    with pytest.raises(QuarantineError, match="restored, not quarantined"):
        mover.restore(store, qid)
    with pytest.raises(QuarantineError, match="no quarantine entry"):
        mover.restore(store, "Q20260101-00000000")


def test_restore_refuses_a_quarantined_file_whose_hash_changed(tmp_path, root):
    store = make_store(tmp_path)
    path = plant(root, "evil.pkl")
    begin, _ = _q(store, root, path)
    held = tmp_path / "state" / "quarantine" / begin["id"]
    os.chmod(held, 0o600)
    held.write_bytes(EVIL + b"tampered")
    with pytest.raises(QuarantineError, match="sha256"):
        mover.restore(store, begin["id"])
    assert tombstone.parse(open(path, "rb").read()) == begin["id"]
    problems = review.verify(store)["problems"]
    assert len(problems) == 1 and "has sha256" in problems[0]


def test_purge_records_each_deletion_and_verify_sees_strays(tmp_path, root):
    store = make_store(tmp_path)
    a, b = plant(root, "a.pkl"), plant(root, "b.pkl", EVIL + b" ")
    qa, _ = _q(store, root, a)
    qb, _ = _q(store, root, b)
    done = review.purge(store, ids=[qa["id"]])
    assert [d["type"] for d in done] == ["purge.done"]
    assert not (tmp_path / "state" / "quarantine" / qa["id"]).exists()
    assert [r["type"] for r in store.ledger.records() if r.get("id") == qa["id"]] == [
        "quarantine.begin", "quarantine.done", "purge.begin", "purge.done"]
    assert review.verify(store)["problems"] == []
    (tmp_path / "state" / "quarantine" / "stray").write_bytes(b"x")
    os.unlink(tmp_path / "state" / "quarantine" / qb["id"])
    problems = review.verify(store)["problems"]
    assert any("stray" in p and "no ledger entry" in p for p in problems)
    assert any(qb["id"] in p and "missing" in p for p in problems)


def test_hugging_face_blob_records_repo_revision_file_and_restore_relinks(tmp_path):
    hub = tmp_path / "hub"
    repo = hub / "models--org--evil-model"
    etag = sha(EVIL)
    blob = plant(repo, f"blobs/{etag}")
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / rev / "sub").mkdir(parents=True)
    os.symlink(f"../../blobs/{etag}", repo / "snapshots" / rev / "pytorch_model.bin")
    os.symlink(f"../../../blobs/{etag}", repo / "snapshots" / rev / "sub" / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    store = make_store(tmp_path)
    begin, done = _q(store, hub, blob)
    hf = begin["hf"]
    assert hf["repo_id"] == "org/evil-model" and hf["etag"] == etag and hf["refs"] == {"main": rev}
    assert sorted((f["revision"], f["file"], f["link"]) for f in hf["files"]) == [
        (rev, "pytorch_model.bin", f"../../blobs/{etag}"), (rev, "sub/model.safetensors", f"../../../blobs/{etag}")]
    assert done["tombstone"] == {"kind": "pickle", "placed": True}
    link = repo / "snapshots" / rev / "pytorch_model.bin"
    assert tombstone.parse(link.read_bytes()) == begin["id"]  # the link resolves to the tombstone
    os.unlink(link)
    os.unlink(repo / "snapshots" / rev / "sub" / "model.safetensors")
    os.rmdir(repo / "snapshots" / rev / "sub")
    done = mover.restore(store, begin["id"])
    assert sorted(done["links"]["created"]) == [f"snapshots/{rev}/pytorch_model.bin",
                                                f"snapshots/{rev}/sub/model.safetensors"]
    assert link.read_bytes() == EVIL and os.readlink(link) == f"../../blobs/{etag}"


def test_safetensors_named_files_get_a_safetensors_tombstone(tmp_path, root):
    store = make_store(tmp_path)
    path = plant(root, "model.safetensors")
    begin, done = _q(store, root, path)
    assert done["tombstone"] == {"kind": "safetensors", "placed": True}
    assert open(path, "rb").read() == tombstone.build(begin["id"], tombstone.SAFETENSORS)


# -- a kill at each step, then recovery ----------------------------------------------------------

RENAME_STEPS = ["opened", "begun", "renamed", "locked", "tombstoned"]
COPY_STEPS = ["begun", "copying", "copied", "copy_logged", "unlinked", "locked", "tombstoned"]


@pytest.mark.parametrize("method,step", [("rename", s) for s in RENAME_STEPS] + [("copy", s) for s in COPY_STEPS])
def test_kill_during_a_move_then_recovery(tmp_path, root, method, step):
    store = make_store(tmp_path)
    path = plant(root, "d/evil.bin", EVIL_BIG)
    assert killed(run_killed({"op": "quarantine", "kill_at": step, "state": store.state_dir, "root": str(root),
                              "path": path, "exdev": method == "copy"}))
    recovered = mover.recover(store)
    entries = store.index().entries
    if step == "opened":  # killed before anything was written: nothing to recover, file in place
        assert recovered == [] and entries == {} and open(path, "rb").read() == EVIL_BIG
    else:  # every interrupted move is finished: the file out of reach, recorded, verified
        assert [r["type"] for r in recovered] == ["quarantine.done"] and recovered[0]["recovered"] is True
        (entry,) = entries.values()
        assert entry.state == "quarantined"
        assert open(path, "rb").read() != EVIL_BIG
    assert store.ledger.verify()[1] == []
    accounted(store, {path: EVIL_BIG})


@pytest.mark.parametrize("step", ["restore_begun", "restore_renamed", "purge_begun", "purged"])
def test_kill_during_restore_or_purge_then_recovery(tmp_path, root, step):
    store = make_store(tmp_path)
    path = plant(root, "evil.pkl")
    begin, _ = _q(store, root, path)
    op = "purge" if step.startswith("purge") else "restore"
    assert killed(run_killed({"op": op, "kill_at": step, "state": store.state_dir, "id": begin["id"]}))
    recovered = mover.recover(store)
    state = store.index().entries[begin["id"]].state
    expected = {"restore_begun": "quarantined", "restore_renamed": "restored", "purge_begun": "purged",
                "purged": "purged"}[step]
    assert state == expected and recovered and recovered[0]["recovered"] is True
    if expected == "restored":
        assert open(path, "rb").read() == EVIL
    accounted(store, {path: EVIL})


@pytest.mark.parametrize("step", ["restore_begun", "restore_placed"])
def test_kill_during_a_restore_across_filesystems(tmp_path, tmpfs, step):
    root = tmpfs / "cache"
    store = make_store(tmp_path, per_filesystem=False)
    path = plant(root, "evil.pkl")
    begin, _ = _q(store, root, path)
    assert killed(run_killed({"op": "restore", "kill_at": step, "state": store.state_dir, "id": begin["id"],
                              "per_filesystem": False}))
    mover.recover(store)
    state = store.index().entries[begin["id"]].state
    assert state == ("quarantined" if step == "restore_begun" else "restored")
    assert not any(n.startswith(".modelscand-restore-") for n in os.listdir(root))
    accounted(store, {path: EVIL})


def test_a_file_that_changed_while_the_move_was_interrupted_is_not_moved(tmp_path, root):
    store = make_store(tmp_path)
    path = plant(root, "evil.pkl")
    assert killed(run_killed({"op": "quarantine", "kill_at": "begun", "state": store.state_dir, "root": str(root),
                              "path": path}))
    with open(path, "ab") as fh:
        fh.write(b"changed")
    (rec,) = mover.recover(store)
    assert rec["type"] == "quarantine.aborted" and "changed" in rec["reason"]
    assert open(path, "rb").read() == EVIL + b"changed"  # left in place: the daemon scans it again
    assert review.verify(store)["problems"] == []


def test_list_show_data_and_filters(tmp_path, root):
    store = make_store(tmp_path)
    path = plant(root, "a.pkl")
    findings = [{"rule_id": "pickle/call", "severity": "critical", "call": "posix.system('echo hi')", "offset": 3},
                {"rule_id": "pickle/unknown", "severity": "low", "module": "x", "operator": "y"}]
    begin, _ = _q(store, root, path, findings=findings)
    (row,) = [review.summary(e) for e in review.select(store.index())]
    assert row["worst"] == {"severity": "critical", "rule_id": "pickle/call", "what": "posix.system('echo hi')"}
    assert row["state"] == "quarantined" and row["path"] == path
    idx = store.index()
    assert review.select(idx, state="restored") == [] and review.select(idx, repo="nope") == []
    assert review.select(idx, user="nobody-here") == []
    assert len(review.select(idx, since=review.parse_since("1h"))) == 1
    assert review.select(idx, since=review.parse_since("2999-01-01")) == []
    assert json.loads(json.dumps(row))  # JSON-able as it is


def test_a_per_filesystem_dir_removed_while_running_is_created_again(tmp_path, tmpfs):
    root = tmpfs / "cache"
    store = make_store(tmp_path)
    first = plant(root, "a.pkl")
    _q(store, root, first)
    purge_all = [e.id for e in store.index().entries.values()]
    review.purge(store, ids=purge_all)
    os.rmdir(tmpfs / PER_FS_NAME)  # an operator cleaned up
    second = plant(root, "b.pkl", EVIL + b"b")
    begin, _ = _q(store, root, second)
    assert begin["method"] == "rename" and (tmpfs / PER_FS_NAME / begin["id"]).exists()
    accounted(store, {second: EVIL + b"b"})
