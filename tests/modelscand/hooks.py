"""Scan functions the worker processes import by name in tests (the `scan_function` seam)."""

from __future__ import annotations

import os
import signal
import time

from modelscand.workers import scan_job


def crash_or_hang(job, settings):
    name = os.path.basename(job["path"])
    if "crash" in name:
        os.kill(os.getpid(), signal.SIGSEGV)  # what a C library crash looks like
    if "hang" in name:
        time.sleep(3600)
    return scan_job(job, settings)
