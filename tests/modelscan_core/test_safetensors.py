"""safetensors: validated without reading tensor data; anomalies MEDIUM, hidden bytes scanned.

Benign files are written by the real `safetensors` package (numpy and torch front ends).
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from modelscan_core import scan_path
from modelscan_core.model import Severity

from .pickle_ops import binunicode_op, global_op

st_numpy = pytest.importorskip("safetensors.numpy")

EVIL = b"\x80\x02" + global_op("posix", "system") + binunicode_op("echo pwned") + b"\x85R."  # posix.system('echo pwned')


def raw_file(path: Path, header: str | bytes, data: bytes = b"") -> Path:
    header = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def tensor(dtype="F32", shape=(2,), begin=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def rules(report) -> set[tuple[str, Severity]]:
    return {(f.rule_id, f.severity) for f in report.findings()}


# -- benign ---------------------------------------------------------------------------------------


def test_files_written_by_safetensors_are_clean(tmp_path):
    arrays = {
        "f32": np.ones((3, 4), np.float32), "f16": np.zeros((7,), np.float16), "i64": np.arange(5),
        "u8": np.arange(9, dtype=np.uint8).reshape(3, 3), "bool": np.array([True, False]), "f64": np.eye(2),
        "empty": np.zeros((0, 3), np.float32), "scalar": np.array(3.0, np.float32),
    }
    st_numpy.save_file(arrays, tmp_path / "model.safetensors", metadata={"format": "np", "note": "hello"})
    report = scan_path(tmp_path / "model.safetensors")
    assert report.files[0].format == "safetensors" and report.exit_code == 0, report.findings() or report.all_errors()


def test_torch_written_file_with_bf16_is_clean_and_recognised_by_content(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4, 4, dtype=torch.bfloat16), "b": torch.zeros(4)}, tmp_path / "blob", metadata={"format": "pt"})
    report = scan_path(tmp_path / "blob")
    assert report.files[0].format == "safetensors" and report.exit_code == 0


def test_empty_header_is_clean(tmp_path):
    assert scan_path(raw_file(tmp_path / "e.safetensors", "{}")).exit_code == 0


# -- anomalies: MEDIUM ------------------------------------------------------------------------------

ANOMALIES = {
    "duplicate-key": ('{"a": %s, "a": %s}' % (json.dumps(tensor()), json.dumps(tensor())), b"\0" * 8),
    "json-constant": ('{"__metadata__": {"x": "y"}, "a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', b"\0" * 8),
    "offsets": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8%s]}}' % ("0" * 25), b"\0" * 8),
    "dtype": (json.dumps({"a": tensor(dtype="PICKLE")}), b"\0" * 8),
    "shape": (json.dumps({"a": tensor(shape=(2.0,))}), b"\0" * 8),
    "size": (json.dumps({"a": tensor(shape=(3,))}), b"\0" * 8),
    "gap": (json.dumps({"a": tensor(begin=4, end=12)}), b"\0" * 12),
    "overlap": (json.dumps({"a": tensor(), "b": tensor(begin=4, end=12)}), b"\0" * 12),
    "metadata": (json.dumps({"__metadata__": {"x": 1}, "a": tensor()}), b"\0" * 8),
    "tensor-entry": (json.dumps({"a": dict(tensor(), extra="hidden")}), b"\0" * 8),
    "appended-data": (json.dumps({"a": tensor()}), b"\0" * 8 + b"trailing bytes"),
}


@pytest.mark.parametrize("rule", sorted(ANOMALIES))
def test_anomalies_are_medium(tmp_path, rule):
    header, data = ANOMALIES[rule]
    report = scan_path(raw_file(tmp_path / "x.safetensors", header, data))
    assert (f"safetensors/{rule}", Severity.MEDIUM) in rules(report), rules(report)
    assert report.files[0].max_severity == Severity.MEDIUM


def test_an_appended_pickle_is_scanned_as_a_pickle(tmp_path):
    path = raw_file(tmp_path / "poly.safetensors", json.dumps({"a": tensor()}), b"\0" * 8 + EVIL)
    report = scan_path(path)
    assert ("safetensors/appended-data", Severity.MEDIUM) in rules(report)
    critical = [f for f in report.findings() if f.severity == Severity.CRITICAL]
    assert critical and critical[0].source == "poly.safetensors:<bytes after the tensors>"


def test_an_appended_zip_holding_a_pickle_is_opened(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", EVIL)
    path = raw_file(tmp_path / "poly.safetensors", json.dumps({"a": tensor()}), b"\0" * 8 + buf.getvalue())
    report = scan_path(path)
    assert any(f.severity == Severity.CRITICAL for f in report.findings())


def test_bytes_in_a_gap_are_scanned(tmp_path):
    payload = EVIL
    header = json.dumps({"a": tensor(begin=len(payload), end=len(payload) + 8)})
    report = scan_path(raw_file(tmp_path / "gap.safetensors", header, payload + b"\0" * 8))
    assert ("safetensors/gap", Severity.MEDIUM) in rules(report)
    assert any(f.severity == Severity.CRITICAL for f in report.findings())


# -- unreadable: errors, never clean -----------------------------------------------------------------


def test_header_longer_than_the_file_is_an_error(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", 5000) + b'{"a":')
    assert scan_path(path).files[0].verdict.value == "error"


def test_header_beyond_the_loader_limit_is_medium_and_an_error(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 200_000_000) + b"{" + b" " * 100)
    report = scan_path(path)
    assert ("safetensors/header-length", Severity.MEDIUM) in rules(report) and report.all_errors()


def test_tensor_data_past_the_end_is_an_error(tmp_path):
    report = scan_path(raw_file(tmp_path / "t.safetensors", json.dumps({"a": tensor()}), b"\0" * 4))
    assert report.files[0].verdict.value == "error"


def test_header_that_is_not_json_is_an_error_with_a_medium_finding(tmp_path):
    report = scan_path(raw_file(tmp_path / "j.safetensors", "{not json", b""))
    assert ("safetensors/header-json", Severity.MEDIUM) in rules(report) and report.all_errors()
