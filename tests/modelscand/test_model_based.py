"""The daemon's guarantee, checked against a model of the filesystem (hypothesis stateful).

A real `modelscand run` process watches a real root on a real inotify watch. Hypothesis
drives random sequences of what writers and operators do: create (written in place,
through a temp name and a rename, or appended per chunk), append, rewrite in place, rename
a file, rename a directory, rename over an existing file, hard link, swap a directory for
a symlink, delete, rename the root away and recreate it, restart the daemon (SIGTERM) and
kill it (SIGKILL, a real kill -9 of the subprocess). The model knows each path's bytes and
whether they are malicious.

After quiescence (the `check` rule, and at the end of every example) the invariant of
shared/spec/daemon.md must hold for every regular file under the root:

- its latest verdict event names its inode and the sha256 of its current bytes, and says
  what those bytes are: ``scan.finding`` for malicious, ``scan.clean`` for benign;
- no identity (dev, ino, size, mtime, ctime) has two verdicts, except across a kill -9
  (the verdict is logged before its baseline row is written, so a kill between the two
  rescans that file once);
and for every ``scan.clean`` ever logged: its sha256 is that of benign bytes the model
wrote whole (never a prefix, never a malicious file).

Budget: ``MODELSCAND_MODEL_EXAMPLES`` examples (default 12, a couple of minutes) of at
most ``MODELSCAND_MODEL_STEPS`` steps (default 12). Run it longer locally with e.g.
``MODELSCAND_MODEL_EXAMPLES=300 python -m pytest tests/modelscand/test_model_based.py``; a failure
is reported unshrunk unless ``MODELSCAND_MODEL_SHRINK=1`` (shrinking replays daemon sessions).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("MODELSCAND_MODEL_EXAMPLES", "12"))
STEPS = int(os.environ.get("MODELSCAND_MODEL_STEPS", "12"))
VERDICTS = ("scan.clean", "scan.finding", "scan.error", "scan.incomplete", "scan.skipped")


class _Call:
    """Never loaded: only pickled. Loading it would run `echo <word>`."""

    def __init__(self, word: str):
        self.word = word

    def __reduce__(self):
        return (os.system, (f"echo {self.word}",))


#: pieces a file is made of: (bytes, malicious). Each is a whole pickle; a file of several
#: is a pickle stream, malicious if any piece is
PIECES = [(pickle.dumps({"weights": [float(i)] * (i + 1), "name": f"m{i}"}, protocol=2 + i % 4), False)
          for i in range(5)] + [(pickle.dumps(_Call(f"w{i}"), protocol=2 + i % 4), True) for i in range(3)]

NAMES = st.sampled_from(["a.pkl", "b.bin", "c.pt", "d.pkl", "e.joblib"])
DIRS = st.sampled_from(["x", "y", "x/z"])


#: `modelscand run --config C --root R --state-dir S`, with scans that take 0-80 ms (the
#: scan_function seam): renames, swaps and deletes then often land while a file is in flight
LAUNCH = """
import sys
from modelscand import config, logging
from modelscand.daemon import Daemon
cfg = config.load(sys.argv[1]).with_overrides(roots=[sys.argv[2]], state_dir=sys.argv[3])
logging.configure(cfg.data["log"]["format"], cfg.data["log"]["level"])
sys.exit(Daemon(cfg, scan_function="tests.modelscand.hooks:jitter").run())
"""


class Daemon:
    """The daemon as a subprocess (so kill -9 is real); its JSON log lines, stamped on arrival."""

    def __init__(self, root: str, state: str, conf: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, conf, root, state],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        self.events: list[tuple[float, dict]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(60):
            self.kill()
            raise AssertionError("the daemon never became ready")

    def _read(self) -> None:
        for line in self.proc.stdout:
            if not line.startswith("{"):
                continue
            ev = json.loads(line)
            with self.lock:
                self.events.append((time.monotonic(), ev))
            if ev["event"] == "daemon.ready":
                self.ready.set()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        time.sleep(0.1)
        assert code == 0, (code, "".join(self.stderr)[-3000:], [e["event"] for _, e in self.events[-15:]])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


class FilesystemModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="modelscand-model-")
        self.root = os.path.join(self.tmp, "root")
        self.state = os.path.join(self.tmp, "state")
        os.makedirs(self.root)
        os.makedirs(self.state, mode=0o700)
        self.conf = os.path.join(self.tmp, "c.toml")
        with open(self.conf, "w") as f:
            f.write("[watch]\nconventions = false\nreconcile_interval = 0\nroot_retry_interval = 0.2\n"
                    "settle_time = 0.1\nbusy_recheck = 0.3\n[scan]\nworkers = 2\ntimeout = 20.0\n"
                    "[log]\nlevel = \"debug\"\n")
        self.files: dict[str, int] = {}  # relative path -> node (hard links share one)
        self.nodes: dict[int, tuple[bytes, bool]] = {}  # node -> (bytes, malicious)
        self.benign: set[str] = set()  # sha256 of every benign content written whole
        self.kills: list[float] = []
        self.old_events: list[tuple[float, dict]] = []
        self.daemon = Daemon(self.root, self.state, self.conf)
        self.counter = 0

    # ------------------------------------------------------------------ helpers
    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _content(self, pieces: list[int]) -> tuple[bytes, bool]:
        data = b"".join(PIECES[i][0] for i in pieces)
        return data, any(PIECES[i][1] for i in pieces)

    def _remember(self, rel: str, data: bytes, bad: bool) -> None:
        if rel not in self.files:
            self.counter += 1
            self.files[rel] = self.counter
        self.nodes[self.files[rel]] = (data, bad)
        if not bad:
            self.benign.add(hashlib.sha256(data).hexdigest())

    def _fresh(self, name: str) -> str:
        self.counter += 1
        base, ext = os.path.splitext(name)
        return f"{base}{self.counter}{ext}"

    def _blocked(self, rel_dir: str) -> bool:
        """A symlink (or a file) on the way: the model keeps files at their real paths only."""
        p = self.root
        for part in rel_dir.split("/"):
            p = os.path.join(p, part)
            if os.path.islink(p) or (os.path.lexists(p) and not os.path.isdir(p)):
                return True
        return False

    def _dirs(self) -> list[str]:
        out = []
        for dirpath, dirnames, _ in os.walk(self.root):
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if not os.path.islink(p):
                    out.append(os.path.relpath(p, self.root))
        return sorted(out)

    def _events(self) -> list[tuple[float, dict]]:
        with self.daemon.lock:
            return self.old_events + list(self.daemon.events)

    # ------------------------------------------------------------------ writers
    @rule(d=DIRS, name=NAMES, pieces=st.lists(st.integers(0, len(PIECES) - 1), min_size=1, max_size=3),
          how=st.sampled_from(["direct", "temp_rename", "chunked"]))
    def create(self, d, name, pieces, how):
        rel = os.path.join(d, self._fresh(name))
        path = self._abs(rel)
        if self._blocked(d):
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data, bad = self._content(pieces)
        if how == "direct":
            with open(path, "wb") as f:
                f.write(data)
        elif how == "temp_rename":  # torch.hub: <dst>.<32hex>.partial, then a rename
            tmp = f"{path}.{os.urandom(16).hex()}.partial"
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, path)
        else:  # reopen and append per chunk
            for i in range(0, len(data), 17):
                with open(path, "ab") as f:
                    f.write(data[i:i + 17])
                time.sleep(0.01)
        self._remember(rel, data, bad)

    @precondition(lambda self: self.files)
    @rule(data=st.data(), piece=st.integers(0, len(PIECES) - 1))
    def append(self, data, piece):
        rel = data.draw(st.sampled_from(sorted(self.files)))
        old, bad = self.nodes[self.files[rel]]
        with open(self._abs(rel), "ab") as f:
            f.write(PIECES[piece][0])
        self._remember(rel, old + PIECES[piece][0], bad or PIECES[piece][1])

    @precondition(lambda self: self.files)
    @rule(data=st.data(), pieces=st.lists(st.integers(0, len(PIECES) - 1), min_size=1, max_size=2))
    def rewrite_in_place(self, data, pieces):
        rel = data.draw(st.sampled_from(sorted(self.files)))
        content, bad = self._content(pieces)
        with open(self._abs(rel), "r+b") as f:
            f.write(content)
            f.truncate()
        self._remember(rel, content, bad)

    @precondition(lambda self: self.files)
    @rule(data=st.data(), d=DIRS)
    def rename_file(self, data, d):
        rel = data.draw(st.sampled_from(sorted(self.files)))
        new = os.path.join(d, self._fresh(os.path.basename(rel)))
        if self._blocked(d) or not os.path.isdir(self._abs(d)):
            return
        os.rename(self._abs(rel), self._abs(new))
        self.files[new] = self.files.pop(rel)

    @precondition(lambda self: len(self.files) >= 2)
    @rule(data=st.data())
    def rename_over_existing(self, data):
        a, b = data.draw(st.lists(st.sampled_from(sorted(self.files)), min_size=2, max_size=2, unique=True))
        os.rename(self._abs(a), self._abs(b))
        if self.files[a] != self.files[b]:  # two names of one inode: rename(2) leaves both
            self.files[b] = self.files.pop(a)

    @precondition(lambda self: self.files)
    @rule(data=st.data())
    def hard_link(self, data):
        rel = data.draw(st.sampled_from(sorted(self.files)))
        new = os.path.join(os.path.dirname(rel), self._fresh(os.path.basename(rel)))
        os.link(self._abs(rel), self._abs(new))
        self.files[new] = self.files[rel]  # one node: a later write through one name shows through both

    @precondition(lambda self: self.files)
    @rule(data=st.data())
    def delete(self, data):
        rel = data.draw(st.sampled_from(sorted(self.files)))
        os.unlink(self._abs(rel))
        del self.files[rel]

    @rule(data=st.data())
    def rename_dir(self, data):
        dirs = self._dirs()
        if not dirs:
            return
        d = data.draw(st.sampled_from(dirs))
        new = os.path.join(os.path.dirname(d), self._fresh("dir"))
        os.rename(self._abs(d), self._abs(new))
        self._move_prefix(d, new)

    @rule(data=st.data())
    def swap_dir_for_symlink(self, data):
        dirs = self._dirs()
        if not dirs:
            return
        d = data.draw(st.sampled_from(dirs))
        real = os.path.join(os.path.dirname(d), self._fresh("real"))
        os.rename(self._abs(d), self._abs(real))
        os.symlink(os.path.basename(real), self._abs(d))  # the old path now leads through a link
        self._move_prefix(d, real)

    def _move_prefix(self, old: str, new: str) -> None:
        for rel in [r for r in self.files if r.startswith(old + "/")]:
            self.files[new + rel[len(old):]] = self.files.pop(rel)

    @rule()
    def rename_root_away_and_recreate(self):
        os.rename(self.root, os.path.join(self.tmp, self._fresh("root.old")))
        os.mkdir(self.root)
        self.files.clear()

    # ------------------------------------------------------------------ the daemon
    @rule()
    def restart(self):
        self.daemon.stop()
        self.old_events += self.daemon.events
        self.daemon = Daemon(self.root, self.state, self.conf)

    @rule()
    def kill_9(self):
        self.daemon.kill()
        self.kills.append(time.monotonic())
        self.old_events += self.daemon.events
        self.daemon = Daemon(self.root, self.state, self.conf)

    # ------------------------------------------------------------------ the invariant
    @rule()
    def check(self):
        self._check()

    def teardown(self):
        try:
            self._check()
        finally:
            self.daemon.kill()
            shutil.rmtree(self.tmp, ignore_errors=True)

    @invariant()
    def daemon_alive(self):
        assert self.daemon.proc.poll() is None, "the daemon died"

    def _current(self) -> dict[str, tuple[os.stat_result, str, bool]]:
        """Every regular file under the root (links not followed): stat, sha256, malicious."""
        out = {}
        for dirpath, _dirs, names in os.walk(self.root):
            for n in names:
                p = os.path.join(dirpath, n)
                st_ = os.lstat(p)
                if not os.path.isfile(p) or os.path.islink(p):
                    continue
                rel = os.path.relpath(p, self.root)
                data = Path(p).read_bytes()
                model = self.nodes.get(self.files.get(rel, -1))
                assert model is not None and model[0] == data, f"the model lost track of {rel}"
                out[rel] = (st_, hashlib.sha256(data).hexdigest(), model[1])
        return out

    def _check(self) -> None:
        files = self._current()
        deadline = time.monotonic() + 30
        while True:
            bad = self._violations(files)
            if not bad or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not bad, "\n".join(bad[:10])
        time.sleep(0.3)  # anything still coming would be a second verdict
        bad = self._violations(files) + self._duplicates(files) + self._clean_only_for_whole_benign()
        assert not bad, "\n".join(bad[:10])

    def _violations(self, files) -> list[str]:
        latest: dict[tuple[int, int], dict] = {}
        for _, ev in self._events():
            if ev["event"] in VERDICTS:
                latest[tuple(ev["inode"])] = ev
        out = []
        for rel, (st_, sha, bad) in files.items():
            ev = latest.get((st_.st_dev, st_.st_ino))
            want = "scan.finding" if bad else "scan.clean"
            if ev is None or ev.get("sha256") != sha or ev["event"] != want:
                out.append(f"{rel}: want {want} for sha256 {sha[:12]}, latest verdict for its inode: "
                           f"{None if ev is None else (ev['event'], ev.get('path'), (ev.get('sha256') or '')[:12])}")
        return out

    def _duplicates(self, files) -> list[str]:
        out = []
        for rel, (st_, _sha, _bad) in files.items():
            ident = [st_.st_dev, st_.st_ino, st_.st_size, st_.st_mtime_ns, st_.st_ctime_ns]
            times = [t for t, ev in self._events() if ev["event"] in VERDICTS
                     and ev["inode"] + [ev["size"], ev["mtime_ns"], ev["ctime_ns"]] == ident]
            allowed = 1 + sum(1 for k in self.kills if times and k > times[0])
            if len(times) > allowed:
                out.append(f"{rel}: {len(times)} verdicts for one identity")
        return out

    def _clean_only_for_whole_benign(self) -> list[str]:
        return [f"clean for bytes never written whole as benign: {ev['path']} {ev.get('sha256')}"
                for _, ev in self._events() if ev["event"] == "scan.clean" and ev.get("sha256") not in self.benign]


#: shrinking replays whole daemon sessions and can take longer than CI has: on request only
PHASES = list(Phase) if os.environ.get("MODELSCAND_MODEL_SHRINK") else [Phase.explicit, Phase.reuse, Phase.generate]
FilesystemModel.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, phases=PHASES,
    suppress_health_check=list(HealthCheck))
test_the_daemon_misses_nothing = FilesystemModel.TestCase
