"""Red team of the daemon and its quarantine, as an unprivileged local user and an unlucky
operator would attack it. Each test of a defect was written first and failed on the code it
names (test_restored_bytes_... guards another fix against a loop); each asserts what a user or
operator sees: a verdict, a file moved or left, a log line, an exit code.

The other user is simulated with a real uid (those tests run as root; they skip otherwise):
a "victim" owns files outside every root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from modelscand.quarantine import mover, tombstone
from tests.modelscand.conftest import EVIL
from tests.modelscand.qhelpers import accounted, make_store, plant, sha
from tests.modelscand.test_cli import REPO, cli, events
from tests.modelscand.test_issue10 import _state, _verdicts

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="simulating other users needs root")
VICTIM = 6161  # a uid with no passwd entry: an owner only


def _owned(path, uid, mode=None):
    os.chown(path, uid, uid, follow_symlinks=False)
    if mode is not None:
        os.chmod(path, mode)


# -- names that hid a file from the scanner -----------------------------------------------------

@pytest.mark.slow
def test_a_directory_named_like_the_quarantine_or_hf_metadata_hides_nothing(tmp_path):
    """`.modelscand-quarantine`, `refs` and `.no_exist` anywhere in a root were never scanned
    (a repo downloaded with `hf download --local-dir` can hold such paths)."""
    root = tmp_path / "r"
    hidden = [plant(root, rel) for rel in (".modelscand-quarantine/evil.pkl", "proj/.modelscand-quarantine/a.pkl",
                                           "proj/refs/evil.pkl", "x/.no_exist/evil.pkl",
                                           "models--org--m/snapshots/0123/refs/evil.pkl")]
    meta = plant(root, "models--org--m/refs/main", b"0123456789abcdef0123456789abcdef01234567")
    out = cli("run", "--once", "--root", str(root), "--state-dir", _state(tmp_path))
    evs = events(out.stdout)
    for path in hidden:
        assert [e["event"] for e in _verdicts(evs, path)] == ["scan.finding"], path
    assert _verdicts(evs, meta) == []  # HF's own ref file is still left alone
    assert out.returncode == 1


# -- time ---------------------------------------------------------------------------------------------

def test_a_file_with_a_future_mtime_is_scanned_not_parked_for_years(running, root, tmp_path):
    """`touch -d 2100-01-01` (or a clock set back) made the quiet period last until then."""
    future = time.time() + 80 * 365 * 86400
    early = root / "early.pkl"
    early.write_bytes(EVIL)
    os.utime(early, (future, future))
    outside = tmp_path / "outside.pkl"
    outside.write_bytes(EVIL + b" ")
    os.utime(outside, (future, future))
    with running(str(root)) as h:
        assert h.wait_scan(str(early))["event"] == "scan.finding"  # found by the start-up walk
        os.link(outside, root / "linked.pkl")  # arrives by a Created event, not a rename
        assert h.wait_scan(str(root / "linked.pkl"))["event"] == "scan.finding"
        h.settle()


# -- Hugging Face metadata read as root -----------------------------------------------------------

def _hf_repo(hub, etag_data=EVIL):
    repo = hub / "models--org--m"
    etag = sha(etag_data)
    blob = plant(repo, f"blobs/{etag}", etag_data)
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / rev).mkdir(parents=True)
    os.symlink(f"../../blobs/{etag}", repo / "snapshots" / rev / "pytorch_model.bin")
    plant(repo, "refs/main", rev.encode())
    return repo, blob, rev


def test_a_repo_with_a_pull_request_revision_is_still_quarantined(tmp_path):
    """huggingface_hub keeps `revision="refs/pr/1"` as the file refs/refs/pr/1: reading every
    entry of refs/ as a file hit a directory, and the move failed with the file in place."""
    hub = tmp_path / "hub"
    repo, blob, rev = _hf_repo(hub)
    plant(repo, "refs/refs/pr/1", rev.encode())
    plant(repo, "refs/v2", rev.encode())
    store = make_store(tmp_path)
    begin, _ = mover.quarantine(store, mover.Subject(str(hub), blob), {"verdict": "issues"})
    assert begin["hf"]["refs"] == {"main": rev, "refs/pr/1": rev, "v2": rev}
    accounted(store, {blob: EVIL})


@ROOT_ONLY
def test_hf_refs_linked_out_of_the_root_are_never_read(tmp_path):
    """A user points refs/ (or a ref) at a directory of files they cannot read: nothing of
    them may reach the ledger, the hook or `show` (root reads on the user's behalf)."""
    hub = tmp_path / "hub"
    repo, blob, rev = _hf_repo(hub)
    secret_dir = tmp_path / "victim"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "main").write_bytes(b"SECRET-VICTIM-DATA")
    _owned(secret_dir / "main", VICTIM, 0o600)
    _owned(secret_dir, VICTIM)
    os.unlink(repo / "refs" / "main")
    os.rmdir(repo / "refs")
    os.symlink(secret_dir, repo / "refs")
    store = make_store(tmp_path)
    begin, _ = mover.quarantine(store, mover.Subject(str(hub), blob), {"verdict": "issues"})
    raw = b"".join(open(os.path.join(store.ledger.dir, s), "rb").read() for s in store.ledger.segments())
    assert b"SECRET" not in raw
    assert "refs" not in begin["hf"]
    accounted(store, {blob: EVIL})


