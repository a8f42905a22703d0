"""Fixtures for modelscand: a real daemon on temp directories, with its log captured.

`running(root, **overrides)` starts an in-process Daemon (real watchdog, real worker
processes) and yields a `Harness` whose `.events` are the structlog events a user would
see on stdout, already parsed. Waits poll with timeouts; nothing sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import threading
import time

import pytest

from modelscand import logging as mlog
from modelscand.config import Config, defaults
from modelscand.daemon import Daemon


class Evil:
    """Never loaded: only pickled. Loading it would run `echo hi`."""

    def __reduce__(self):
        return (os.system, ("echo hi",))


EVIL = pickle.dumps(Evil())
BENIGN = pickle.dumps({"weights": [1.0, 2.0, 3.0], "name": "tiny"})


def make_config(root: str | list[str], state: str, **overrides) -> Config:
    data = defaults()
    data["watch"].update(roots=[root] if isinstance(root, str) else list(root), conventions=False,
                         reconcile_interval=0, root_retry_interval=0.2, settle_time=0.1, busy_recheck=0.3)
    data["scan"].update(workers=1, timeout=5.0)
    data["state"]["dir"] = state
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        data[section][name] = value
    cfg = Config(data)
    cfg.validate()
    return cfg


class Harness:
    def __init__(self, daemon: Daemon, events: list, lock: threading.Lock):
        self.daemon = daemon
        self._events = events
        self._lock = lock

    @property
    def events(self) -> list[dict]:
        with self._lock:
            return list(self._events)

    def named(self, prefix: str) -> list[dict]:
        return [e for e in self.events if e["event"].startswith(prefix)]

    def scans(self, path: str | None = None) -> list[dict]:
        out = [e for e in self.events if e["event"] in ("scan.clean", "scan.finding", "scan.error",
                                                         "scan.incomplete", "scan.skipped")]
        if path is not None:
            out = [e for e in out if e.get("path") == os.path.realpath(path) or e.get("path") == path]
        return out

    def wait_for(self, pred, timeout: float = 10.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = pred(self)
            if found:
                return found
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; events: "
                             f"{[(e['event'], e.get('path')) for e in self.events][-40:]}")

    def wait_scan(self, path: str, timeout: float = 10.0) -> dict:
        return self.wait_for(lambda h: h.scans(path)[-1] if h.scans(path) else None, timeout,
                             f"a verdict for {path}")

    def wait_event(self, name: str, timeout: float = 10.0, **match) -> dict:
        def find(h):
            for e in h.events:
                if e["event"] == name and all(e.get(k) == v for k, v in match.items()):
                    return e
            return None

        return self.wait_for(find, timeout, f"{name} {match}")

    def settle(self, timeout: float = 10.0) -> None:
        assert self.daemon.wait_idle(timeout), "daemon did not become idle"


@pytest.fixture
def capture():
    events: list[dict] = []
    lock = threading.Lock()

    def sink(ev):
        with lock:
            events.append(ev)

    mlog.configure("json", "debug", stream=io.StringIO())
    mlog.add_sink(sink)
    yield events, lock
    mlog.remove_sink(sink)


@pytest.fixture
def running(capture, tmp_path):
    started: list[Daemon] = []
    events, lock = capture

    @contextlib.contextmanager
    def start(root, *, state=None, scan_function=None, watch=True, **overrides):
        cfg = make_config(root, state or str(tmp_path / "state"), **overrides)
        kwargs = {"scan_function": scan_function} if scan_function else {}
        d = Daemon(cfg, watch=watch, **kwargs)
        started.append(d)
        d.start()
        try:
            yield Harness(d, events, lock)
        finally:
            d.shutdown()
            started.remove(d)

    yield start
    for d in started:
        d.shutdown()


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r
