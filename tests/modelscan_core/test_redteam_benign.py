"""The benign side of the red team: what real checkpoints hold that other corpora may lack.

Written by the real libraries (torch, numpy, sklearn, pandas, omegaconf). Hugging Face's `training_args.bin` and Lightning checkpoints are written with
stand-ins for `transformers`/`accelerate`/`lightning` (not test dependencies): classes with
the same modules, names and shapes (a dataclass of str-enums, an AttributeDict, callback
states keyed by their repr), so the pickles name exactly what the real ones name. Each must
scan with nothing HIGH or worse, written by pickle (protocols 2-5), joblib and torch.save.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import io
import pathlib
import pickle
import sys
import types
import zoneinfo

import pytest

from modelscan_core.model import Severity

from .policy_util import describe, scan


def _module(name: str) -> types.ModuleType:
    """A stand-in module registered under a real package's name (parents included)."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    return sys.modules[name]


def _define(module: str, cls):
    cls.__module__ = module
    cls.__qualname__ = cls.__name__
    setattr(_module(module), cls.__name__, cls)
    return cls


def _hf_training_args():
    """transformers' TrainingArguments as Trainer saves it (torch.save(args, training_args.bin))."""

    class ExplicitEnum(str, enum.Enum):
        @classmethod
        def _missing_(cls, value):
            raise ValueError(value)

    IntervalStrategy = _define("transformers.trainer_utils",
                               ExplicitEnum("IntervalStrategy", {"NO": "no", "STEPS": "steps", "EPOCH": "epoch"}))
    SchedulerType = _define("transformers.trainer_utils", ExplicitEnum("SchedulerType", {"LINEAR": "linear", "COSINE": "cosine"}))
    HubStrategy = _define("transformers.trainer_utils", ExplicitEnum("HubStrategy", {"EVERY_SAVE": "every_save"}))
    OptimizerNames = _define("transformers.training_args", ExplicitEnum("OptimizerNames", {"ADAMW_TORCH": "adamw_torch"}))
    DistributedType = _define("accelerate.utils.dataclasses", ExplicitEnum("DistributedType", {"NO": "NO", "MULTI_GPU": "MULTI_GPU"}))

    @dataclasses.dataclass
    class AcceleratorConfig:
        split_batches: bool = False
        dispatch_batches: bool | None = None
        even_batches: bool = True
        gradient_accumulation_kwargs: dict | None = None

    @dataclasses.dataclass
    class TrainingArguments:
        output_dir: str = "/home/user/runs/bert-finetuned"
        logging_dir: str = "/home/user/runs/bert-finetuned/runs/Nov29_02-28-40_host"
        eval_strategy: object = None
        save_strategy: object = None
        lr_scheduler_type: object = None
        hub_strategy: object = None
        optim: object = None
        learning_rate: float = 5e-5
        report_to: list = dataclasses.field(default_factory=lambda: ["tensorboard"])
        accelerator_config: object = None
        fsdp_config: dict = dataclasses.field(default_factory=lambda: {"min_num_params": 0, "xla": False})
        deepspeed: str | None = None
        run_name: str = "/home/user/runs/bert-finetuned"
        _n_gpu: int = 1
        distributed_type: object = None

    _define("transformers.trainer_pt_utils", AcceleratorConfig)
    _define("transformers.training_args", TrainingArguments)
    return TrainingArguments(eval_strategy=IntervalStrategy.STEPS, save_strategy=IntervalStrategy.EPOCH,
                             lr_scheduler_type=SchedulerType.COSINE, hub_strategy=HubStrategy.EVERY_SAVE,
                             optim=OptimizerNames.ADAMW_TORCH, accelerator_config=AcceleratorConfig(),
                             distributed_type=DistributedType.MULTI_GPU)


