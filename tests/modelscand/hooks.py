"""Scan functions the worker processes import by name in tests (the `scan_function` seam)."""

from __future__ import annotations

import os
import random
import signal
import time

from modelscand.workers import scan_job


def crash_or_hang(job, settings, report):
    name = os.path.basename(job.path)
    if "crash" in name:
        os.kill(os.getpid(), signal.SIGSEGV)  # what a C library crash looks like
    if "hang" in name:
        time.sleep(3600)
    return scan_job(job, settings, report)


def liar(job, settings, report):
    """A compromised worker: claims a finding with a severity that does not exist."""
    report({"phase": "scanned", "identity": [0, 0, 0, 0, 0], "scan_ms": 1.0,
            "result": {"source": job.path, "format": "pickle", "size": 1, "sha256": None, "errors": [],
                       "skipped": None, "members": [], "scanned": True,
                       "findings": [{"rule_id": "x", "severity": "EXEC", "description": "", "source": "",
                                     "scanner": "", "module": "", "operator": "", "offset": None, "call": None}]}})
    return {"status": "ok"}


def slow(job, settings, report):
    """Hold a job whose file or directory name mentions "slow" in flight for a second."""
    if "slow" in os.path.basename(job.path) or "slow" in os.path.basename(os.path.dirname(job.path)):
        time.sleep(1.0)
    return scan_job(job, settings, report)


def jitter(job, settings, report):
    """Scans that take 0-80 ms, like large files on a busy disk: renames, swaps and deletes
    then often land while the file is in flight (the model-based test's daemon)."""
    time.sleep(random.random() * 0.08)
    return scan_job(job, settings, report)


def always_changed(job, settings, report):
    """Every scan of a file named "flux*" sees its bytes change under it."""
    if os.path.basename(job.path).startswith("flux"):
        return {"status": "changed", "identity": None}
    return scan_job(job, settings, report)


def oom_killed(job, settings, report):
    """A file named "oom*" gets its worker SIGKILLed mid-scan every time, as the OOM killer
    would (a signal from outside, not a crash of the worker's own making)."""
    if os.path.basename(job.path).startswith("oom"):
        os.kill(os.getpid(), signal.SIGKILL)
    return scan_job(job, settings, report)
