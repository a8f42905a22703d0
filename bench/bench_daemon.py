"""Bench for modelscand (a script, not a test): runs the real CLI daemon and prints numbers.

  python bench/bench_daemon.py [--repos 1000] [--burst 5000] [--latency-files 100] [--idle 60]

1. start-up over a Hugging Face cache of --repos repos (1000: 20,000 files in 5,000
   directories; every blob scanned once), then idle CPU, RSS, overflows and walks over
   --idle s (target: at most 0.5% of a core, no overflow);
2. latency from file-complete (HF's rename of blobs/<etag>.<8hex>.incomplete to its etag) to
   its verdict in the log, 2 files/s, 1 KB..10 MB (targets: p50 <= 50 ms, p99 <= 250 ms);
3. a burst of --burst files into a brand-new directory tree: each scanned exactly once;
4. restart over the unchanged tree: nothing rescanned;
5. quarantine mode on a Hugging Face cache: rename of a malicious blob -> out of reach
   (bench_quarantine.py measures the mover, copies and `quarantine list` too).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import pickle
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

SCAN_EVENTS = {"scan.clean", "scan.finding", "scan.error", "scan.incomplete", "scan.skipped"}


class Daemon:
    def __init__(self, root: str, state: str, workers: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelscand.cli", "run", "--root", root, "--state-dir", state],
            stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.events: list[dict] = []
        self.by_path: collections.Counter = collections.Counter()
        self.scan_ts: dict[str, float] = {}
        self.lock = threading.Lock()
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.events.append(ev)
                if ev["event"] in SCAN_EVENTS:
                    self.by_path[ev["path"]] += 1
                    self.scan_ts[ev["path"]] = dt.datetime.fromisoformat(ev["ts"].replace("Z", "+00:00")).timestamp()
            if ev["event"] == "daemon.ready":
                self.ready.set()

    def scans(self) -> int:
        with self.lock:
            return sum(self.by_path.values())

    def wait_scans(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.scans() >= n:
                return True
            time.sleep(0.05)
        return False

    def processes(self) -> list[int]:
        return descendants(self.proc.pid)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (workers, forkserver), from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads), from /proc."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def write_hf_cache(hub: str, repos: int = 1000, blobs: int = 10) -> tuple[int, int]:
    """A Hugging Face hub cache as huggingface_hub lays it out: per repo the repo folder,
    blobs/, snapshots/, snapshots/<commit>/ and refs/ (5 directories), `blobs` blobs named by
    etag, a snapshot link per blob but one (an older revision's), refs/main. Returns
    (directories, files) - the default is 5,000 directories and 20,000 files."""
    dirs = files = 0
    for r in range(repos):
        repo = os.path.join(hub, f"models--org{r % 37}--model-{r:05d}")
        commit = f"{r:040x}"
        for d in ("blobs", os.path.join("snapshots", commit), "refs"):
            os.makedirs(os.path.join(repo, d), exist_ok=True)
        dirs += 5
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write(commit)
        files += 1
        for b in range(blobs):
            data = pickle.dumps({"repo": r, "blob": b, "w": [float(b)] * 8}, protocol=4)
            etag = f"{r:032x}{b:032x}"
            with open(os.path.join(repo, "blobs", etag), "wb") as f:
                f.write(data)
            files += 1
            if b:
                os.symlink(os.path.join("..", "..", "blobs", etag),
                           os.path.join(repo, "snapshots", commit, f"part-{b:02d}.bin"))
                files += 1
    return dirs, files


def write_tree(base: str, n: int, per_dir: int = 100) -> None:
    data = pickle.dumps({"w": list(range(16))})
    for i in range(n):
        d = os.path.join(base, f"d{i // per_dir:04d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"m{i:05d}.pkl"), "wb") as f:
            f.write(data)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repos", type=int, default=1000, help="HF repos: 20 files and 5 directories each")
    ap.add_argument("--burst", type=int, default=5000)
    ap.add_argument("--latency-files", type=int, default=100)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quarantine-files", type=int, default=20, help="0 = skip the quarantine latency")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="modelscand-bench-")
    root, state = os.path.join(tmp, "root"), os.path.join(tmp, "state")
    os.makedirs(root)
    results = {}
    try:
        n_dirs, n_files = write_hf_cache(os.path.join(root, "hub"), args.repos)
        blobs = args.repos * 10
        t0 = time.monotonic()
        d = Daemon(root, state, args.workers)
        assert d.ready.wait(300), "daemon never became ready"
        t_ready = time.monotonic() - t0
        ok = d.wait_scans(blobs, 1200)
        t_scan = time.monotonic() - t0
        results["startup_scan"] = (f"HF cache of {n_files} files in {n_dirs} dirs: READY in {t_ready:.1f}s, "
                                   f"{blobs} blobs scanned in {t_scan:.1f}s ({blobs / t_scan:.0f}/s), all={ok}")
        args.files = blobs
        time.sleep(3)  # let the last log lines and sqlite settle before measuring idle
        n_idle = len(d.events)

        # 1. idle CPU and RSS with --files watched files
        procs = d.processes()
        cpu_main0, cpu_all0 = cpu_seconds(procs[:1]), cpu_seconds(procs)
        rss = []
        t_idle = time.monotonic()
        while time.monotonic() - t_idle < args.idle:
            rss.append(rss_bytes(procs[0]))
            time.sleep(min(5, args.idle / 6))
        elapsed = time.monotonic() - t_idle
        cpu_main = cpu_seconds(procs[:1]) - cpu_main0
        cpu_all = cpu_seconds(procs) - cpu_all0
        workers_rss = sum(rss_bytes(p) for p in procs[1:])
        results["idle_cpu"] = (f"{100 * cpu_main / elapsed:.3f}% of a core (daemon), {100 * cpu_all / elapsed:.3f}% "
                               f"incl. workers, over {elapsed:.0f}s with {n_files} files in {n_dirs} dirs")
        idle_events = collections.Counter(e["event"] for e in d.events[n_idle:])
        results["idle_events"] = (f"{idle_events['watch.overflow']} overflows, {idle_events['reconcile.start']} walks, "
                                  f"{sum(idle_events.values())} log lines while idle")
        results["rss"] = (f"daemon {max(rss) / 2**20:.1f} MB max, drift {(rss[-1] - rss[0]) / 2**20:+.1f} MB; "
                          f"workers+forkserver {workers_rss / 2**20:.1f} MB total")

        # 2. latency: HF blob rename -> verdict, 2 files/s, up to 10 MB
        sizes = [1 << 10, 100 << 10, 1 << 20, 5 << 20, 10 << 20]
        renamed: dict[str, float] = {}
        for i in range(args.latency_files):
            size = sizes[i % len(sizes)]
            blobs_dir = os.path.join(root, "hub", sorted(os.listdir(os.path.join(root, "hub")))[i % args.repos],
                                     "blobs")
            final = os.path.join(blobs_dir, f"{i:064x}")
            tmpname = f"{final}.{os.urandom(4).hex()}.incomplete"
            with open(tmpname, "wb") as f:
                f.write(pickle.dumps(os.urandom(size - 64 if size > 64 else 1)))
            os.rename(tmpname, final)
            renamed[final] = time.time()
            time.sleep(0.5)
        before = args.files
        d.wait_scans(before + args.latency_files, 60)
        lats = sorted((d.scan_ts[p] - t) * 1000 for p, t in renamed.items() if p in d.scan_ts)
        p50 = statistics.median(lats)
        p99 = lats[min(len(lats) - 1, int(round(0.99 * (len(lats) - 1))))]
        results["latency"] = (f"n={len(lats)} p50={p50:.1f} ms p99={p99:.1f} ms max={lats[-1]:.1f} ms "
                              f"(1 KB..10 MB, HF blob rename -> verdict in the log; targets 50 / 250 ms)")

        # 3. burst into a brand-new tree
        before = d.scans()
        t_b = time.monotonic()
        write_tree(os.path.join(root, "burst", "new", "tree"), args.burst, per_dir=50)
        ok = d.wait_scans(before + args.burst, 600)
        t_burst = time.monotonic() - t_b
        time.sleep(2)
        with d.lock:
            burst_counts = {p: n for p, n in d.by_path.items() if "/burst/" in p}
        once = sum(1 for n in burst_counts.values() if n == 1)
        dup = sum(1 for n in burst_counts.values() if n > 1)
        results["burst"] = (f"{args.burst} files in new dirs: {len(burst_counts)} scanned, {once} exactly once, "
                            f"{dup} more than once, {args.burst - len(burst_counts)} lost; {t_burst:.1f}s")
        total_files = args.files + args.latency_files + args.burst
        rc = d.stop()
        results["stop"] = f"SIGTERM -> exit {rc}"

        # 4. restart over the unchanged tree
        t_r = time.monotonic()
        d2 = Daemon(root, state, args.workers)
        assert d2.ready.wait(300)
        t_ready = time.monotonic() - t_r
        time.sleep(2)
        rescans = d2.scans()
        done = [e for e in d2.events if e["event"] == "reconcile.done"]
        results["restart"] = (f"{rescans} files rescanned of {total_files}; ready in {t_ready:.2f}s "
                              f"(walk {done[0]['ms'] if done else '?'} ms)")
        d2.stop()

        # 5. quarantine mode: rename -> out of reach, on a Hugging Face cache layout
        if args.quarantine_files:
            from bench_quarantine import bench_daemon as quarantine_latency

            for k, v in quarantine_latency(tmp, args.quarantine_files, 0.5).items():
                results[k.replace("daemon: ", "quarantine: ")] = v
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for k, v in results.items():
        print(f"{k:>13}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