# -- a kill between the verdict and the move ------------------------------------------------------

KILL_AT_OPENED = ("import os, signal, sys\n"
                  "from modelscand.quarantine import mover\n"
                  "mover.STEP_HOOK = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == 'opened' else None\n"
                  "from modelscand.cli import main\n"
                  "sys.argv[0] = 'modelscand'\n"
                  "main()\n")


@pytest.mark.slow
def test_a_daemon_killed_after_the_verdict_and_before_the_move_moves_it_at_restart(tmp_path):
    """The verdict was in the baseline, the ledger had nothing: the restart took the cached
    finding as settled and the malicious file stayed in place for good."""
    root = tmp_path / "r"
    evil = plant(root, "evil.pkl")
    state = _state(tmp_path)
    args = ["run", "--once", "--mode", "quarantine", "--root", str(root), "--state-dir", state]
    first = subprocess.run([sys.executable, "-c", KILL_AT_OPENED, *args], capture_output=True, text=True,
                           cwd=REPO, timeout=60)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert open(evil, "rb").read() == EVIL
    again = cli(*args)
    moved = [e for e in events(again.stdout) if e["event"] == "quarantine.moved"]
    assert [e["path"] for e in moved] == [evil], again.stdout[-3000:]
    assert tombstone.parse(open(evil, "rb").read()) == moved[0]["id"]
    assert again.returncode == 1
    quiet = cli(*args)  # and once moved, a third start has nothing left to do
    assert not [e for e in events(quiet.stdout) if e["event"].startswith("quarantine.")]


# -- a worker killed by someone else -----------------------------------------------------------------

@pytest.mark.slow
def test_a_worker_killed_from_outside_is_retried_not_an_error_verdict_for_good(running, root):
    """The OOM killer (or an operator) SIGKILLs a worker mid-scan: that says nothing about the
    file. Stored as its error verdict, a malicious file was never scanned again."""
    path = root / "slow_evil.pkl"
    with running(str(root), scan_function="tests.modelscand.hooks:slow") as h:
        path.write_bytes(EVIL)
        pool = h.daemon.pool
        h.wait_for(lambda _: any(s.busy_since is not None for s in pool.slots), what="the scan in flight")
        time.sleep(0.3)
        os.kill(pool.slots[0].proc.pid, signal.SIGKILL)
        assert h.wait_scan(str(path), timeout=20)["event"] == "scan.finding"
        h.settle()
        assert [e["event"] for e in h.scans(str(path))] == ["scan.finding"]