def _lightning_checkpoint():
    """A Lightning .ckpt: hyper_parameters in an AttributeDict, callback states keyed by their
    repr, optimizer and scheduler states, an omegaconf config."""
    import torch

    class AttributeDict(dict):
        def __getattr__(self, key):
            try:
                return self[key]
            except KeyError as e:
                raise AttributeError(key) from e

    _define("lightning_fabric.utilities.data", AttributeDict)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    hparams = AttributeDict(lr=1e-3, hidden=4, data_dir="/data/imagenet", activation="relu",
                            log_dir=pathlib.PosixPath("/home/user/lightning_logs"))
    from omegaconf import OmegaConf

    hparams["cfg"] = OmegaConf.create({"model": {"name": "resnet", "lr": "${lr}"}, "lr": 0.1, "paths": ["/a", "/b"]})
    return {
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0", "state_dict": model.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
                      "'every_n_epochs': 1, 'train_time_interval': None}": {
                          "monitor": "val_loss", "best_model_score": torch.tensor(0.25),
                          "best_model_path": "/home/user/lightning_logs/version_0/checkpoints/epoch=2.ckpt",
                          "dirpath": "/home/user/lightning_logs/version_0/checkpoints", "best_k_models": {},
                          "kth_best_model_path": "", "last_model_path": ""},
                      "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {"wait_count": 0, "stopped_epoch": 0,
                                                                                "best_score": torch.tensor(0.25), "patience": 3}},
        "optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()],
        "hparams_name": "kwargs", "hyper_parameters": hparams,
    }


def _warmup(step):
    return min(1.0, (step + 1) / 10)


def _optimizers_and_schedulers():
    """Every LR scheduler's state next to its optimizer's; LambdaLR keeps a named function."""
    import torch

    out = {}
    for name in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam", "ASGD", "Rprop"):
        model = torch.nn.Linear(3, 2)
        opt = getattr(torch.optim, name)(model.parameters(), lr=0.01)
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        out[name] = opt.state_dict()
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    lr = torch.optim.lr_scheduler
    schedulers = [lr.StepLR(opt, 2), lr.MultiStepLR(opt, [2, 4]), lr.ExponentialLR(opt, 0.9),
                  lr.CosineAnnealingLR(opt, 10), lr.CosineAnnealingWarmRestarts(opt, 5), lr.CyclicLR(opt, 0.01, 0.1),
                  lr.OneCycleLR(opt, 0.1, total_steps=10), lr.ReduceLROnPlateau(opt), lr.PolynomialLR(opt),
                  lr.LinearLR(opt), lr.ConstantLR(opt), lr.LambdaLR(opt, _warmup), lr.MultiplicativeLR(opt, _warmup)]
    out["schedulers"] = [s.state_dict() for s in schedulers]
    out["lambda_scheduler_object"] = lr.LambdaLR(opt, _warmup)  # whole object: the function by name
    return out


def _pandas_values():
    import pandas as pd
    import numpy as np

    return {
        "frame": pd.DataFrame({"a": [1, 2], "b": ["x", "y"], "c": pd.Categorical(["u", "v"]),
                               "d": pd.to_datetime(["2020-01-01", "2021-01-01"]).tz_localize("Europe/Paris"),
                               "e": pd.array([1, None], dtype="Int64"), "f": pd.array(["s", None], dtype="string"),
                               "g": [datetime.timedelta(1), datetime.timedelta(2)], "h": pd.arrays.SparseArray([0, 1])}),
        "ts_zoneinfo": pd.Timestamp("2020-01-01", tz=zoneinfo.ZoneInfo("UTC")),
        "series_dateutil": pd.Series(pd.date_range("2020", periods=3, tz="dateutil/America/New_York")),
        "multi": pd.DataFrame(np.zeros((4, 2)), index=pd.MultiIndex.from_product([["a", "b"], [1, 2]])),
        "periods": pd.period_range("2020", periods=3, freq="M"), "intervals": pd.interval_range(0, 3),
        "ordered": pd.Categorical(["lo", "hi"], categories=["lo", "hi"], ordered=True), "offset": pd.offsets.BDay(2),
    }


def _sklearn_with_functions():
    import numpy as np
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    pipe = make_pipeline(FunctionTransformer(np.log1p, inverse_func=np.expm1), StandardScaler())
    pipe.fit(np.abs(np.random.default_rng(0).normal(size=(8, 3))))
    cols = ColumnTransformer([("log", FunctionTransformer(np.log1p), [0]), ("sq", FunctionTransformer(np.square), [1])])
    return {"pipeline": pipe, "columns": cols, "args": argparse.Namespace(data=pathlib.PosixPath("/data/x"), seed=0),
            "rng": np.random.default_rng(3).bit_generator.state}


