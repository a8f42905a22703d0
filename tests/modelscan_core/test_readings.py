"""The same bytes read the way each loader reads them.

A FRAME whose declared length ends inside an operand is read one way by `pickle.loads`
(bytes) and another by the C unpickler over a file object (torch.load's data.pkl, pickle.load
of a large frame), and raises in joblib.load's pure-Python unpickler; a FRAME that runs past
a STOP moves where the next load() begins; joblib reads array bytes from the file, past the
frame. Each test builds bytes whose payload only one reading runs, checks with CPython's own
unpickler (the inert oracle) that this reading does run it, and that the scanner reports it.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile

import joblib
import numpy as np
import pytest
import torch

from modelscan_core import scan_path
from modelscan_core.model import Severity

from .containers_util import replace_member
from .oracle.harness import Oracle

PAYLOAD = b"cposix\nsystem\n(S'touch /tmp/modelscand-never-run'\ntR"


def frame(n: int) -> bytes:
    return b"\x95" + struct.pack("<Q", n)


def straddle(pad: int = 0) -> bytes:
    """A pickle whose FRAME ends one byte into a BININT operand.

    Read as bytes, the operand takes that byte and the next three, and a SHORT_BINUNICODE then
    swallows the payload as a 78-byte string. A file reader drops the byte left in its frame
    buffer and takes the operand from after the frame: the string's length byte (0x4e) is
    then NONE, and the payload runs.
    """
    ops = b"N0" * ((78 - len(PAYLOAD)) // 2) + PAYLOAD
    assert len(ops) == 78
    inside = b"N0" * (pad // 2) + b"NJ\x00"
    return b"\x80\x04" + frame(len(inside)) + inside + b"\x00\x00\x00\x8cN" + ops + b"."


@pytest.fixture(scope="module")
def oracle():
    o = Oracle()
    yield o
    o.close()


def runs_system(results: list[dict], reading: str) -> bool:
    r = next(r for r in results if r["reading"] == reading)
    return any(m == "posix" and n == "system" and uses & 8 for m, n, uses in r["globals"])


def critical_system(report) -> bool:
    return any(f.severity == Severity.CRITICAL and f.operator == "system" for f in report.findings())


def test_straddle_in_torch_data_pkl_runs_only_under_torch_load(oracle, tmp_path):
    data = straddle()
    results = oracle.read(data, ("bytes", "file"))
    assert not runs_system(results, "bytes") and runs_system(results, "file")
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    path = tmp_path / "model.pt"
    path.write_bytes(replace_member(buf.getvalue(), "/data.pkl", data))
    report = scan_path(path)
    assert critical_system(report)
    assert "pickle/frame-straddle" in {f.rule_id for f in report.findings()}


def test_straddle_of_a_large_frame_runs_under_pickle_load(oracle, tmp_path):
    # pickle.load(open(f)) peeks into a BufferedReader, but reads a frame of 8 KiB or more
    # with read(): it then drops the frame's last byte like any file reader
    data = straddle(pad=8200)
    results = oracle.read(data, ("bytes", "peek8192", "peek4096"))
    assert not runs_system(results, "bytes")
    assert runs_system(results, "peek8192") and runs_system(results, "peek4096")
    path = tmp_path / "model.pkl"
    path.write_bytes(data)
    assert critical_system(scan_path(path))


def test_a_frame_past_stop_hides_the_next_pickle_from_a_bytes_reading(oracle, tmp_path):
    # the first pickle's FRAME covers its STOP and two more bytes: read contiguously those
    # start a string that swallows the payload; a loader that read the frame whole begins its
    # next load() at the frame's end, right at the payload (legacy torch.load loads 5 in a row)
    payload = b"\x80\x02" + PAYLOAD + b"."
    inside = b"N0" * 4100 + b"K\x01." + b"\x8c" + bytes([len(payload)])
    data = b"\x80\x04" + frame(len(inside)) + inside + payload + b"."
    results = oracle.read(data, ("file", "peek8192"))
    assert runs_system(results, "file") and runs_system(results, "peek8192")
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    assert critical_system(scan_path(path))


def test_joblib_array_inside_a_frame_is_read_from_the_frame_end(tmp_path):
    # joblib's pure-Python unpickler reads a NumpyArrayWrapper's bytes from the file, which is
    # past the frame holding the BUILD; then it runs the rest of that frame. Here the rest of
    # the frame pops the array and calls the payload (a reading that skips the array right
    # after BUILD reads the payload as array bytes).
    path = tmp_path / "model.joblib"
    joblib.dump({"w": np.arange(16, dtype=np.uint8)}, path, protocol=4)
    data = path.read_bytes()
    marker = b"numpy_array_alignment_bytes\x94K\x10ub"
    build_end = data.index(marker) + len(marker)
    start = data.rindex(b"\x95", 0, build_end)
    (length,) = struct.unpack_from("<Q", data, start + 1)
    assert start + 9 + length == build_end, "joblib ends the frame at the wrapper's BUILD"
    tail = b"0" + PAYLOAD
    data = (data[: start + 1] + struct.pack("<Q", length + len(tail)) + data[start + 9 : build_end] + tail
            + data[build_end:])
    path.write_bytes(data)
    report = scan_path(path)
    assert critical_system(report)
    assert "pickle/frame-straddle" in {f.rule_id for f in report.findings()}


def test_legacy_tar_storage_size_comes_from_the_storage_type_torch_reads(tmp_path):
    # storages: count, then per storage (key, location, storage_type) and raw bytes whose size
    # is numel * storage_type's element size. A decoy DoubleStorage as the key (8-byte
    # elements) made the scanner skip 8x too far, over the second record's payload.
    def pickled(obj_ops: bytes) -> bytes:
        return b"\x80\x02" + obj_ops + b"."

    record = pickled(b"ctorch\nDoubleStorage\nX\x03\x00\x00\x00cpuctorch\nByteStorage\n\x87")
    storages = (pickled(b"K\x02") + record + struct.pack("<q", 16) + b"\x00" * 16
                + pickled(PAYLOAD)).ljust(4096, b"N") + pickled(b"]")
    members = {"sys_info": pickle.dumps({}, 2), "storages": storages, "tensors": pickled(b"K\x00"),
               "pickle": pickle.dumps({}, 2)}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    path = tmp_path / "legacy.pt"
    path.write_bytes(out.getvalue())
    report = scan_path(path)
    assert critical_system(report)
    assert any("legacy.pt:storages" in f.source for f in report.findings() if f.operator == "system")


def test_benign_frames_are_clean(tmp_path):
    # every FRAME a writer makes ends at an opcode boundary: nothing to report, one reading
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({f"k{i}": list(range(50)) for i in range(3000)}, protocol=5))
    report = scan_path(path)
    assert report.files[0].verdict.value == "clean", report.findings()


def test_a_storage_member_that_is_a_pickle_is_reported(tmp_path):
    # torch.load reads <root>/data/<key> as raw bytes; a tool that unpickles every member runs it
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    data = replace_member(buf.getvalue(), "/data/0", pickle.dumps(_Reduce(__import__("os").system, ("id",)), 2))
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    report = scan_path(path)
    assert "torch/hidden-pickle" in {f.rule_id for f in report.findings()}
    assert critical_system(report)
    assert any(f.source.endswith("data/0") for f in report.findings() if f.operator == "system")


def test_real_tensor_storages_are_not_pickles(tmp_path):
    buf = io.BytesIO()
    torch.manual_seed(0)
    torch.save({f"w{i}": torch.randn(257) * 1000 for i in range(40)} | {"i": torch.arange(4096)}, buf)
    path = tmp_path / "model.pt"
    path.write_bytes(buf.getvalue())
    report = scan_path(path)
    assert report.files[0].verdict.value == "clean", report.findings()


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_npy_object_array_with_a_long_header(tmp_path):
    # np.load(allow_pickle=True) lifts the 10000-byte header limit: the pickle after a long
    # header runs, so the scanner must read past it (it refused such files before)
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header = header.ljust(20000 - 11, b" ") + b"\n"
    data = b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header
    data += pickle.dumps(_Reduce(__import__("os").system, ("id",)), 2)
    path = tmp_path / "weights.npy"
    path.write_bytes(data)
    assert critical_system(scan_path(path))


# -- polyglots: a file is every format some loader reads it as ------------------------------


def test_tar_whose_first_member_name_is_a_pickle(oracle, tmp_path):
    # pickle.load(open(f)) reads the tar header's name field as a protocol-0 pickle and stops
    # at its STOP; tarfile reads a harmless member
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo((PAYLOAD + b".").decode())
        body = b"hello"
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    data = out.getvalue()
    assert runs_system(oracle.read(data, ("peek8192",)), "peek8192")
    path = tmp_path / "bundle.tar"
    path.write_bytes(data)
    report = scan_path(path)
    assert critical_system(report)
    assert report.files[0].format == "tar+pickle"


def test_pickle_in_an_hdf5_user_block(oracle, tmp_path):
    import h5py

    path = tmp_path / "model.h5"
    with h5py.File(path, "w", userblock_size=512) as f:
        f["w"] = np.ones(4)
    evil = b"\x80\x02" + PAYLOAD + b"."
    data = evil + path.read_bytes()[len(evil):]
    assert runs_system(oracle.read(data, ("peek8192",)), "peek8192")
    path.write_bytes(data)
    with h5py.File(path, "r") as f:  # still an HDF5 file h5py opens
        assert list(f) == ["w"]
    report = scan_path(path)
    assert critical_system(report)


def test_a_format_that_merely_starts_like_a_pickle_stays_itself(tmp_path):
    # a safetensors header of 384 bytes starts b"\x80\x01": PROTO 1, then nothing a pickle
    # reading can use. No finding, no error, one format.
    import json

    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode().ljust(384)
    data = struct.pack("<Q", len(header)) + header + b"\x00" * 8
    assert data[:2] == b"\x80\x01"
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    report = scan_path(path)
    assert report.files[0].format == "safetensors"
    assert report.files[0].verdict.value == "clean", (report.findings(), report.all_errors())


def test_joblib_object_arrays_read_as_pickle_load_reads_them_stay_clean(tmp_path):
    # pickle.load of a joblib file runs an object array's own pickle with the outer memo: the
    # names its GETs then spell do not exist (the real load fails there). That speculative
    # reading reports denylisted names only.
    from sklearn.preprocessing import OneHotEncoder

    enc = OneHotEncoder().fit(np.array([["a", "x"], ["b", "y"], ["a", "y"]], dtype=object))
    path = tmp_path / "encoder.joblib"
    joblib.dump(enc, path)
    report = scan_path(path)
    assert report.files[0].verdict.value == "clean", [(f.rule_id, f.module, f.operator) for f in report.findings()]
