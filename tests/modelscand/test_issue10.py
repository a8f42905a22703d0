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
import time

from tests.modelscand.conftest import BENIGN, EVIL
from tests.modelscand.test_cli import REPO, cli, events


def _state(tmp_path, name="state"):
    d = tmp_path / name
    d.mkdir(mode=0o700)
    return str(d)


def _verdicts(evs, path=None):
    out = [e for e in evs if e["event"] in ("scan.clean", "scan.finding", "scan.error", "scan.incomplete",
                                            "scan.skipped", "scan.cached")]
    return [e for e in out if path is None or e["path"] == str(path)]


# -- the one-shot commands ----------------------------------------------------------------

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
