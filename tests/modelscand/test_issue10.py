"""Issue 10: every way the daemon lost a file or misled its operator, each reproduced first.

Each test drives the daemon the way a user or writer would (CLI subprocesses, real files
on a real inotify watch) and asserts what the operator sees: verdict events, levels, exit
codes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.modelscand.conftest import BENIGN, EVIL
from tests.modelscand.test_cli import REPO, cli, events


def _state(tmp_path, name="state"):
    d = tmp_path / name
    d.mkdir(mode=0o700)
    return str(d)


def _verdicts(evs, path=None):
    out = [e for e in evs if e["event"] in ("scan.clean", "scan.finding", "scan.error", "scan.incomplete",
                                            "scan.skipped", "scan.cached")]
    return [e for e in out if path is None or e.get("path") == str(path)]


# -- the one-shot commands ----------------------------------------------------------------

@pytest.mark.slow
def test_scan_of_a_file_path_scans_it_and_exits_like_modelscan(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "evil.pkl").write_bytes(EVIL)
    (d / "ok.pkl").write_bytes(BENIGN)
    out = cli("scan", str(d / "evil.pkl"), "--state-dir", _state(tmp_path))
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr
    assert [e["event"] for e in _verdicts(events(out.stdout), d / "evil.pkl")] == ["scan.finding"]
    out = cli("run", "--once", "--root", str(d / "ok.pkl"), "--state-dir", _state(tmp_path, "s2"))
    assert out.returncode == 0, out.stderr
    assert [e["event"] for e in _verdicts(events(out.stdout))] == ["scan.clean"]
    assert not [e for e in events(out.stdout) if e["event"] == "watch.root_missing"]


def test_version_flag_and_a_closed_pipe(tmp_path):
    from modelscan_core._version import __version__

    out = cli("--version")
    assert out.returncode == 0 and __version__ in out.stdout
    good = tmp_path / "good.toml"
    good.write_text(f'[watch]\nroots = ["{tmp_path}"]\nconventions = false\n')
    p = subprocess.run(f"{sys.executable} -m modelscand.cli check-config --config {good} --json | head -c 1",
                       shell=True, capture_output=True, text=True, cwd=REPO)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_status_shows_the_roots_of_the_reloaded_config(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    conf = tmp_path / "c.toml"
    conf.write_text(f'[watch]\nroots = ["{a}"]\nconventions = false\n')
    state = _state(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "modelscand.cli", "run", "--config", str(conf), "--state-dir",
                             state], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        for line in proc.stdout:
            if '"daemon.ready"' in line:
                break
        conf.write_text(f'[watch]\nroots = ["{b}"]\nconventions = false\n')
        proc.send_signal(signal.SIGHUP)
        for line in proc.stdout:
            if '"daemon.reloaded"' in line:
                break
        info = json.loads(cli("status", "--state-dir", state, "--json").stdout)
        assert info["roots"] == [str(b)] and info["running"] is True
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


# -- a malicious pickle with a 50 GB sparse tail -----------------------------------------

@pytest.mark.slow
def test_a_finding_survives_a_hash_phase_that_runs_out(running, root, tmp_path):
    big = root / "big.pkl"
    with running(str(root), scan__hash_timeout=0.5, scan__workers=2) as h:
        tmp = root / ".big.pkl.tmp"
        tmp.write_bytes(EVIL)
        os.truncate(tmp, 50 * 2**30)  # sparse: costs nothing on disk, minutes to hash
        t0 = time.monotonic()
        os.rename(tmp, big)
        ev = h.wait_scan(str(big), timeout=30)
        took = time.monotonic() - t0
        assert ev["event"] == "scan.finding" and ev["severity"] == "critical"
        assert ev["sha256"] is None and "not hashed" in ev["hash_note"]
        assert took < 15, took  # bounded by the hash phase's limit, not by 50 GB
        (root / "after.pkl").write_bytes(BENIGN)
        assert h.wait_scan(str(root / "after.pkl"))["event"] == "scan.clean"


# -- renames while a file is queued or being scanned -----------------------------------

SLOW = "tests.modelscand.hooks:slow"


def _in_flight(h, n=1):
    h.wait_for(lambda h: h.daemon.scheduler.in_flight() >= n, 10, "a scan in flight")


@pytest.mark.slow
def test_rename_of_a_file_being_scanned_scans_the_destination(running, root):
    with running(str(root), scan_function=SLOW) as h:
        tmp = root / ".slow_tmp_x"  # no writer rule knows this name as temporary
        tmp.write_bytes(EVIL)
        _in_flight(h)
        os.rename(tmp, root / "final.pkl")
        ev = h.wait_scan(str(root / "final.pkl"), timeout=15)
        assert ev["event"] == "scan.finding"


@pytest.mark.slow
def test_rename_of_a_directory_holding_queued_files_scans_them_all(running, root):
    with running(str(root), scan_function=SLOW) as h:
        d = root / "tmpx"  # torch.hub: extract into a temp dir, then move it into place
        d.mkdir()
        names = ["slow0.pkl", "m1.pkl", "m2.pkl", "m3.pkl"]  # the first is in flight, the others queued
        for i, n in enumerate(names):
            (d / n).write_bytes(EVIL if i == 2 else BENIGN)
        _in_flight(h)
        os.rename(d, root / "final_a")
        for i, n in enumerate(names):
            ev = h.wait_scan(str(root / "final_a" / n), timeout=20)
            assert ev["event"] == ("scan.finding" if i == 2 else "scan.clean")


@pytest.mark.slow
def test_directory_swapped_for_a_symlink_during_the_scan_rescans_the_real_file(running, root):
    with running(str(root), scan_function=SLOW) as h:
        d = root / "slowd"
        d.mkdir()
        (d / "model.pkl").write_bytes(EVIL)
        _in_flight(h)
        os.rename(d, root / "real")
        os.symlink("real", d)  # the old path now leads through a link
        ev = h.wait_scan(str(root / "real" / "model.pkl"), timeout=15)
        assert ev["event"] == "scan.finding"
        h.settle()
        st = os.stat(root / "real" / "model.pkl")
        rows = {(r.identity.dev, r.identity.ino): r.verdict for r in h.daemon.baseline.all_rows()}
        assert rows[(st.st_dev, st.st_ino)] == "issues"
        assert not [e for e in h.scans() if e["event"] == "scan.error"]


# -- links that leave every root ------------------------------------------------------

def test_a_link_to_a_model_outside_the_roots_is_a_warning_and_the_target_gets_a_verdict(running, root, tmp_path):
    elsewhere = tmp_path / "blobs-on-another-disk"
    elsewhere.mkdir()
    (elsewhere / "ab12").write_bytes(EVIL)
    (elsewhere / "cd34").write_bytes(BENIGN)
    snap = root / "models--org--m" / "snapshots" / "c0ffee"
    snap.mkdir(parents=True)
    os.symlink(elsewhere / "cd34", snap / "config.pkl")  # there before the start: the walk finds it
    with running(str(root)) as h:
        ev = h.wait_scan(str(elsewhere / "cd34"))
        assert ev["event"] == "scan.clean" and ev["via"] == str(snap / "config.pkl")
        os.symlink(elsewhere / "ab12", snap / "pytorch_model.bin")
        warn = h.wait_event("link.outside_roots", path=str(snap / "pytorch_model.bin"))
        assert warn["level"] == "warning" and warn["target"] == str(elsewhere / "ab12")
        ev = h.wait_scan(str(elsewhere / "ab12"))
        assert ev["event"] == "scan.finding" and ev["outside_roots"] is True
        h.wait_event("action.detect", path=str(elsewhere / "ab12"))


def test_a_link_to_a_file_its_owner_cannot_read_is_reported_not_read(running, root, tmp_path):
    secret = tmp_path / "root-only.pkl"
    secret.write_bytes(EVIL)
    os.chmod(secret, 0o600)
    os.chmod(tmp_path, 0o755)
    with running(str(root)) as h:
        link, made = root / "model.pkl", tmp_path / "model.pkl"
        os.symlink(secret, made)
        os.lchown(made, 65534, 65534)  # a user's link to root's file: the daemon must not read it for them
        os.rename(made, link)
        warn = h.wait_event("link.outside_roots", path=str(link))
        assert warn["level"] == "warning" and "cannot read" in warn["answer"]
        h.settle()
        assert h.scans() == []


# -- the root itself moves ------------------------------------------------------------

def test_a_root_renamed_away_and_recreated_is_watched_again(running, root, tmp_path):
    with running(str(root)) as h:
        os.rename(root, tmp_path / "root.old")  # mv hub hub.old; mkdir hub
        root.mkdir()
        (root / "early.pkl").write_bytes(EVIL)  # before the daemon can have noticed: the walk finds it
        lost = h.wait_event("watch.root_lost", root=str(root))
        assert lost["level"] == "warning"
        assert h.wait_scan(str(root / "early.pkl"), timeout=15)["event"] == "scan.finding"
        h.wait_event("watch.root_appeared", root=str(root))
        (root / "later.pkl").write_bytes(BENIGN)  # and the new directory is watched
        assert h.wait_scan(str(root / "later.pkl"), timeout=10)["event"] == "scan.clean"


def test_a_root_replaced_without_any_event_is_noticed_by_its_inode(running, root, tmp_path):
    with running(str(root)) as h:
        for w in h.daemon.watches.values():  # as if the IN_MOVE_SELF had been lost in an overflow
            w._on_root_gone = lambda *a: None
        os.rename(root, tmp_path / "root.old")
        root.mkdir()
        (root / "m.pkl").write_bytes(EVIL)
        assert h.wait_scan(str(root / "m.pkl"), timeout=15)["event"] == "scan.finding"


# -- large trees: the daemon must not flood its own inotify queue ----------------------

IN_ACCESS, IN_OPEN, IN_CLOSE_NOWRITE = 0x1, 0x20, 0x10


def _kernel_masks(watch) -> list[int]:
    """The masks the kernel holds for this watch's inotify instance (/proc fdinfo)."""
    fd = watch.observer._inotify_fd._inotify_fd
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return [int(line.split("mask:")[1].split()[0], 16) for line in f if line.startswith("inotify wd:")]


