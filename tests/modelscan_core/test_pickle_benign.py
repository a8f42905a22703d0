"""Real benign pickles from the real libraries must never be reported at HIGH or CRITICAL.

Fixtures are produced at test time. torch files are zip archives; here the pickle inside
(`data.pkl`) is taken out with zipfile (our own file, written a moment ago) so that the
pickle policy is tested on exactly what torch writes.
"""

from __future__ import annotations

import argparse
import collections
import io
import pathlib
import pickle
import pickletools
import zipfile

import pytest

from modelscan_core.model import Severity


def torch_pickle(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        return zf.read(name)


class TinyNet:
    """Built lazily so torch is imported only by the tests that need it."""

    @staticmethod
    def make():
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 8, 3)
                self.bn = torch.nn.BatchNorm2d(8)
                self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2), torch.nn.GELU())
                self.act = torch.nn.functional.relu

        Net.__module__ = "my_project.models"
        Net.__qualname__ = "Net"
        return Net()


def benign_fixtures():
    import numpy as np

    def torch_state_dict():
        import torch

        return torch_pickle(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)).state_dict())

    def torch_whole_module():
        import sys
        import types

        net = TinyNet.make()
        package, module = types.ModuleType("my_project"), types.ModuleType("my_project.models")
        module.Net = type(net)
        package.models = module
        sys.modules.update({"my_project": package, "my_project.models": module})
        try:
            return torch_pickle(net)
        finally:
            del sys.modules["my_project.models"], sys.modules["my_project"]

    def torch_training_checkpoint():
        import torch

        model = torch.nn.Linear(4, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
        scaler = torch.amp.GradScaler("cpu")
        return torch_pickle({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=0.1, out=pathlib.PosixPath("/tmp/run")),
            "rng": torch.get_rng_state(), "np_rng": np.random.get_state(), "dtype": torch.bfloat16,
            "device": torch.device("cpu"), "size": torch.Size([2, 3]),
        })

    def torch_quantized_and_sparse():
        import torch

        q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
        return torch_pickle({"q": q, "sparse": torch.randn(3, 3).to_sparse(), "param": torch.nn.Parameter(torch.ones(2))})

    def numpy_arrays():
        return pickle.dumps({"a": np.arange(10), "b": np.zeros((3, 3), dtype=np.float16), "s": np.float64(1.5),
                             "rec": np.array([(1, 2.0)], dtype=[("x", "i4"), ("y", "f8")]),
                             "obj": np.array([1, "x", None], dtype=object), "masked": np.ma.masked_array([1, 2], [0, 1])},
                            protocol=4)

    def numpy_rng_states():
        return pickle.dumps({"gen": np.random.default_rng(1), "legacy": np.random.RandomState(2),
                             "seq": np.random.SeedSequence(3), "state": np.random.get_state()}, protocol=2)

    def sklearn_pipeline():
        from sklearn.datasets import make_classification
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        X, y = make_classification(n_samples=60, n_features=5, random_state=0)
        pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression())]).fit(X, y)
        forest = RandomForestClassifier(n_estimators=3, random_state=0).fit(X, y)
        return pickle.dumps({"pipe": pipe, "forest": forest}, protocol=5)

    def stdlib_values():
        import datetime
        import decimal
        import enum
        import fractions
        import uuid

        class Color(enum.Enum):
            RED = 1

        return pickle.dumps({
            "od": collections.OrderedDict(a=1), "dd": collections.defaultdict(list), "deque": collections.deque([1]),
            "counter": collections.Counter("aab"), "set": {1, 2}, "frozen": frozenset({3}), "bytes": b"\x00" * 10,
            "ba": bytearray(b"xy"), "complex": 1 + 2j, "slice": slice(1, 5), "range": range(3),
            "dt": datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc), "td": datetime.timedelta(1),
            "dec": decimal.Decimal("1.5"), "frac": fractions.Fraction(1, 3), "uuid": uuid.UUID(int=1),
            "path": pathlib.PurePosixPath("/a"), "ns": argparse.Namespace(x=1),
        }, protocol=2)

    def dill_plain_data():
        import dill

        return dill.dumps({"a": [1, 2.5, "x"], "b": (None, True), "c": {"nested": b"bytes"}})

    def cloudpickle_plain_data():
        import cloudpickle

        return cloudpickle.dumps({"a": [1, 2.5, "x"], "b": collections.OrderedDict(k=1)})

    def protocol0_data():
        return pickle.dumps({"a": [1, 2, 3], "b": "text", "c": 1.5, "d": None, "e": collections.OrderedDict()}, protocol=0)

    return {
        "torch state dict": torch_state_dict,
        "torch whole module with a user class": torch_whole_module,
        "torch training checkpoint": torch_training_checkpoint,
        "torch quantized and sparse tensors": torch_quantized_and_sparse,
        "numpy arrays": numpy_arrays,
        "numpy RNG states": numpy_rng_states,
        "sklearn pipeline and forest": sklearn_pipeline,
        "stdlib values": stdlib_values,
        "dill plain data": dill_plain_data,
        "cloudpickle plain data": cloudpickle_plain_data,
        "protocol 0 data": protocol0_data,
    }