CASES = {
    "hf training_args.bin": _hf_training_args,
    "lightning checkpoint": _lightning_checkpoint,
    "optimizers and schedulers": _optimizers_and_schedulers,
    "pandas values": _pandas_values,
    "sklearn with numpy ufuncs": _sklearn_with_functions,
}


def _writes(value):
    import joblib
    import torch

    for protocol in (2, 4, 5):
        yield f"pickle {protocol}", pickle.dumps(value, protocol=protocol), "model.pkl"
    buf = io.BytesIO()
    joblib.dump(value, buf)
    yield "joblib", buf.getvalue(), "model.joblib"
    buf = io.BytesIO()
    torch.save(value, buf)
    yield "torch.save", buf.getvalue(), "model.pt"


@pytest.mark.parametrize("label", sorted(CASES))
def test_real_checkpoint_shapes_have_no_high_finding(label):
    value = CASES[label]()
    for writer, data, name in _writes(value):
        result = scan(data, name)
        high = [f for f in describe(result) if Severity[f[0]] >= Severity.HIGH]
        assert not high, (label, writer, high)
        assert not result.file.errors, (label, writer, result.file.errors)


PY2_PICKLES = {
    # what Python 2 writes: copy_reg reconstructors, __builtin__ names, str as bytes, old numpy
    "object with state": b"ccopy_reg\n_reconstructor\np0\n(c__main__\nConfig\np1\nc__builtin__\nobject\np2\nNtp3\nRp4\n"
                         b"(dp5\nS'lr'\np6\nF0.1\nsS'path'\np7\nS'/data/run'\np8\nsb.",
    "set and unicode": b"\x80\x02c__builtin__\nset\nq\x00]q\x01(U\x01aq\x02X\x01\x00\x00\x00bq\x03e\x85q\x04Rq\x05.",
    "numpy array": b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01K\x00\x85q\x02U\x01bq\x03"
                   b"\x87q\x04Rq\x05(K\x01K\x02\x85q\x06cnumpy\ndtype\nq\x07U\x02f8q\x08K\x00K\x01\x87q\tRq\n"
                   b"(K\x03U\x01<q\x0bNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x0cb\x89U\x10" + b"\x00" * 16 + b"tq\rb.",
    "ordered dict and datetime": b"\x80\x02ccollections\nOrderedDict\nq\x00]q\x01]q\x02(U\x01aq\x03cdatetime\ndatetime\n"
                                 b"q\x04U\n\x07\xe4\x01\x01\x00\x00\x00\x00\x00\x00q\x05\x85q\x06Rq\x07ea\x85q\x08Rq\t.",
}


@pytest.mark.parametrize("label", sorted(PY2_PICKLES))
def test_python2_pickles_have_no_high_finding(label):
    result = scan(PY2_PICKLES[label])
    assert result.worst is None or result.worst < Severity.HIGH, describe(result)
    assert not result.file.errors, result.file.errors


def _dill_plain_values():
    import numpy as np
    import pandas as pd

    return {"frame": pd.DataFrame({"a": [1, 2], "s": ["x", "y"], "c": pd.Categorical(["u", "v"])}),
            "series": pd.Series([1.5, None], index=pd.RangeIndex(2)), "array": np.arange(6).reshape(2, 3),
            "slices": [slice(0, 1, 1), slice(None)], "types": [int, type(None), slice], "nested": {"k": [1, (2, 3)]}}


@pytest.mark.parametrize("byref", [False, True])
def test_dill_dumps_of_plain_data_have_no_high_finding(byref):
    """dill writes slices, types and arrays through its own helpers (`_load_type('slice')(0, 1, 1)`
    handed to pandas' block unpickler): a value a plain type made is no callable."""
    import dill

    value = _dill_plain_values()
    for protocol in (2, 3, 4, 5):
        result = scan(dill.dumps(value, protocol=protocol, byref=byref))
        high = [f for f in describe(result) if Severity[f[0]] >= Severity.HIGH]
        assert not high, (protocol, high)
