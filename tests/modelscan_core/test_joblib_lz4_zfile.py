"""joblib's lz4 compression (lz4 is a dependency: scanned, never an error) and the old `ZF` framing."""

from __future__ import annotations

import os
import zlib

import pytest

from modelscan_core import scan_path
from modelscan_core.model import Severity

from .pickle_ops import Reduce

joblib = pytest.importorskip("joblib")
np = pytest.importorskip("numpy")
lz4_frame = pytest.importorskip("lz4.frame")

EVIL = Reduce(os.system, ("echo pwned",))


def test_lz4_joblib_files_are_scanned(tmp_path):
    joblib.dump({"weights": np.arange(1000.0), "labels": ["a", "b"]}, tmp_path / "ok.joblib", compress="lz4")
    joblib.dump({"weights": np.arange(10.0), "hook": EVIL}, tmp_path / "evil.joblib", compress=("lz4", 3))
    report = scan_path(tmp_path)
    by_name = {r.source: r for r in report.files}
    assert by_name["ok.joblib"].format == "lz4" and by_name["ok.joblib"].verdict.value == "clean"
    assert by_name["evil.joblib"].max_severity == Severity.CRITICAL
    assert not report.all_errors()


def test_a_payload_in_a_second_lz4_frame_is_found(tmp_path):
    import pickle

    data = pickle.dumps({"benign": 1, "hook": EVIL}, protocol=2)
    cut = len(data) // 2
    (tmp_path / "two_frames.joblib").write_bytes(lz4_frame.compress(data[:cut]) + lz4_frame.compress(data[cut:]))
    assert scan_path(tmp_path / "two_frames.joblib").files[0].max_severity == Severity.CRITICAL


@pytest.mark.parametrize("suffix", ["", "L"])
def test_old_joblib_zfile_framing_is_scanned(tmp_path, suffix):
    import pickle

    data = pickle.dumps({"hook": EVIL}, protocol=2)
    # joblib <= 0.9: b"ZF", hex(len) padded to 19 bytes (Python 2 wrote longs with an L), zlib data
    header = b"ZF" + (hex(len(data)) + suffix).encode().ljust(19)
    (tmp_path / "old.pkl").write_bytes(header + zlib.compress(data))
    report = scan_path(tmp_path / "old.pkl")
    assert report.files[0].format == "joblib_zfile" and report.files[0].max_severity == Severity.CRITICAL
    benign = pickle.dumps({"w": [1, 2, 3]}, protocol=2)
    (tmp_path / "ok.pkl").write_bytes(b"ZF" + hex(len(benign)).encode().ljust(19) + zlib.compress(benign))
    assert scan_path(tmp_path / "ok.pkl").exit_code == 0