@pytest.mark.slow
def test_a_file_killed_under_every_scan_gets_one_incomplete_warning_not_a_loop(running, root):
    """Retries after outside kills are bounded: the third death is one `scan.incomplete`
    warning (kept in the baseline, so nothing loops), never a clean and never silence."""
    path = root / "oom_model.pkl"
    with running(str(root), scan_function="tests.modelscand.hooks:oom_killed") as h:
        path.write_bytes(EVIL)
        ev = h.wait_scan(str(path), timeout=20)
        assert ev["event"] == "scan.incomplete" and ev["level"] == "warning", ev
        assert "killed from outside 3 times" in ev["error"]
        assert len(h.named("scan.retry")) == 2
        (root / "after.pkl").write_bytes(EVIL)  # the pool still works
        assert h.wait_scan(str(root / "after.pkl"))["event"] == "scan.finding"
        h.settle()
        assert [e["event"] for e in h.scans(str(path))] == ["scan.incomplete"]


@pytest.mark.slow
def test_a_temp_file_with_a_future_mtime_is_swept_like_any_stale_one(running, root):
    """The stale-temp sweep compared the mtime with the clock: a `.incomplete` file dated
    2100 was never stale, never scanned, though a loader can open it by that name."""
    temp = root / "model.bin.incomplete"
    temp.write_bytes(EVIL)
    future = time.time() + 80 * 365 * 86400
    os.utime(temp, (future, future))
    with running(str(root), watch__stale_temp_after=0.5) as h:
        h.settle()
        assert h.scans(str(temp)) == []  # first walk: only seen
        time.sleep(0.6)
        h.daemon.reconciler.walk(h.daemon.roots.get(str(root)), "periodic")
        ev = h.wait_scan(str(temp))
        assert ev["event"] == "scan.finding" and ev["temp"]["status"] == "stale"


# -- Hugging Face metadata: the class, not the sample ------------------------------------------------

@ROOT_ONLY
def test_hf_snapshots_linked_out_of_the_root_are_never_listed(tmp_path):
    """snapshots/ pointed at a victim's directory holding a link to the blob: its name (a
    victim's file name) must not reach the record."""
    hub = tmp_path / "hub"
    repo, blob, rev = _hf_repo(hub)
    secret_dir = tmp_path / "victim"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / rev).mkdir()
    os.symlink(blob, secret_dir / rev / "SECRET-NAME.bin")
    _owned(secret_dir, VICTIM)
    os.rename(repo / "snapshots", tmp_path / "snapshots.real")
    os.symlink(secret_dir, repo / "snapshots")
    store = make_store(tmp_path)
    begin, _ = mover.quarantine(store, mover.Subject(str(hub), blob), {"verdict": "issues"})
    raw = b"".join(open(os.path.join(store.ledger.dir, s), "rb").read() for s in store.ledger.segments())
    assert b"SECRET" not in raw
    assert begin["hf"]["files"] == []
    accounted(store, {blob: EVIL})


def test_hf_nested_files_and_a_shared_blob_store_are_recorded_by_link_text(tmp_path):
    """Nested names (../../../blobs/x) and huggingface_hub's shared store (a repo blob that
    is itself a link into <cache>/blobs/<2hex>/<hash>) are described without following links."""
    hub = tmp_path / "hub"
    digest = sha(EVIL)
    shared = plant(hub, f"blobs/{digest[:2]}/{digest}")
    repo = hub / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    os.symlink(f"../../blobs/{digest[:2]}/{digest}", repo / "blobs" / "etag1")
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / rev / "sub").mkdir(parents=True)
    os.symlink("../../../blobs/etag1", repo / "snapshots" / rev / "sub" / "model.bin")
    os.symlink("../../blobs/etag1", repo / "snapshots" / rev / "top.bin")
    plant(repo, "refs/main", rev.encode())
    store = make_store(tmp_path)
    begin, _ = mover.quarantine(store, mover.Subject(str(hub), shared), {"verdict": "issues"})
    hf = begin["hf"]
    assert (hf["repo_id"], hf["etag"], hf["shared_blob"]) == ("org/m", "etag1", True)
    assert sorted((f["file"], f["link"]) for f in hf["files"]) == [("sub/model.bin", "../../../blobs/etag1"),
                                                                   ("top.bin", "../../blobs/etag1")]
    assert hf["blob_link"] == {"name": "blobs/etag1", "link": f"../../blobs/{digest[:2]}/{digest}"}
    assert hf["refs"] == {"main": rev}
    accounted(store, {shared: EVIL})