def test_watches_and_walks_do_not_queue_events_for_the_daemons_own_reads(running, root):
    for i in range(60):
        d = root / f"models--o--m{i}" / "snapshots" / "abc"
        d.mkdir(parents=True)
        (d / "w.pkl").write_bytes(BENIGN)
    with running(str(root)) as h:
        h.wait_for(lambda h: len(h.scans()) == 60, 30, "60 verdicts")
        h.settle()
        masks = _kernel_masks(next(iter(h.daemon.watches.values())))
        assert len(masks) >= 60 * 3
        assert not [m for m in masks if m & (IN_ACCESS | IN_OPEN | IN_CLOSE_NOWRITE)], hex(masks[0])
        seen = []
        h.daemon.handler_hook = lambda w, e: seen.append(e.event_type)
        h.daemon.reconciler.request(str(root), "periodic")  # opens every directory of the tree
        h.wait_event("reconcile.done", why="periodic")
        h.settle()
        assert seen == []


@pytest.mark.slow
def test_overflows_in_a_row_are_one_warning_each_and_walks_are_coalesced_and_rate_limited(running, root,
                                                                                            monkeypatch):
    from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent

    from modelscand import reconcile

    monkeypatch.setattr(reconcile, "RESCAN_MIN_GAP", 2.0)
    (root / "m.pkl").write_bytes(BENIGN)
    with running(str(root)) as h:
        h.settle()
        fd = next(iter(h.daemon.watches.values())).observer._inotify_fd

        def overflow(n):  # what a flooded kernel queue keeps sending
            for _ in range(n):
                fd.handle_event(InotifyEvent(-1, InotifyConstants.IN_Q_OVERFLOW, 0, b""))

        n0 = len(h.events)
        overflow(5)
        first = h.wait_event("reconcile.done", why="overflow")
        overflow(5)
        h.wait_for(lambda h: h.daemon.reconciler.busy(), 5, "the next walk to be due")
        time.sleep(0.5)
        walks = [e for e in h.events[n0:] if e["event"] == "reconcile.start"]
        assert len(walks) == 1  # the next one waits for the gap, and all five are one walk
        h.wait_for(lambda h: len([e for e in h.events[n0:] if e["event"] == "reconcile.done"]) == 2, 15,
                   "the delayed walk")
        new = h.events[n0:]
        second = [e for e in new if e["event"] == "reconcile.start"][1]
        gap = _ts(second) - _ts(first)
        assert gap >= 1.9, gap
        assert len([e for e in new if e["event"] == "reconcile.start"]) == 2
        assert len([e for e in new if e["event"] == "watch.overflow"]) == 10
        assert all(e["level"] == "warning" for e in new if e["event"] == "watch.overflow")
        assert not [e for e in new if e["event"].startswith("log.watchdog")]  # no second voice per overflow