BENIGN = benign_fixtures()


@pytest.mark.parametrize("label", sorted(BENIGN))
def test_benign_pickles_are_not_high(scan_bytes, label):
    result = scan_bytes(BENIGN[label]())
    assert result.file.errors == (), result.file.errors
    high = [f for f in result.report.findings() if f.severity >= Severity.HIGH]
    assert not high, high


@pytest.mark.parametrize(
    "label", ["torch state dict", "torch training checkpoint", "numpy arrays", "stdlib values", "dill plain data",
              "cloudpickle plain data", "protocol 0 data", "sklearn pipeline and forest"],
)
def test_common_benign_pickles_are_clean(scan_bytes, label):
    result = scan_bytes(BENIGN[label]())
    assert result.verdict == "clean", result.report.findings()
    assert result.report.exit_code == 0


def test_user_class_is_reported_low_with_its_name(scan_bytes):
    result = scan_bytes(BENIGN["torch whole module with a user class"]())
    findings = result.report.findings()
    assert {f.severity for f in findings} == {Severity.LOW}
    assert "my_project.models.Net" in result.names()


def _frame_split_pickle() -> bytes:
    """A benign protocol-4 pickle whose FRAME boundary falls between STACK_GLOBAL operands.

    The pickler may close a 64 KiB frame before any save(), including the save of a global's
    name right after its module string: pad the data until that happens.
    """
    for pad in range(0, 400):
        data = pickle.dumps(["a" * pad] + [f"{i:0100d}" for i in range(634)] + [collections.OrderedDict(a=1)], protocol=4)
        ops = list(pickletools.genops(data))
        frames = [pos for op, arg, pos in ops if op.name == "FRAME"]
        strings = [(i, pos) for i, (op, arg, pos) in enumerate(ops) if arg == "collections"]
        for i, module_pos in strings:
            end = next(pos for op, arg, pos in ops[i:] if op.name == "STACK_GLOBAL")
            if any(module_pos < f < end for f in frames):
                return data
    raise AssertionError("no padding put a FRAME inside the STACK_GLOBAL operands")


def test_frame_boundary_between_stack_global_operands(scan_bytes):
    data = _frame_split_pickle()
    result = scan_bytes(data)
    assert result.verdict == "clean", result.report.findings()


def test_op_dense_pickle_is_clean_and_complete(scan_bytes):
    data = pickle.dumps([[i, str(i)] for i in range(200_000)], protocol=4)
    result = scan_bytes(data)
    assert result.verdict == "clean"


def test_enum_members_by_dotted_name_and_ufunc_references(scan_bytes):
    from sklearn.preprocessing import FunctionTransformer
    import numpy as np

    module, name = b"transformers.trainer_utils", b"IntervalStrategy.STEPS"
    data = b"\x80\x04\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name + b"\x93."
    assert scan_bytes(data).verdict == "clean"
    assert scan_bytes(pickle.dumps(FunctionTransformer(np.log1p), protocol=4)).verdict == "clean"
