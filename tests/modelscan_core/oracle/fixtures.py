"""Real files from the real writers, made once per session: the seeds the mutation fuzzers
start from (torch, joblib, NumPy, HDF5, ONNX, archives). Benign by construction."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from functools import lru_cache


@lru_cache(maxsize=1)
def containers() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, file name) of one benign file per container format the scanner reads."""
    import h5py
    import joblib
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper

    out: dict[str, tuple[bytes, str]] = {}
    torch.manual_seed(0)
    state = {"w": torch.randn(4, 3), "b": torch.zeros(3), "step": 7}
    buf = io.BytesIO()
    torch.save(state, buf)
    out["torch_zip"] = (buf.getvalue(), "model.pt")
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=False)
    out["torch_legacy"] = (buf.getvalue(), "legacy.pt")
    value = {"weights": np.arange(24, dtype=np.float32).reshape(4, 6), "labels": np.array(["a", "bb"], dtype=object),
             "meta": {"n": 3}}
    for compress, name in ((0, "model.joblib"), (3, "model.joblib.z"), ("lz4", "model.joblib.lz4")):
        buf = io.BytesIO()
        joblib.dump(value, buf, compress=compress)
        out[f"joblib_{compress or 'raw'}"] = (buf.getvalue(), name)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, [1, 2], "x"], dtype=object), allow_pickle=True)
    out["npy_object"] = (buf.getvalue(), "arr.npy")
    buf = io.BytesIO()
    np.savez(buf, a=np.arange(5), b=np.array([None, "x"], dtype=object))
    out["npz"] = (buf.getvalue(), "arrays.npz")
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.attrs["model_config"] = '{"class_name": "Sequential", "config": {"layers": [{"class_name": "Dense", ' \
                                  '"config": {"units": 2}}]}}'
        f.attrs["keras_version"] = "2.15.0"
        f["model_weights/dense/kernel"] = np.ones((3, 2), dtype=np.float32)
    out["keras_h5"] = (buf.getvalue(), "model.h5")
    node = helper.make_node("Add", ["x", "y"], ["z"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "xy"],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
                              initializer=[helper.make_tensor("y", TensorProto.FLOAT, [2], [1.0, 2.0])])
    out["onnx"] = (helper.make_model(graph).SerializeToString(), "model.onnx")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        body = pickle.dumps({"a": [1, 2, 3]}, protocol=2)
        info = tarfile.TarInfo("inner/data.pkl")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    out["tar_gz"] = (buf.getvalue(), "bundle.tar.gz")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.pkl", pickle.dumps(list(range(50)), protocol=4))
        z.writestr("nested.zip", out["npz"][0])
    out["zip"] = (buf.getvalue(), "bundle.zip")
    onnx.checker.check_model(onnx.load_from_string(out["onnx"][0]))
    return out


@lru_cache(maxsize=1)
def pickles() -> dict[str, bytes]:
    """Pickle streams as the real writers make them (what the oracle mutations start from)."""
    import joblib
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    out: dict[str, bytes] = {}
    torch.manual_seed(0)
    with zipfile.ZipFile(io.BytesIO(containers()["torch_zip"][0])) as z:
        out["torch_data_pkl"] = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    out["torch_legacy"] = containers()["torch_legacy"][0][:4096]  # the pickles come first
    buf = io.BytesIO()
    joblib.dump({"w": np.arange(10, dtype=np.int16), "o": np.array([1, "a"], dtype=object)}, buf)
    out["joblib"] = buf.getvalue()
    model = LogisticRegression().fit(np.array([[0.0], [1.0], [2.0], [3.0]]), [0, 0, 1, 1])
    for proto in (2, 4, 5):
        out[f"sklearn_p{proto}"] = pickle.dumps(model, protocol=proto)
    npy = containers()["npy_object"][0]
    out["npy_object_pickle"] = npy[npy.index(b"\n", 10) + 1:]
    out["protocol0"] = pickle.dumps({"a": (1, 2.5, "x", None, True), "b": [b"\x00\x01"]}, protocol=0)
    return out
