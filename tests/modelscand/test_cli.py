"""The command line as a user (and systemd) runs it: subprocesses, stdout, exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelscand import config as cfgmod
from modelscand.queue import Candidate, Rescan, WorkQueue
from modelscand.writers import is_temp
from tests.modelscand.conftest import BENIGN, EVIL

REPO = Path(__file__).resolve().parents[2]


def cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "modelscand.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_shipped_config_equals_builtin_defaults():
    cfg = cfgmod.load(str(REPO / "config" / "modelscand.toml"))
    assert cfg.data == cfgmod.defaults()


def test_run_once_scan_and_status(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "evil.pkl").write_bytes(EVIL)
    (root / "ok.pkl").write_bytes(BENIGN)
    state = str(tmp_path / "state")
    out = cli("run", "--root", str(root), "--state-dir", state, "--once")
    assert out.returncode == 1, out.stderr
    evs = events(out.stdout)
    assert [e["path"] for e in evs if e["event"] == "scan.finding"] == [str(root / "evil.pkl")]
    assert any(e["event"] == "daemon.ready" for e in evs)
    again = cli("scan", str(root), "--state-dir", state)  # same baseline: nothing rescanned
    assert again.returncode == 1
    assert not [e for e in events(again.stdout) if e["event"].startswith("scan.") and e["event"] != "scan.cached"]
    st = cli("status", "--state-dir", state, "--json")
    info = json.loads(st.stdout)
    assert st.returncode == 0 and info["files"] == {"clean": 1, "issues": 1} and info["running"] is False
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "ok.pkl").write_bytes(BENIGN)
    assert cli("scan", str(clean), "--state-dir", state).returncode == 0


def test_check_config_and_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[scan]\nmode = "panic"\n')
    out = cli("check-config", "--config", str(bad))
    assert out.returncode == 78 and "scan.mode" in out.stderr
    bad.write_text('[watch]\nrootz = []\n')
    assert cli("check-config", "--config", str(bad)).returncode == 78
    good = tmp_path / "good.toml"
    good.write_text(f'[watch]\nroots = ["{tmp_path}"]\nconventions = false\n')
    out = cli("check-config", "--config", str(good), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["roots"][0]["path"] == str(tmp_path)
    assert cli("status", "--state-dir", str(tmp_path / "none")).returncode == 3
    assert cli("frobnicate").returncode == 4


@pytest.mark.slow
def test_sd_notify_ready_reload_watchdog_and_clean_stop(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="2000000")
    proc = subprocess.Popen([sys.executable, "-m", "modelscand.cli", "run", "--root", str(root), "--state-dir",
                             str(tmp_path / "state")], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    env_pid = proc.pid  # WATCHDOG_PID unset: any pid accepted

    def until(prefix, contains=""):
        deadline = time.monotonic() + 30  # WATCHDOG=1 arrives every second: the socket never times out
        seen = []
        while time.monotonic() < deadline:
            msg = sock.recv(4096).decode()
            seen.append(msg)
            if any(line.startswith(prefix) and contains in line for line in msg.splitlines()):
                return msg
        raise AssertionError(f"no {prefix}{contains} from the daemon in 30 s; got {seen[-5:]}")

    try:
        assert "READY=1" in until("READY=1")
        assert until("WATCHDOG=1")
        (root / "late.pkl").write_bytes(EVIL)
        proc.send_signal(signal.SIGHUP)
        assert "MONOTONIC_USEC=" in until("RELOADING=1")
        until("READY=1")
        until("STATUS=", "findings 1")  # the file written before the reload is scanned
        proc.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    assert proc.returncode == 0 and env_pid
    evs = events(out)
    assert any(e["event"] == "scan.finding" and e["path"] == str(root / "late.pkl") for e in evs)
    assert evs[-1]["event"] == "daemon.stop" and evs[-1]["drained"] is True


def test_queue_is_bounded_deduplicates_and_degrades_to_rescan():
    q = WorkQueue(maxsize=16)
    for _ in range(3):
        assert q.offer(Candidate("/r/a", (1, 1), "created", "/r"))
    q.offer(Candidate("/r/a", (1, 1), "renamed", "/r"))
    assert len(q) == 1
    for i in range(2, 40):
        q.offer(Candidate(f"/r/{i}", (1, i), "created", "/r"))
    assert len(q) == 16 and q.dropped == 23
    first = q.get(0)
    assert isinstance(first, Rescan) and first.root == "/r" and first.why == "queue_full"
    assert q.get(0).reason == "renamed"


def test_writer_temp_names_are_data():
    for name in ("ab" * 20 + ".0a1b2c3d.incomplete", "x.incomplete", "tmp_1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed",
                 ".abc.0a1b2c3d.shared", "model.pth." + "f" * 32 + ".partial", "sha256-" + "a" * 64 + "-partial",
                 "sha256-" + "a" * 64 + "-partial-3", ".weights.tmp"):
        assert is_temp(name), name
    for name in ("pytorch_model.bin", "sha256-" + "a" * 64, "model.keras", "ab" * 20):
        assert not is_temp(name), name
