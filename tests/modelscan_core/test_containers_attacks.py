"""Threat classes C (container differentials) and D (joblib and NumPy layouts), and bombs.

Every malicious fixture is a real container (torch.save, joblib.dump, np.save, zipfile,
tarfile, py7zr) with a payload injected; nothing malicious is ever loaded. Each must be
caught at HIGH or CRITICAL at the member a user would look at.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import pickle
import struct
import tarfile
import zipfile
import zlib

import joblib
import numpy as np
import pytest
import torch

from modelscan_core import Settings, scan_path

from .containers_util import assert_caught, corrupt_crcs, high, payload, payload_obj, replace_member, zip_bytes

OPCODES = b"\x80\x02cposix\nsystem\nq\x00X\x05\x00\x00\x00echo q\x85R.cos\nsystem\n(S'echo'\ntR."


def torch_zip(name: str = "model") -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4), "b": torch.zeros(2)}, buf)
    data = buf.getvalue()
    # torch names the archive root after the file; keep it predictable
    return data if name == "model" else data


def opcode_array(n: int) -> np.ndarray:
    return np.frombuffer((OPCODES * (n // len(OPCODES) + 1))[:n], dtype=np.uint8).copy()


# -- class C: zip differentials ------------------------------------------------------


def test_torch_zip_with_bad_crc(tmp_path):
    data = corrupt_crcs(replace_member(torch_zip(), "/data.pkl", payload()))
    with pytest.raises(zipfile.BadZipFile):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            z.read(z.namelist()[0])
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    assert_caught(path, "model.pt:archive/data.pkl")


@pytest.mark.parametrize("evil_first", [True, False], ids=["miniz-reads-it", "zipfile-reads-it"])
def test_duplicated_member_names(tmp_path, evil_first):
    benign = pickle.dumps({"w": 1}, protocol=2)
    pair = [("archive/data.pkl", payload()), ("archive/data.pkl", benign)]
    if not evil_first:
        pair.reverse()
    path = tmp_path / "model.pt"
    path.write_bytes(zip_bytes(pair + [("archive/version", b"3\n"), ("archive/byteorder", b"little")]))
    report = assert_caught(path, "model.pt:archive/data.pkl")
    assert len([m for m in report.files[0].members if "data.pkl" in m.source]) == 2


@pytest.mark.parametrize("name", ["archive/extra/WEIGHTS.BIN", "archive/DATA.PKL", "archive/data/pickle.txt", "archive/x"])
def test_payload_in_odd_named_member(tmp_path, name):
    data = zip_bytes([("archive/data.pkl", pickle.dumps({"ok": 1}, 2)), (name, payload(0)), ("archive/version", b"3\n")])
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    assert_caught(path, f"model.pt:{name}")


def test_second_pickle_in_torchscript_like_archive(tmp_path):
    data = zip_bytes([("archive/data.pkl", pickle.dumps({"ok": 1}, 2)), ("archive/constants.pkl", payload(2)),
                      ("archive/version", b"3\n")], method=zipfile.ZIP_DEFLATED)
    path = tmp_path / "scripted.pt"
    path.write_bytes(data)
    assert_caught(path, "scripted.pt:archive/constants.pkl")


def test_local_header_disagrees_with_central_directory(tmp_path):
    benign = pickle.dumps({"ok": 1}, 2)
    body = benign + payload(2)
    data = bytearray(zip_bytes([("archive/data.pkl", body), ("archive/version", b"3\n")]))
    cd = data.find(b"PK\x01\x02")
    struct.pack_into("<II", data, cd + 20, len(benign), len(benign))  # central: only the benign part
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(data))
    assert_caught(path, "model.pt:archive/data.pkl")


def test_bytes_before_the_archive(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(payload(2) + torch_zip())
    assert_caught(path, "<bytes before the archive>")


def test_a_pickle_that_holds_an_archive_as_an_operand_is_read_to_its_stop(tmp_path):
    # keras pickles a model as the bytes of its .keras zip: the archive sits inside the
    # pickle, whose calls come after it; pickle.load reads past the archive to STOP
    archive = zip_bytes([("config.json", b"{}"), ("model.weights.h5", b"\x89HDF")])
    data = b"\x80\x03B" + struct.pack("<I", len(archive)) + archive + b"0" + payload(2)[2:]
    path = tmp_path / "model.pkl"
    path.write_bytes(data)
    assert_caught(path, "<bytes before the archive>")


def test_nested_zip(tmp_path):
    inner = replace_member(torch_zip(), "/data.pkl", payload())
    middle = zip_bytes([("weights/model.pt", inner)], method=zipfile.ZIP_DEFLATED)
    outer = zip_bytes([("release/bundle.zip", middle), ("README", b"hello")])
    path = tmp_path / "download.zip"
    path.write_bytes(outer)
    assert_caught(path, "download.zip:release/bundle.zip:weights/model.pt:archive/data.pkl")


def test_7z_wrapped_torch_nullifai(tmp_path):
    import py7zr

    evil = replace_member(torch_zip(), "/data.pkl", payload())
    path = tmp_path / "model.7z"
    with py7zr.SevenZipFile(path, "w") as archive:
        archive.writestr(evil, "pytorch_model.bin")
    assert_caught(path, "model.7z:pytorch_model.bin:archive/data.pkl")


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tar.bz2", "tar.xz"])
def test_tar_archives(tmp_path, kind):
    buf = io.BytesIO()
    mode = "w" if kind == "tar" else "w:" + kind.split(".")[1]
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, body in (("model/config.json", b"{}"), ("model/weights.bin", payload(4))):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    path = tmp_path / f"model.{kind}"
    path.write_bytes(buf.getvalue())
    assert_caught(path, "model/weights.bin")


@pytest.mark.parametrize("codec", ["gzip", "bz2", "xz", "zlib"])
def test_compressed_pickles(tmp_path, codec):
    fn = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress, "zlib": zlib.compress}[codec]
    path = tmp_path / "model.bin"
    path.write_bytes(fn(payload(2)))
    assert_caught(path, "model.bin")


# -- legacy torch ----------------------------------------------------------------------

MAGIC = 0x1950A86A20F9469CFC6C


@pytest.mark.parametrize("slot", [1, 2, 3, 4])
def test_legacy_torch_payload_in_any_pickle(tmp_path, slot):
    parts = [pickle.dumps(MAGIC, 2), pickle.dumps(1001, 2), pickle.dumps({"protocol_version": 1001, "little_endian": True}, 2),
             pickle.dumps({"w": 1}, 2), pickle.dumps(["0"], 2)]
    parts[slot] = payload(2)
    raw = struct.pack("<q", 64) + OPCODES * 4  # storage bytes: never opcodes
    path = tmp_path / "legacy.pt"
    path.write_bytes(b"".join(parts) + raw)
    report = assert_caught(path, "legacy.pt")
    assert report.files[0].format == "pytorch_legacy"


def test_legacy_torch_raw_storage_is_not_read(tmp_path):
    parts = [pickle.dumps(MAGIC, 2), pickle.dumps(1001, 2), pickle.dumps({}, 2), pickle.dumps({"w": 1}, 2), pickle.dumps(["0"], 2)]
    path = tmp_path / "legacy.pt"
    path.write_bytes(b"".join(parts) + struct.pack("<q", 64) + payload(2))
    report = scan_path(path)
    assert not report.findings() and not report.all_errors()


def legacy_tar(evil: str | None = None) -> bytes:
    """torch's legacy tar format, built from its record layout (torch can no longer write it)."""
    evil_p = payload(2)
    args = b"\x80\x02X\x01\x00\x00\x000q\x00X\x03\x00\x00\x00cpuq\x01ctorch\nFloatStorage\nq\x02\x87q\x03."
    targs = b"\x80\x02X\x01\x00\x00\x001q\x00X\x01\x00\x00\x000q\x01ctorch\nFloatTensor\nq\x02\x87q\x03."
    storages = (pickle.dumps(1, 2) + (evil_p if evil == "storage" else args) + struct.pack("<q", 16) + (OPCODES * 2)[:64]
                + (evil_p if evil == "views" else pickle.dumps([], 2)))
    tensors = (pickle.dumps(1, 2) + (evil_p if evil == "tensor" else targs) + struct.pack("<ii", 1, 0)
               + struct.pack("<qqq", 16, 1, 0))
    main = evil_p if evil == "pickle" else b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01X\x01\x00\x00\x001q\x02Qs."
    sys_info = evil_p if evil == "sys_info" else pickle.dumps({"protocol_version": 1001, "little_endian": True}, 2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in (("sys_info", sys_info), ("storages", storages), ("tensors", tensors), ("pickle", main)):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


@pytest.mark.parametrize("evil,member", [("sys_info", "sys_info"), ("storage", "storages"), ("views", "storages"),
                                         ("tensor", "tensors"), ("pickle", "pickle")])
def test_legacy_torch_tar(tmp_path, evil, member):
    path = tmp_path / "old.pt"
    path.write_bytes(legacy_tar(evil))
    assert_caught(path, f"old.pt:{member}")


# -- class D: NumPy ------------------------------------------------------------------------


def _object_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([1, "x"], dtype=object), allow_pickle=True)
    data = buf.getvalue()
    hlen = struct.unpack("<H", data[8:10])[0]
    return data[: 10 + hlen] + payload(2)


