"""A real-sized Hugging Face cache: 20,000 files in 5,000 directories (slow).

The daemon must settle on it: reach READY, scan every blob once, then stay idle - no
overflow, no walk loop, at most 0.5% of a core over a minute (the bench prints the same
figures: bench/bench_daemon.py) - and still see a file that lands afterwards at once.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.bench_daemon import cpu_seconds, descendants, write_hf_cache
from tests.modelscand.conftest import EVIL

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
IDLE_S = 60.0


def test_a_large_hf_cache_settles_idles_and_still_sees_new_files(tmp_path):
    hub = tmp_path / "hub"
    dirs, files = write_hf_cache(str(hub))
    assert (dirs, files) == (5000, 20000)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    proc = subprocess.Popen([sys.executable, "-m", "modelscand.cli", "run", "--root", str(hub), "--state-dir",
                             str(state)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    events: list[tuple[float, dict]] = []
    threading.Thread(target=lambda: [events.append((time.monotonic(), json.loads(ln))) for ln in proc.stdout
                                     if ln.startswith("{")], daemon=True).start()

    def wait(pred, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for _, e in list(events) if pred(e)]
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last: {[e['event'] for _, e in events[-10:]]}")

    try:
        ready = wait(lambda e: e["event"] == "daemon.ready", 300, "READY")[0]
        assert ready["dirs"] == dirs + 1  # and the hub itself
        wait(lambda e: sum(1 for _, x in events if x["event"] == "scan.clean") >= 10000, 600, "10,000 verdicts")
        time.sleep(3)  # the last lines and sqlite settle
        n0 = len(events)
        pids = descendants(proc.pid)
        cpu0, t0 = cpu_seconds(pids), time.monotonic()
        time.sleep(IDLE_S)
        share = (cpu_seconds(pids) - cpu0) / (time.monotonic() - t0)
        idle_events = [e["event"] for _, e in events[n0:]]
        assert "watch.overflow" not in idle_events and "reconcile.start" not in idle_events, idle_events[:20]
        assert share <= 0.005, f"idle CPU {100 * share:.3f}% of a core"
        assert not [e for _, e in events if e["event"] == "watch.overflow"]

        # a download that lands now: HF's temp blob renamed to its etag, then its snapshot link
        repo = hub / "models--org1--model-00001"
        tmp = repo / "blobs" / ("f" * 64 + ".0a1b2c3d.incomplete")
        tmp.write_bytes(EVIL)
        landed = time.monotonic()
        os.rename(tmp, repo / "blobs" / ("f" * 64))
        blob = str(repo / "blobs" / ("f" * 64))
        ev = wait(lambda e: e["event"] == "scan.finding" and e["path"] == blob, 10, "the new blob's verdict")[0]
        took = next(t for t, e in events if e is ev) - landed
        assert took <= 1.0, took
        # and a file written in place (Keras): quiet period, lease probe, scan
        keras = hub / "models--org2--model-00002" / "blobs" / "model.keras.pkl"
        with open(keras, "wb") as f:
            f.write(pickle.dumps({"w": 1}))
        written = time.monotonic()
        ev = wait(lambda e: e["event"] == "scan.clean" and e["path"] == str(keras), 10, "the in-place write")[0]
        assert next(t for t, e in events if e is ev) - written <= 1.0
    finally:
        proc.terminate()
        proc.wait(60)