# -- a cached verdict is not an action -----------------------------------------------------------

def _quarantine_config(tmp_path, state):
    conf = tmp_path / "q.toml"
    conf.write_text(f'[scan]\nmode = "quarantine"\n[state]\ndir = "{state}"\n[watch]\nconventions = false\n')
    return str(conf)


@pytest.mark.slow
def test_modelscand_scan_reports_and_moves_nothing_even_with_a_quarantine_config(tmp_path):
    """`modelscand scan` is what a user runs before loading: exit 1 and the file where it
    was; `--mode quarantine` opts in. And the detect verdict it cached does not stop the
    daemon (quarantine mode, same state dir) from moving the file."""
    root = tmp_path / "r"
    evil = plant(root, "evil.pkl")
    state = _state(tmp_path)
    conf = _quarantine_config(tmp_path, state)
    out = cli("scan", "--config", conf, evil)
    assert out.returncode == 1, out.stderr
    evs = events(out.stdout)
    assert [e["event"] for e in _verdicts(evs, evil)] == ["scan.finding"]
    assert not [e for e in evs if e["event"].startswith("quarantine.")]
    assert open(evil, "rb").read() == EVIL
    daemon = cli("run", "--once", "--config", conf, "--root", str(root))
    moved = [e for e in events(daemon.stdout) if e["event"] == "quarantine.moved"]
    assert [e["path"] for e in moved] == [evil], daemon.stdout[-3000:]
    assert tombstone.parse(open(evil, "rb").read()) == moved[0]["id"]
    other = plant(tmp_path / "r2", "other.pkl", EVIL + b"  ")
    opted = cli("scan", "--config", conf, "--mode", "quarantine", other)
    assert opted.returncode == 1
    assert [e["path"] for e in events(opted.stdout) if e["event"] == "quarantine.moved"] == [other]


@pytest.mark.slow
def test_restored_bytes_are_settled_not_rescanned_at_every_start(tmp_path):
    """A cached finding is rescanned in quarantine mode only when the quarantine would act
    on it: bytes an operator restored are left alone, with no finding logged again."""
    root = tmp_path / "r"
    evil = plant(root, "evil.pkl")
    state = _state(tmp_path)
    args = ["run", "--once", "--mode", "quarantine", "--root", str(root), "--state-dir", state]
    first = cli(*args)
    qid = [e for e in events(first.stdout) if e["event"] == "quarantine.moved"][0]["id"]
    restored = cli("quarantine", "restore", qid, "--state-dir", state)
    assert restored.returncode == 0, restored.stderr
    assert open(evil, "rb").read() == EVIL
    second = cli(*args)  # new identity (the restore): scanned once, allowed, left in place
    assert [e["event"] for e in events(second.stdout) if e.get("path") == evil
            and e["event"] in ("scan.finding", "quarantine.allowed", "quarantine.moved")] == \
        ["scan.finding", "quarantine.allowed"]
    third = cli(*args)
    assert [e["event"] for e in events(third.stdout) if e.get("path") == evil] == ["scan.cached"]
    assert open(evil, "rb").read() == EVIL


def test_an_hf_blob_given_as_its_own_root_keeps_its_names(tmp_path):
    """`modelscand scan --mode quarantine <blob>`: the file is its own root; its repo folder
    is above it, still read (from /, never through a link), so restore can put it back."""
    hub = tmp_path / "hub"
    repo, blob, rev = _hf_repo(hub)
    store = make_store(tmp_path)
    begin, _ = mover.quarantine(store, mover.Subject(blob, blob), {"verdict": "issues"})
    assert begin["hf"]["files"] == [{"revision": rev, "file": "pytorch_model.bin", "link": f"../../blobs/{sha(EVIL)}"}]
    assert begin["hf"]["refs"] == {"main": rev}
    accounted(store, {blob: EVIL})