def test_object_dtype_npy(tmp_path):
    path = tmp_path / "arr.npy"
    path.write_bytes(_object_npy())
    assert_caught(path, "arr.npy")


def test_object_dtype_inside_npz(tmp_path):
    buf = io.BytesIO()
    np.savez(buf, good=np.arange(5))
    data = zip_bytes([("good.npy", zipfile.ZipFile(io.BytesIO(buf.getvalue())).read("good.npy")), ("evil.npy", _object_npy())])
    path = tmp_path / "arrays.npz"
    path.write_bytes(data)
    assert_caught(path, "arrays.npz:evil.npy")


# -- class D: joblib -------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)], ids=str)
def test_joblib_payload_after_arrays(tmp_path, compress):
    obj = {"arrays": [opcode_array(n) for n in (10, 4096, 100_003)], "f": np.ones((5, 3), order="F"), "evil": payload_obj()}
    path = tmp_path / "model.joblib"
    joblib.dump(obj, path, compress=compress)
    assert_caught(path, "model.joblib")


def test_joblib_payload_in_object_array(tmp_path):
    obj = {"a": opcode_array(1000), "o": np.array([payload_obj(), 1], dtype=object), "b": opcode_array(77)}
    path = tmp_path / "model.joblib"
    joblib.dump(obj, path)
    assert_caught(path, "model.joblib")


