"""Pickle-engine benchmark: speed and memory against modelscan 0.8.8, start-up, detection.

    python3 bench/bench_pickle.py [--ref /path/to/modelscan] [--runs 3] [--against PYTHON]

Without --ref, modelscan 0.8.8 is installed once into ~/.cache/modelscand-bench/ref (a venv;
it needs the package registry). Every measurement is a whole process, timed with wait4(),
so peak RSS is the child's own. Nothing here is a pass/fail test: it prints numbers.

--against names the interpreter of another checkout (a worktree of an earlier commit with its
own venv, `.venv/bin/python`): the op-dense scan and start-up are then compared with it in CPU
time (user + sys, the least of alternating runs: steadier than wall time on a shared machine).
Compile both checkouts' .pyc first, or start-up includes compiling.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modelscand-bench"


def measure(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit code) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    return wall, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def reference_modelscan(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    exe = CACHE / "ref" / "bin" / "modelscan"
    if not exe.exists():
        print("installing modelscan 0.8.8 for comparison into", exe.parent.parent, file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(CACHE / "ref")], check=True)
        done = subprocess.run([str(CACHE / "ref" / "bin" / "pip"), "install", "-q", "modelscan==0.8.8"])
        if done.returncode != 0:
            return None
    return str(exe)


def cpu_seconds(cmd: list[str]) -> float:
    """User + system CPU seconds of one child process."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_utime + usage.ru_stime


def compare(label: str, args: list[str], ours: str, other: str, runs: int) -> None:
    """The least CPU time of `python -m modelscan_core ARGS` under each interpreter, runs alternated."""
    times: dict[str, list[float]] = {ours: [], other: []}
    for _ in range(runs):
        for python in times:
            times[python].append(cpu_seconds([python, "-m", "modelscan_core", *args]))
    mine, theirs = min(times[ours]), min(times[other])
    print(f"  {label}: {mine * 1000:.0f} ms CPU here, {theirs * 1000:.0f} ms there ({mine / theirs:.2f}x)")


def best_of(cmd: list[str], runs: int) -> tuple[float, float, int]:
    results = [measure(cmd) for _ in range(runs)]
    return min(r[0] for r in results), max(r[1] for r in results), results[0][2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ref", help="path of a modelscan 0.8.8 executable")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against", help="interpreter of another checkout to compare CPU time with")
    args = parser.parse_args()
    ours = [sys.executable, "-m", "modelscan_core"]
    ref = reference_modelscan(args.ref)

    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "op_dense.pkl"
        # made in a child, so this process stays small: a fork shares (and counts) the parent's pages
        subprocess.run([sys.executable, "-c", "import pickle, sys; open(sys.argv[1], 'wb').write("
                        "pickle.dumps([[i, str(i)] for i in range(1_000_000)], protocol=4))", str(big)], check=True)
        small = Path(tmp) / "small.pkl"
        small.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
        print(f"op-dense pickle: {big.stat().st_size / 1e6:.1f} MB")

        wall, rss, code = best_of(ours + ["-p", str(big)], args.runs)
        print(f"  ours            {wall:6.2f} s  {rss:7.1f} MB peak  exit {code}")
        if ref:
            rwall, rrss, rcode = best_of([ref, "-p", str(big)], 1)
            print(f"  modelscan 0.8.8 {rwall:6.2f} s  {rrss:7.1f} MB peak  exit {rcode}")
            print(f"  speed-up {rwall / wall:.1f}x, memory {rrss / rss:.1f}x less")

        installed = [str(Path(sys.executable).parent / "modelscan")]
        cmd = installed if Path(installed[0]).exists() else ours
        walls = [measure(cmd + ["-p", str(small)])[0] for _ in range(10)]
        print(f"start-up, `modelscan -p small.pkl`: median {statistics.median(walls) * 1000:.0f} ms, "
              f"max {max(walls) * 1000:.0f} ms over 10 runs")

        if args.against:
            print(f"against {args.against} (least CPU of {max(args.runs, 7)} alternating runs):")
            compare("op-dense", ["-p", str(big)], sys.executable, args.against, max(args.runs, 7))
            compare("start-up", ["-p", str(small)], sys.executable, args.against, max(args.runs, 7) * 2)

    sys.path.insert(0, str(ROOT))
    detection()


def detection() -> None:
    """Counts over the test suite's fixtures: malicious at >= HIGH, benign below HIGH."""
    from modelscan_core import scan_path
    from modelscan_core.model import Severity
    from tests.modelscan_core.test_pickle_attacks import CLASS_A
    from tests.modelscan_core.test_pickle_benign import BENIGN

    with tempfile.TemporaryDirectory() as tmp:
        caught = 0
        for label, data in CLASS_A.items():
            path = Path(tmp) / "m.pkl"
            path.write_bytes(data)
            worst = scan_path(path).files[0].max_severity
            caught += worst is not None and worst >= Severity.HIGH
        flagged = 0
        for label, make in BENIGN.items():
            path = Path(tmp) / "b.pkl"
            path.write_bytes(make())
            worst = scan_path(path).files[0].max_severity
            flagged += worst is not None and worst >= Severity.HIGH
    print(f"class A gadgets caught at HIGH/CRITICAL: {caught}/{len(CLASS_A)}")
    print(f"benign fixtures flagged at HIGH/CRITICAL: {flagged}/{len(BENIGN)}")
    families()


def families() -> None:
    """Counts over the generated technique families of the policy tests (issue 8)."""
    from tests.modelscan_core import test_policy_calls as calls
    from tests.modelscan_core import test_policy_mutation as mutation
    from tests.modelscan_core import test_policy_unknown as unknown
    from tests.modelscan_core.pickle_ops import call_op, global_op, proto
    from tests.modelscan_core.policy_util import high_or_worse, scan

    cases = {
        "callable values x who calls them": [proto(calls.CALLERS[k](calls.CALLABLES[c][0]))
                                             for c in calls.CALLABLES for k in calls.CALLERS],
        "planted methods x key spellings": [proto(calls._namespace() + calls._states(calls.CALLABLES["partial"][0], a)[sp]
                                                  + b"b" + calls._TRIGGERS[a])
                                            for a in calls._TRIGGERS for sp in calls._states(b"N", "x")],
        "mutations of imported objects": [proto(mutation.OPS[o](mutation.TARGETS[t][0]))
                                          for t in mutation.TARGETS for o in mutation.OPS],
        "classes constructed with code/paths": [proto(call_op(global_op(*unknown.CLASSES[c]), *unknown.POSITIONS[pos](p)))
                                                for c in unknown.CLASSES for p in unknown.PAYLOADS
                                                for pos in unknown.POSITIONS],
    }
    for family, blobs in cases.items():
        caught = sum(high_or_worse(scan(b)) for b in blobs)
        print(f"{family}: {caught}/{len(blobs)} at HIGH/CRITICAL")


if __name__ == "__main__":
    main()
