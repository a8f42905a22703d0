"""Container scan speed: a ~2 GB torch zip checkpoint and a ~1 GB joblib file with arrays.

    python3 bench/bench_containers.py [--torch-gb 2] [--joblib-gb 1]

(a) The torch checkpoint is scanned by reading its pickles only (tensor storages are never
    read): target <= 0.2 s. (b) The joblib file's arrays are skipped by the BUILD hook:
    reported against a plain sequential read of the same file (cold-ish: the page cache is
    dropped for the file with posix_fadvise before each timing). Peak RSS of the scanning child process (VmHWM: getrusage's ru_maxrss
is inherited across fork+exec on Linux and would show the generator's peak).
Files are generated in a temporary directory and deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_speed(path: str) -> float:
    drop_cache(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass
    return time.perf_counter() - start


def timed_scan(path: str):
    """Scan in a child process: its time, verdict and peak RSS are the scanner's alone."""
    import subprocess
    import sys

    drop_cache(path)
    code = ("import resource,sys,time;from modelscan_core import scan_path;t=time.perf_counter();"
            "r=scan_path(sys.argv[1]);e=time.perf_counter()-t;f=r.files[0];"
            "print(e,f.verdict.value,len(f.members),[int(l.split()[1])//1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), out[1], int(out[2]), int(out[3])


def bench_torch(tmp: str, gb: float) -> None:
    import torch

    path = os.path.join(tmp, "checkpoint.pt")
    n = int(gb * (1 << 30) / 4 / 200)
    torch.save({f"layer{i}.weight": torch.empty(n).uniform_() for i in range(200)}, path)
    size = os.path.getsize(path)
    elapsed, verdict, members, rss = timed_scan(path)
    print(f"(a) torch zip {size / 2**30:.2f} GiB, 200 tensors: scan {elapsed:.3f} s "
          f"(target <= 0.2 s), verdict={verdict}, members read={members}, scanner peak RSS {rss} MiB")
    os.unlink(path)


def bench_joblib(tmp: str, gb: float) -> None:
    import joblib
    import numpy as np

    path = os.path.join(tmp, "model.joblib")
    # opcode-looking bytes that make no call: joblib.load skips them, pickle.load would only fail on them
    # (array bytes that form a call are reported, since pickle.load would run them)
    pattern = np.frombuffer(b"cos\nsystem\n(S'echo'\nt0." * 4096, dtype=np.uint8)
    per = int(gb * (1 << 30) / 64)
    arrays = [np.resize(pattern, per) for _ in range(64)]
    joblib.dump({"arrays": arrays, "meta": {"n": 64}}, path)
    del arrays
    size = os.path.getsize(path)
    disk = read_speed(path)
    elapsed, verdict, _, rss = timed_scan(path)
    print(f"(b) joblib {size / 2**30:.2f} GiB, 64 arrays: scan {elapsed:.3f} s = {size / elapsed / 2**20:.0f} MiB/s; "
          f"plain read {disk:.3f} s = {size / disk / 2**20:.0f} MiB/s; verdict={verdict}; scanner peak RSS {rss} MiB")
    compressed = os.path.join(tmp, "model_z.joblib")
    rng = np.random.default_rng(0)
    raw = 256 << 20
    joblib.dump({"arrays": [rng.integers(0, 16, raw // 8, dtype=np.uint8) for _ in range(8)]}, compressed, compress=3)
    csize = os.path.getsize(compressed)
    elapsed, verdict, _, rss = timed_scan(compressed)
    print(f"(b') zlib-compressed joblib {csize / 2**20:.0f} MiB on disk, {raw / 2**20:.0f} MiB of arrays: "
          f"scan {elapsed:.3f} s = {raw / elapsed / 2**20:.0f} MiB/s decompressed, verdict={verdict}, scanner peak RSS {rss} MiB")
    os.unlink(path)
    os.unlink(compressed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--torch-gb", type=float, default=2.0)
    parser.add_argument("--joblib-gb", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-containers-") as tmp:
        bench_torch(tmp, args.torch_gb)
        bench_joblib(tmp, args.joblib_gb)


if __name__ == "__main__":
    main()