def test_joblib_array_bytes_cannot_steer_the_walk(tmp_path):
    # Array bytes are a complete benign pickle followed by garbage: a naive walk stops at
    # their STOP; joblib skips them and runs the payload that follows.
    fake = pickle.dumps({"x": 1}, 2) + b"\xff" * 50
    obj = [np.frombuffer(fake, dtype=np.uint8).copy(), payload_obj()]
    path = tmp_path / "model.pkl"
    joblib.dump(obj, path)
    assert_caught(path, "model.pkl")


# -- limits ----------------------------------------------------------------------------------


def test_ratio_bomb_is_incomplete_and_keeps_findings(tmp_path):
    path = tmp_path / "bomb.pkl.gz"
    path.write_bytes(gzip.compress(payload(2) + b"\x00" * (6 << 20), 1))
    # the ratio is checked past limits.ratio_after_bytes (1 GiB by default); lowered to keep the test small
    settings = Settings.from_dict({"limits": {"ratio_after_bytes": 2 << 20}})
    report = assert_caught(path, "bomb.pkl.gz:bomb.pkl", settings)
    assert any(e.incomplete and "max_ratio" in e.description for e in report.all_errors()), report.all_errors()


def test_total_bytes_limit(tmp_path):
    path = tmp_path / "big.xz"
    path.write_bytes(lzma.compress(pickle.dumps(list(range(400_000)), 2)))
    settings = Settings.from_dict({"limits": {"max_total_bytes": 200_000}})
    report = scan_path(path, settings)
    assert report.files[0].verdict.value in ("incomplete", "error")
    assert any(e.incomplete and "max_total_bytes" in e.description for e in report.all_errors())


def test_depth_limit(tmp_path):
    data = pickle.dumps({"ok": 1}, 2)
    for i in range(5):
        data = zip_bytes([(f"level{i}.zip" if i else "x.pkl", data)])
    path = tmp_path / "deep.zip"
    path.write_bytes(data)
    report = scan_path(path, Settings.from_dict({"limits": {"max_depth": 3}}))
    assert report.files[0].verdict.value == "incomplete"
    assert any("max_depth" in e.description for e in report.all_errors())


def test_member_limit(tmp_path):
    path = tmp_path / "many.zip"
    path.write_bytes(zip_bytes([(f"m{i}.pkl", pickle.dumps(i, 2)) for i in range(20)]))
    report = scan_path(path, Settings.from_dict({"limits": {"max_members": 5}}))
    assert report.files[0].verdict.value == "incomplete"
    assert any("max_members" in e.description for e in report.all_errors())


def test_nothing_high_without_a_payload(tmp_path):
    # the fixtures above are malicious only because of the payload: the same shapes without it are clean
    path = tmp_path / "model.pt"
    path.write_bytes(corrupt_crcs(torch_zip()))
    report = scan_path(path)
    assert not high(report) and not report.all_errors()


def test_joblib_padding_that_pickle_load_would_run(tmp_path):
    # After an aligned array's BUILD joblib reads a padding-length byte and skips that much.
    # Plain pickle.load reads the same bytes as opcodes: a length byte of 0x63 ('c', GLOBAL)
    # and a payload as padding run under pickle.load while joblib.load still works.
    path = tmp_path / "model.joblib"
    joblib.dump({"w": np.arange(64, dtype=np.uint8)}, path)
    data = path.read_bytes()
    marker = b"numpy_array_alignment_bytes\x94K\x10ub"
    i = data.index(marker) + len(marker)
    body = b"posix\nsystem\n(S'touch /tmp/modelscand-test-marker'\ntR."
    path.write_bytes(data[:i] + bytes([0x63]) + body.ljust(0x63, b"\xff") + data[i + 1 + data[i]:])
    report = assert_caught(path, "model.joblib")
    assert "joblib/array-bytes-are-a-pickle" in {f.rule_id for f in report.findings()}


def test_aligned_joblib_arrays_of_payload_bytes_are_inert_for_both_loaders(tmp_path):
    # the padding-length byte (0..15) is no opcode: pickle.load stops before the array bytes
    path = tmp_path / "model.joblib"
    joblib.dump({"weights": np.frombuffer(payload(2), dtype=np.uint8).copy()}, path)
    assert scan_path(path).files[0].verdict.value == "clean"
