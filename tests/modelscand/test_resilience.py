"""What goes wrong in real life: overflow, late and symlinked roots, raising handlers,
crashing and hanging workers, restarts."""

from __future__ import annotations

import os
import threading

import pytest
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent

from tests.modelscand.conftest import BENIGN, EVIL


def test_simulated_overflow_triggers_root_rescan(running, root):
    with running(str(root)) as h:
        lost = threading.Event()
        lost.set()

        def drop_events(watch, event):  # the kernel queue overflowed: these events never arrive
            if lost.is_set():
                raise _Dropped()

        h.daemon.handler_hook = drop_events
        for w in h.daemon.watches.values():
            w._on_handler_error = lambda *a: None  # dropped silently, as the kernel would
        for i in range(20):
            (root / f"lost{i}.pkl").write_bytes(EVIL if i == 7 else BENIGN)
        lost.clear()
        # what the kernel sends: IN_Q_OVERFLOW (wd -1) -> watchdog only *logs* it
        watch = next(iter(h.daemon.watches.values()))
        watch.observer._inotify_fd.handle_event(InotifyEvent(-1, InotifyConstants.IN_Q_OVERFLOW, 0, b""))
        ev = h.wait_event("watch.overflow", root=str(root))
        assert ev["answer"] == "root rescan"
        h.wait_for(lambda h: len(h.scans()) == 20, 20, "20 verdicts after the rescan")
        assert any(e["event"] == "reconcile.done" and e["why"] == "overflow" for e in h.events)
        assert len([e for e in h.scans() if e["event"] == "scan.finding"]) == 1


def test_an_overflow_report_that_fails_is_an_error_line_and_the_reader_lives(running, root):
    with running(str(root)) as h:
        watch = next(iter(h.daemon.watches.values()))

        def broken(_root):
            raise RuntimeError("overflow report bug")

        watch._on_overflow = broken
        watch.observer._inotify_fd.handle_event(InotifyEvent(-1, InotifyConstants.IN_Q_OVERFLOW, 0, b""))
        err = h.wait_event("watch.report_failed")
        assert err["level"] == "error" and err["report"] == "overflow" and "overflow report bug" in err["error"]
        (root / "after.pkl").write_bytes(EVIL)  # watchdog's reader thread is still alive
        assert h.wait_scan(str(root / "after.pkl"))["event"] == "scan.finding"


class _Dropped(Exception):
    pass


def test_root_that_appears_late(running, tmp_path):
    late = tmp_path / "not-yet"
    with running(str(late)) as h:
        h.wait_event("watch.root_missing")
        late.mkdir()
        (late / "early.pkl").write_bytes(EVIL)  # written before the watch exists: found by the walk
        h.wait_event("watch.root_appeared")
        h.wait_scan(str(late / "early.pkl"))
        (late / "later.pkl").write_bytes(BENIGN)  # and now it is watched
        assert h.wait_scan(str(late / "later.pkl"))["event"] == "scan.clean"


def test_symlinked_root_sees_new_subdirectories(running, tmp_path):
    real = tmp_path / "nvme" / "huggingface"
    real.mkdir(parents=True)
    link = tmp_path / "cache-link"
    os.symlink(real, link)
    with running(str(link)) as h:
        start = h.wait_event("watch.start")
        assert start["root"] == str(real) and start["symlinked"] is True
        d = link / "models--a--b" / "blobs"
        d.mkdir(parents=True)
        (d / "deadbeef").write_bytes(EVIL)
        ev = h.wait_scan(str(real / "models--a--b" / "blobs" / "deadbeef"))
        assert ev["event"] == "scan.finding"


def test_handler_that_raises_is_logged_and_nothing_is_lost(running, root):
    with running(str(root)) as h:
        def boom(watch, event):
            if "boom" in os.fsdecode(event.src_path) + os.fsdecode(getattr(event, "dest_path", "") or ""):
                raise RuntimeError("handler bug")

        h.daemon.handler_hook = boom
        (root / "boom.pkl").write_bytes(EVIL)
        err = h.wait_event("watch.handler_error")
        assert "handler bug" in err["error"]
        h.wait_scan(str(root / "boom.pkl"))  # the rescan found it anyway
        (root / "after.pkl").write_bytes(BENIGN)  # and the dispatcher thread is still alive
        assert h.wait_scan(str(root / "after.pkl"))["event"] == "scan.clean"


def test_restart_over_unchanged_tree_rescans_nothing(running, root, tmp_path):
    for i in range(30):
        (root / f"m{i}.pkl").write_bytes(EVIL if i == 0 else BENIGN)
    state = str(tmp_path / "state")
    with running(str(root), state=state) as h:
        h.wait_for(lambda h: len(h.scans()) == 30, 20, "30 verdicts")
        h.settle()
        rows = len(h.daemon.baseline.all_rows())
    n_before = len(h.events)
    with running(str(root), state=state) as h2:
        h2.settle()
        assert h2.events[n_before:] and not [e for e in h2.events[n_before:] if e["event"].startswith("scan.")]
        done = [e for e in h2.events[n_before:] if e["event"] == "reconcile.done"][0]
        assert done["files"] == 30 and done["queued"] == 0
        assert len(h2.daemon.baseline.all_rows()) == rows == 30


@pytest.mark.slow
def test_worker_crash_and_hang_are_error_verdicts_and_daemon_lives(running, root):
    with running(str(root), scan_function="tests.modelscand.hooks:crash_or_hang", scan__timeout=1.5) as h:
        (root / "crash.pkl").write_bytes(BENIGN)
        ev = h.wait_scan(str(root / "crash.pkl"))
        assert ev["event"] == "scan.error" and "crashed" in ev["error"] and "SIGSEGV" in ev["error"]
        (root / "hang.pkl").write_bytes(BENIGN)
        ev = h.wait_scan(str(root / "hang.pkl"), timeout=15)
        assert ev["event"] == "scan.error" and "timed out" in ev["error"]
        (root / "fine.pkl").write_bytes(EVIL)
        assert h.wait_scan(str(root / "fine.pkl"))["event"] == "scan.finding"
        rows = {r.path: r.verdict for r in h.daemon.baseline.all_rows()}
        assert rows[str(root / "crash.pkl")] == "error" and rows[str(root / "hang.pkl")] == "error"


def test_remote_code_and_torch_hub_trees_are_reported_as_code(running, tmp_path):
    modules = tmp_path / "huggingface" / "modules"
    tm = modules / "transformers_modules" / "org" / "model" / "abc123"
    tm.mkdir(parents=True)
    hub = tmp_path / "torch" / "hub" / "owner_repo_main"
    hub.mkdir(parents=True)
    with running([str(modules), str(tmp_path / "torch" / "hub")], scan__code_severity="high") as h:
        (tm / "modeling_evil.py").write_text("import os\n")
        (hub / "hubconf.py").write_text("dependencies = []\n")
        (hub / "helper.py").write_text("x = 1\n")
        for p, rule in ((tm / "modeling_evil.py", "MODELSCAND_REMOTE_CODE"),
                        (hub / "hubconf.py", "MODELSCAND_TORCH_HUB_CODE"),
                        (hub / "helper.py", "MODELSCAND_TORCH_HUB_CODE")):
            ev = h.wait_scan(str(p))
            assert ev["event"] == "scan.finding" and ev["rule_ids"] == [rule] and ev["severity"] == "high"
