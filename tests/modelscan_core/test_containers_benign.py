"""Benign containers from the real libraries stay clean (threats.md section 3).

torch, numpy, joblib and sklearn write the fixtures; the scanner must read them without any
finding and without errors (an error is "not known to be safe": also a failure here).
"""

from __future__ import annotations

import io
import tarfile

import joblib
import numpy as np
import pytest
import torch

from modelscan_core import scan_path

from .containers_util import assert_clean

#: bytes that read as a pickle calling os.system: array data must never be read as opcodes
OPCODES = b"\x80\x02cposix\nsystem\nq\x00X\x05\x00\x00\x00echo q\x85R.cos\nsystem\n(S'echo'\ntR."


def opcode_array(n: int) -> np.ndarray:
    reps = n // len(OPCODES) + 1
    return np.frombuffer((OPCODES * reps)[:n], dtype=np.uint8).copy()


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_torch_zip_state_dict_and_optimizer(tmp_path):
    net = Net()
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(1, 3, 8, 8)).sum().backward()
    opt.step()
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": net.state_dict(), "optim": opt.state_dict(), "epoch": 3}, path)
    report = assert_clean(path)
    members = [m.source for m in report.files[0].members]
    assert "checkpoint.pt:checkpoint/data.pkl" in members
    assert not any("/data/0" in m for m in members), "tensor storages must never be read"


def test_torch_zip_with_opcode_looking_tensors(tmp_path):
    # torch.load never unpickles a storage, so data.pkl is clean; but tensors whose bytes are
    # a pickle that calls os.system are a payload for tools that unpickle every member (issue 9)
    t = torch.from_numpy(opcode_array(1 << 14))
    path = tmp_path / "weights.pth"
    torch.save({"w": t, "w2": t.clone()}, path)
    report = scan_path(path)
    hidden = [f for f in report.findings() if f.rule_id == "torch/hidden-pickle"]
    assert len(hidden) == 2 and all("/data/" in f.description for f in hidden)
    assert not [f for f in report.findings() if f.source.endswith("data.pkl")]


def test_torchscript_archive(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(Net()), path)
    report = assert_clean(path)
    assert report.files[0].format == "pytorch_zip"
    scanned = {m.source for m in report.files[0].members}
    assert "scripted.pt:scripted/data.pkl" in scanned and "scripted.pt:scripted/constants.pkl" in scanned


def test_torch_export_pt2(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(1, 3),)), path)
    report = assert_clean(path)
    assert any("sample_inputs/model.pt" in m.source for m in report.files[0].members)


def test_torch_legacy_format(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"model": Net().state_dict(), "w": torch.from_numpy(opcode_array(4096))}, path,
               _use_new_zipfile_serialization=False)
    report = assert_clean(path)
    assert report.files[0].format == "pytorch_legacy"


def test_numpy_npy_and_npz(tmp_path):
    np.save(tmp_path / "a.npy", opcode_array(100_000))
    np.save(tmp_path / "s.npy", np.zeros(3, dtype=[("a", "<f4"), ("b", "S3")]))
    np.savez(tmp_path / "b.npz", x=np.arange(10.0), y=opcode_array(5000))
    np.savez_compressed(tmp_path / "c.npz", x=opcode_array(300_000))
    np.save(tmp_path / "o.npy", np.array([1, "two", (3.0,)], dtype=object), allow_pickle=True)
    for name in ("a.npy", "s.npy", "b.npz", "c.npz", "o.npy"):
        assert_clean(tmp_path / name)


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)], ids=str)
def test_joblib_with_arrays(tmp_path, compress):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)), np.arange(60) % 2
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    obj = {
        "pipe": pipe,
        "arrays": [opcode_array(n) for n in (1, 7, 4096, 300_001)],
        "f": np.asfortranarray(rng.normal(size=(33, 17))),
        "strings": np.array(["a", "bc"]),
        "objects": np.array([{"k": 1}, "x", None], dtype=object),
        "after": {"still": "scanned"},
    }
    path = tmp_path / "model.joblib"
    joblib.dump(obj, path, compress=compress)
    assert_clean(path)


def test_legacy_torch_tar_benign(tmp_path):
    from .test_containers_attacks import legacy_tar

    path = tmp_path / "old.tar"
    path.write_bytes(legacy_tar())
    report = assert_clean(path)
    assert {m.source for m in report.files[0].members} >= {"old.tar:storages", "old.tar:tensors", "old.tar:pickle"}


def test_tar_gz_of_models(tmp_path):
    inner = io.BytesIO()
    torch.save({"w": torch.ones(3)}, inner)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("models/m.pt")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    path = tmp_path / "bundle.tar.gz"
    path.write_bytes(buf.getvalue())
    report = assert_clean(path)
    assert report.files[0].members[0].source == "bundle.tar.gz:bundle.tar"