def _ts(ev) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(ev["ts"].replace("Z", "+00:00")).timestamp()


# -- one file, one final verdict; transient states are debug -----------------------------

def test_a_vanished_subdirectory_is_debug_and_not_polled(running, root):
    with running(str(root)) as h:
        group = next(iter(h.daemon.watches.values())).observer.emitters
        group = next(iter(group))._inotify
        group._add_callback(os.fsencode(str(root / "tmpab12cd")))  # HF's tmp dir, gone before its watch
        ev = h.wait_event("watch.subwatch_failed")
        assert ev["level"] == "debug"
        assert h.daemon.roots.polled == {}


@pytest.mark.slow
def test_a_writer_that_reopens_and_appends_per_chunk_gets_one_verdict(running, root):
    p = root / "model.pkl"
    with running(str(root), watch__settle_time=0.3) as h:
        for i in range(0, len(EVIL), 6):
            with open(p, "ab") as f:  # open, append one chunk, close: a Closed event each time
                f.write(EVIL[i:i + 6])
            time.sleep(0.05)
        ev = h.wait_scan(str(p))
        h.settle()
        assert [e["event"] for e in h.scans(str(p))] == ["scan.finding"], h.scans(str(p))
        assert ev["size"] == len(EVIL)


def test_a_fifo_and_random_bytes_named_like_models_are_warnings(running, root):
    with running(str(root)) as h:
        os.mkfifo(root / "model.pkl")
        ev = h.wait_event("scan.not_regular", path=str(root / "model.pkl"))
        assert ev["level"] == "warning" and ev["kind"] == "fifo"
        (root / "pytorch_model.bin").write_bytes(os.urandom(4096))
        ev = h.wait_scan(str(root / "pytorch_model.bin"))
        assert ev["level"] == "warning" and ev["verdict"] in ("skipped", "error")
        (root / "notes.txt").write_bytes(b"just text\n")  # not a model name: no warning
        assert h.wait_scan(str(root / "notes.txt"))["level"] == "info"


