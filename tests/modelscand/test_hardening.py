"""Red-team round 3: path escapes, forged identities, stale temp files, held writers, log
injection, an untrusted state dir. Each test asserts what a user sees (events, verdicts, files)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tests.modelscand.conftest import BENIGN, EVIL
from tests.modelscand.test_cli import cli, events


def _state(tmp_path, name="state"):
    d = tmp_path / name
    d.mkdir(mode=0o700)
    return str(d)


@pytest.mark.slow
def test_control_and_bidi_characters_in_file_names_are_escaped_in_both_formats(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    name = "evil.pkl\x1b[2K\x1b]0;pwned\x07\u202egpj\u009b2J\u2066.pkl"
    (root / name).write_bytes(EVIL)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[log]\nformat = "console"\n')
    out = cli("run", "--once", "--config", str(cfg), "--root", str(root), "--state-dir", _state(tmp_path))
    assert out.returncode == 1, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "evil.pkl" in ln and "scan.finding" in ln)
    for raw in ("\x1b", "\x07", "\u202e", "\u009b", "\u2066"):
        assert raw not in out.stdout
    assert "\\x1b[2K" in line and "\\u202e" in line and "\\x9b" in line
    out = cli("run", "--once", "--root", str(root), "--state-dir", _state(tmp_path, "s2"))
    assert not any(ch in out.stdout for ch in ("\x1b", "\x07", "\u202e", "\u009b", "\u2066"))
    ev = next(e for e in events(out.stdout) if e["event"] == "scan.finding")
    assert ev["path"] == str(root) + "/evil.pkl\\x1b[2K\\x1b]0;pwned\\x07\\u202egpj\\x9b2J\\u2066.pkl"


def _same_size_pair():
    bad = EVIL
    good = BENIGN[:0] + b"\x80\x02X" + (len(bad) - 8).to_bytes(4, "little") + b"A" * (len(bad) - 8) + b"."
    assert len(good) == len(bad)
    return good, bad


@pytest.mark.slow
def test_in_place_rewrite_with_mtime_put_back_is_rescanned(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    state = _state(tmp_path)
    good, bad = _same_size_pair()
    f = root / "model.pkl"
    f.write_bytes(good)
    first = cli("run", "--once", "--root", str(root), "--state-dir", state)
    assert first.returncode == 0 and [e["event"] for e in events(first.stdout) if e.get("path") == str(f)] == ["scan.clean"]
    unchanged = cli("run", "--once", "--root", str(root), "--state-dir", state)  # restart: nothing rescanned
    assert not [e for e in events(unchanged.stdout) if e["event"].startswith("scan.") and e["event"] != "scan.cached"]
    st = os.stat(f)
    with open(f, "r+b") as fh:
        fh.write(bad)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(f).st_size, os.stat(f).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = cli("run", "--once", "--root", str(root), "--state-dir", state)
    assert second.returncode == 1
    assert [e["event"] for e in events(second.stdout) if e.get("path") == str(f) and e["event"].startswith("scan.")] == ["scan.finding"]


def test_baseline_without_ctime_column_is_rebuilt(tmp_path):
    import sqlite3

    root = tmp_path / "r"
    root.mkdir()
    state = _state(tmp_path)
    f = root / "model.pkl"
    f.write_bytes(EVIL)
    st = os.stat(f)
    db = sqlite3.connect(os.path.join(state, "baseline.sqlite3"))
    db.execute("CREATE TABLE files (dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns "
               "INTEGER NOT NULL, path BLOB NOT NULL, sha256 TEXT, verdict TEXT NOT NULL, severity TEXT, rule_ids "
               "TEXT, fingerprint TEXT NOT NULL, scanned_at REAL NOT NULL, PRIMARY KEY (dev, ino))")
    db.execute("INSERT INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?)", (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
               os.fsencode(str(f)), "0" * 64, "clean", None, "[]", "x", 0.0))
    db.commit()
    db.close()
    out = cli("run", "--once", "--root", str(root), "--state-dir", state)
    assert out.returncode == 1, out.stderr
    assert [e["event"] for e in events(out.stdout) if e.get("path") == str(f) and e["event"].startswith("scan.")] == ["scan.finding"]


def test_state_dir_writable_by_others_or_with_planted_symlink_is_refused(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "ok.pkl").write_bytes(BENIGN)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    out = cli("run", "--once", "--root", str(root), "--state-dir", str(shared))
    assert out.returncode == 78 and "group/other-writable" in out.stderr
    assert os.listdir(shared) == [] and stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    planted = tmp_path / "planted"
    os.mkdir(planted, 0o700)
    target = tmp_path / "target"
    os.symlink(target, planted / "baseline.sqlite3")
    out = cli("run", "--once", "--root", str(root), "--state-dir", str(planted))
    assert out.returncode == 78 and "not a regular file" in out.stderr
    assert not os.path.exists(target)
    os.unlink(planted / "baseline.sqlite3")
    os.symlink(target, planted / "baseline.sqlite3-wal")
    assert cli("run", "--once", "--root", str(root), "--state-dir", str(planted)).returncode == 78
    assert not os.path.exists(target)


def test_fresh_baseline_and_wal_are_private_under_a_loose_umask(tmp_path):
    import subprocess
    import sys

    from tests.modelscand.test_cli import REPO

    root = tmp_path / "r"
    root.mkdir()
    (root / "ok.pkl").write_bytes(BENIGN)
    state = tmp_path / "fresh"
    code = ("import os, sys; os.umask(0o022); from modelscand.state import Baseline; b = Baseline(sys.argv[1], 'f'); "
            "b.set_meta(x=1); print(sorted(os.listdir(sys.argv[1]))); "
            "print({n: oct(os.stat(os.path.join(sys.argv[1], n)).st_mode & 0o777) for n in os.listdir(sys.argv[1])})")
    out = subprocess.run([sys.executable, "-c", code, str(state)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    modes = eval(out.stdout.splitlines()[1])
    assert "baseline.sqlite3-wal" in modes and set(modes.values()) == {"0o600"}, modes
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    res = subprocess.run([sys.executable, "-m", "modelscand.cli", "run", "--once", "--root", str(root), "--state-dir",
                          str(state)], capture_output=True, text=True, cwd=REPO, preexec_fn=lambda: os.umask(0o022))
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(os.stat(state / "baseline.sqlite3").st_mode) == 0o600


def test_directory_swapped_for_a_symlink_out_of_the_root_is_an_error_never_a_read(tmp_path):
    from modelscan_core.settings import Settings

    from modelscand.workers import ScanJob, scan_job

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.pkl").write_bytes(EVIL)
    decoy = root / "d" / "secret.pkl"
    decoy.write_bytes(BENIGN)
    scanned = []
    ok = scan_job(ScanJob(str(decoy), str(root), (decoy.stat().st_dev, decoy.stat().st_ino), "secret.pkl"),
                  Settings(), scanned.append)
    assert ok["status"] == "ok" and scanned[0]["result"]["findings"] == [] and ok["sha256"]
    os.rename(root / "d", root / "d.old")
    os.symlink(outside, root / "d")  # the path now resolves to the outside file
    st = os.stat(decoy)
    for inode in ((st.st_dev, st.st_ino), None):
        scanned = []
        r = scan_job(ScanJob(str(decoy), str(root), inode, "secret.pkl"), Settings(), scanned.append)
        assert r["status"] == "escape" and "escapes the watched root" in r["error"] and "sha256" not in r
        assert scanned == []  # nothing was read


def test_swapped_parent_directory_leading_out_of_the_root_is_a_warning_and_a_verdict_for_the_target(
        running, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.pkl").write_bytes(EVIL)
    (root / "d").mkdir()
    with running(str(root)) as h:
        d = root / "d"
        os.rename(d, root / "d.old")
        os.symlink(outside, d)
        h.daemon.offer(str(d / "secret.pkl"), "renamed", h.daemon.roots.get(str(root)))  # the late event
        warn = h.wait_event("link.outside_roots", path=str(d / "secret.pkl"))
        assert warn["level"] == "warning" and warn["target"] == str(outside / "secret.pkl")
        ev = h.wait_scan(str(outside / "secret.pkl"))  # read through a verified fd, never via the link
        assert ev["event"] == "scan.finding" and ev["via"] == str(d / "secret.pkl") and ev["outside_roots"] is True


@pytest.mark.slow
def test_stale_temp_named_files_are_scanned_by_the_reconciliation_walk(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    stale = ["tmp_model.pkl", "weights.pt.part", "model-partial", "resnet.incomplete", ".#model.pkl",
             "pytorch_model.bin.crdownload", ".cache.tmp"]
    for n in stale + ["fresh.incomplete"]:
        (root / n).write_bytes(EVIL)
    for n in stale:
        os.utime(root / n, (1, 1))
    out = cli("run", "--once", "--root", str(root), "--state-dir", _state(tmp_path))
    assert out.returncode == 1, out.stderr
    seen = {os.path.basename(e["path"]): e for e in events(out.stdout) if e["event"].startswith("scan.")}
    assert set(seen) == set(stale)  # the fresh download is left alone
    for n in stale:
        assert seen[n]["event"] == "scan.finding" and seen[n]["reason"] == "stale_temp"
        assert seen[n]["temp"]["status"] == "stale" and seen[n]["temp"]["writer"]
    cfg = tmp_path / "c.toml"
    cfg.write_text("[watch]\nstale_temp_after = 0\n")
    off = cli("run", "--once", "--config", str(cfg), "--root", str(root), "--state-dir", _state(tmp_path, "s2"))
    assert off.returncode == 0 and not [e for e in events(off.stdout) if e["event"].startswith("scan.")]


@pytest.mark.slow
def test_file_held_open_for_writing_is_scanned_after_a_bounded_wait_with_a_warning(running, root):
    with running(str(root), watch__busy_max_wait=1.5) as h:
        p = root / "model.pkl"
        with open(p, "wb") as held:
            held.write(EVIL)
            held.flush()
            os.fsync(held.fileno())
            os.utime(p)  # an event while the fd stays open
            with open(p, "rb"):
                pass  # a reader's close: a Closed event while the writer still holds it
            ev = h.wait_scan(str(p), timeout=30)
            assert ev["event"] == "scan.finding"
            warn = h.wait_event("scan.deferred", path=str(p))
            assert warn["level"] == "warning" and warn["waited_s"] >= 1.0


def test_run_once_does_not_wait_for_a_writer_that_never_closes(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    p = root / "model.pkl"
    with open(p, "wb") as held:
        held.write(EVIL)
        held.flush()
        out = cli("run", "--once", "--root", str(root), "--state-dir", _state(tmp_path), timeout=60)
    evs = events(out.stdout)
    assert out.returncode == 1, out.stderr
    assert [e["level"] for e in evs if e["event"] == "scan.deferred" and e["path"] == str(p)] == ["warning"]
    assert [e["event"] for e in evs if e["event"].startswith("scan.") and e["event"] != "scan.deferred"] == ["scan.finding"]


@pytest.mark.slow
def test_in_place_rewrite_through_an_fd_kept_open_is_scanned_after_the_bounded_wait(running, root):
    p = root / "model.pkl"
    good = b"\x80\x02X" + (len(EVIL) - 8).to_bytes(4, "little") + b"A" * (len(EVIL) - 8) + b"."
    with running(str(root), watch__busy_max_wait=1.5) as h:
        p.write_bytes(good)
        assert h.wait_scan(str(p), timeout=30)["event"] == "scan.clean"
        with open(p, "r+b") as held:  # no Closed event until the end of the test: only Modified
            held.write(EVIL)
            held.flush()
            warn = h.wait_event("scan.deferred", timeout=30, path=str(p))
            assert warn["level"] == "warning"
            h.wait_for(lambda h: [e for e in h.scans(str(p)) if e["event"] == "scan.finding"], timeout=30,
                       what="the rewritten bytes scanned")