# -- the state directory cannot be written ---------------------------------------------

def _in_private_mounts(script: str, *args: str, **kw):
    """Run `script` (sh) in a private mount namespace: its mounts never reach this machine."""
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-ec", script, "sh", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120, **kw)


READ_ONLY = 'mount --bind "$1" "$1"; mount -o remount,ro,bind "$1"; shift; exec "$@"'


@pytest.mark.slow
def test_a_read_only_state_dir_degrades_loudly_and_loses_no_verdict(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "ok.pkl").write_bytes(BENIGN)
    state = _state(tmp_path)
    assert cli("run", "--once", "--root", str(root), "--state-dir", state).returncode == 0  # a baseline exists
    (root / "evil.pkl").write_bytes(EVIL)
    daemon = [sys.executable, "-m", "modelscand.cli"]
    out = _in_private_mounts(READ_ONLY, state, *daemon, "run", "--once", "--root", str(root), "--state-dir", state)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    evs = events(out.stdout)
    assert [e["event"] for e in _verdicts(evs, root / "evil.pkl")] == ["scan.finding"]
    degraded = [e for e in evs if e["event"] == "state.degraded"]
    assert degraded and degraded[0]["level"] == "error"
    status = _in_private_mounts(READ_ONLY, state, *daemon, "status", "--state-dir", state, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["files"]["clean"] == 1
    fresh = _state(tmp_path, "fresh")  # no baseline yet, and none can be made
    out = _in_private_mounts(READ_ONLY, fresh, *daemon, "run", "--once", "--root", str(root), "--state-dir", fresh)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert [e["event"] for e in _verdicts(events(out.stdout), root / "evil.pkl")] == ["scan.finding"]


@pytest.mark.slow
def test_a_full_state_dir_logs_every_verdict_and_catches_up_when_space_returns(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    state = _state(tmp_path)
    conf = tmp_path / "c.toml"
    conf.write_text("[watch]\nroot_retry_interval = 0.3\n")  # the state retry runs on this timer too
    script = ('mount -t tmpfs -o size=1m,mode=0700 tmpfs "$1"; shift; exec "$@"')
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-ec", script, "sh", state,
                             sys.executable, "-m", "modelscand.cli", "run", "--config", str(conf), "--root", str(root),
                             "--state-dir", state],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: [lines.append(json.loads(ln)) for ln in proc.stdout
                                              if ln.startswith("{")], daemon=True)
    reader.start()

    def until(pred, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in list(lines):
                if pred(e):
                    return e
            time.sleep(0.05)
        raise AssertionError(f"timed out; last events {[e['event'] for e in lines[-20:]]}")

    try:
        until(lambda e: e["event"] == "daemon.ready")
        fill = subprocess.run(["nsenter", "-t", str(proc.pid), "-m", "sh", "-c",
                               f"dd if=/dev/zero of={state}/filler bs=64k 2>/dev/null; true"], capture_output=True)
        assert fill.returncode == 0
        for i in range(5):
            (root / f"m{i}.pkl").write_bytes(EVIL if i == 3 else BENIGN * 50)
        degraded = until(lambda e: e["event"] == "state.degraded")
        assert degraded["level"] == "error"
        until(lambda e: len(_verdicts(list(lines))) == 5)  # every verdict is logged all the same
        assert [e["event"] for e in _verdicts(lines, root / "m3.pkl")] == ["scan.finding"]
        subprocess.run(["nsenter", "-t", str(proc.pid), "-m", "rm", "-f", f"{state}/filler"], check=True)
        rec = until(lambda e: e["event"] == "state.recovered", timeout=30)
        assert rec["flushed"] >= 5
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


# -- found by the model-based test ------------------------------------------------------

def test_sigterm_and_sighup_delivered_to_any_thread_are_handled_at_once(tmp_path):
    import ctypes

    root = tmp_path / "r"
    root.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    proc = subprocess.Popen([sys.executable, "-m", "modelscand.cli", "run", "--root", str(root), "--state-dir",
                             _state(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        for line in proc.stdout:
            if '"daemon.ready"' in line:
                break
        others = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]

        def to_thread(sig):  # tgkill: the kernel hands the signal to that thread, not the main one
            assert libc.syscall(234, proc.pid, others[-1], sig) == 0, ctypes.get_errno()

        to_thread(signal.SIGHUP)
        for line in proc.stdout:
            if '"daemon.reloaded"' in line:
                break
        t0 = time.monotonic()
        to_thread(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.slow
def test_a_file_that_keeps_being_written_is_scanned_after_the_bounded_wait(running, root):
    p = root / "model.pkl"
    with running(str(root), watch__settle_time=0.5, watch__busy_max_wait=1.0) as h:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2:  # a pause never as long as settle_time
            with open(p, "ab") as f:
                f.write(BENIGN[:1] if f.tell() else EVIL)
            time.sleep(0.1)
        warn = h.wait_event("scan.deferred", path=str(p))
        assert warn["level"] == "warning" and warn["why"] == "the file keeps being written"
        assert h.wait_scan(str(p))["event"] == "scan.finding"


@pytest.mark.slow
def test_a_file_that_changes_under_every_scan_is_one_warning_and_a_backoff_not_a_loop(running, root):
    with running(str(root), scan_function="tests.modelscand.hooks:always_changed") as h:
        (root / "flux.pkl").write_bytes(BENIGN)
        warn = h.wait_event("scan.unstable", path=str(root / "flux.pkl"))
        assert warn["level"] == "warning" and warn["why"] == "changed"
        (root / "ok.pkl").write_bytes(BENIGN)  # the workers are free for other files meanwhile
        assert h.wait_scan(str(root / "ok.pkl"))["event"] == "scan.clean"
        time.sleep(2)
        assert len(h.named("scan.unstable")) == 1  # one warning, then a growing delay
