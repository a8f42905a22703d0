"""Real files must stay clean: what installed packages ship, and what real libraries write.

- Every model-like file shipped by the packages of the test environment (joblib's Python 2
  era pickles, numpy's and scipy's test data, torch's test archives...), found and scanned by
  scripts/scan_shipped_models.py: zero HIGH/CRITICAL findings.
- A benign corpus generated from the installed libraries: every scikit-learn estimator that
  fits on a small dataset, every torch.nn module that builds with default arguments, every
  numpy dtype, scipy's sparse formats and frozen distributions, networkx graphs, values of
  the standard library; pickled with several protocols, joblib-dumped and torch-saved. Zero
  HIGH/CRITICAL findings.
"""

from __future__ import annotations

import io
import pickle
import sys
import warnings
from pathlib import Path

import pytest

from modelscan_core import scan_path
from modelscan_core.model import Severity

from .policy_util import describe, scan, settings

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import scan_shipped_models  # noqa: E402


@pytest.mark.slow
def test_model_files_shipped_by_installed_packages_have_no_high_finding():
    files = scan_shipped_models.model_files(scan_shipped_models.default_roots())
    assert len(files) > 500, len(files)
    pickles = 0
    flagged = []
    for path, report, high in scan_shipped_models.scan_all(files):
        pickles += sum(f.format in ("pickle", "joblib_zfile", "pytorch_zip") for f in scan_shipped_models._walk(report.files))
        if high:
            flagged.append((str(path), [(f.severity.name, f.rule_id, f.module, f.operator) for f in high]))
    assert pickles > 50, pickles
    assert not flagged, flagged[:10]


# -- a benign corpus written by the real libraries ------------------------------------------------

def _sklearn_models():
    from sklearn.datasets import make_classification, make_regression
    from sklearn.utils import all_estimators

    xc, yc = make_classification(n_samples=40, n_features=6, n_informative=3, random_state=0)
    xr, yr = make_regression(n_samples=40, n_features=6, random_state=0)
    xc = abs(xc)  # some estimators want non-negative features
    for name, cls in all_estimators():
        try:
            model = cls()
        except Exception:  # noqa: BLE001 - estimators that need arguments
            continue
        kind = getattr(model, "_estimator_type", "")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if kind == "regressor":
                    model.fit(xr, yr)
                elif kind in ("classifier", "clusterer", "outlier_detector") or hasattr(model, "fit"):
                    model.fit(xc, yc)
            except Exception:  # noqa: BLE001 - unfitted models pickle too
                pass
        yield f"sklearn.{name}", model


def _torch_modules():
    import inspect

    import torch

    for name, cls in sorted(vars(torch.nn).items()):
        if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)) or name.startswith("_"):
            continue
        for args in ((), (4,), (4, 4), (4, 4, 3)):
            try:
                module = cls(*args)
            except Exception:  # noqa: BLE001 - needs other arguments
                continue
            yield f"torch.nn.{name}", module
            break


def _numpy_scipy_values():
    import networkx
    import numpy as np
    import scipy.sparse
    import scipy.stats

    for code in sorted(set(np.typecodes["All"])):
        try:
            yield f"numpy dtype {code}", {"a": np.zeros(3, dtype=code), "s": np.zeros(1, dtype=code)[0]}
        except Exception:  # noqa: BLE001
            continue
    yield "numpy structured", np.array([(1, 2.0, "x")], dtype=[("a", "i4"), ("b", "f8"), ("c", "U3")])
    yield "numpy masked", np.ma.masked_array([1, 2, 3], [0, 1, 0])
    yield "numpy generators", [np.random.default_rng(0), np.random.RandomState(1), np.random.Generator(np.random.PCG64DXSM(2))]
    dense = np.eye(4)
    for fmt in ("csr", "csc", "coo", "bsr", "dia", "lil", "dok"):
        yield f"scipy.sparse {fmt}", scipy.sparse.coo_matrix(dense).asformat(fmt)
        yield f"scipy.sparse {fmt} array", scipy.sparse.coo_array(dense).asformat(fmt)
    for name in ("norm", "expon", "gamma", "beta", "uniform", "poisson", "binom", "t", "lognorm", "weibull_min"):
        dist = getattr(scipy.stats, name)
        shapes = (2.0,) * (dist.numargs or 0)
        if name == "binom":
            shapes = (5, 0.5)
        yield f"scipy.stats {name}", dist(*shapes)
    yield "networkx graph", networkx.karate_club_graph()
    yield "networkx digraph", networkx.gn_graph(20, seed=1)


def _stdlib_values():
    import argparse
    import array
    import collections
    import datetime
    import decimal
    import fractions
    import functools
    import http
    import ipaddress
    import os
    import pathlib
    import re
    import signal
    import socket
    import time
    import types
    import typing
    import uuid
    import zoneinfo

    yield "stdlib values", {
        "od": collections.OrderedDict(a=1), "dd": collections.defaultdict(list, a=[1]), "deque": collections.deque([1]),
        "counter": collections.Counter("abc"), "chain": collections.ChainMap({"a": 1}), "dt": datetime.datetime.now(),
        "tz": datetime.datetime(2024, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")), "dec": decimal.Decimal("1.1"),
        "frac": fractions.Fraction(1, 3), "uuid": uuid.uuid4(), "ip": ipaddress.ip_network("10.0.0.0/8"),
        "path": pathlib.PurePosixPath("/data/model"), "ns": argparse.Namespace(lr=0.1), "re": re.compile(r"\w+", re.I),
        "arr": array.array("d", [1.0]), "sns": types.SimpleNamespace(a=1), "partial": functools.partial(int, base=2),
        "status": http.HTTPStatus.NOT_FOUND, "sig": signal.SIGINT, "family": socket.AF_INET6, "stat": os.stat(__file__),
        "time": time.gmtime(0), "hint": typing.Optional[typing.List[int]], "slice": slice(1, 2), "range": range(3),
        "complex": 1j, "bytes": bytearray(b"xy"), "frozen": frozenset({1}), "none": type(None),
        "flags": re.IGNORECASE | re.MULTILINE, "ssl": __import__("ssl").TLSVersion.TLSv1_3,
    }


def _corpus():
    yield from (_assert_picklable(*item) for item in _stdlib_values())
    yield from _numpy_scipy_values()
    yield from _sklearn_models()
    yield from _torch_modules()


def _assert_picklable(label, value):
    pickle.dumps(value, protocol=2)  # a value that cannot be pickled would test nothing
    return label, value


def _writers(value):
    """(label, bytes) for each way a library would write the value."""
    import joblib
    import torch

    for protocol in (0, 2, 4, 5):
        try:
            yield f"pickle protocol {protocol}", pickle.dumps(value, protocol=protocol), "model.pkl"
        except Exception:  # noqa: BLE001 - some values need protocol 2+
            continue
    for compress in (0, 3):
        buf = io.BytesIO()
        try:
            joblib.dump(value, buf, compress=compress)
        except Exception:  # noqa: BLE001
            continue
        yield f"joblib compress={compress}", buf.getvalue(), "model.joblib"
    if isinstance(value, torch.nn.Module):
        for whole in (False, True):
            buf = io.BytesIO()
            torch.save(value if whole else value.state_dict(), buf)
            yield f"torch.save {'module' if whole else 'state_dict'}", buf.getvalue(), "model.pt"


@pytest.mark.slow
def test_generated_benign_corpus_has_no_high_finding():
    files = 0
    flagged = []
    for label, value in _corpus():
        for writer, data, name in _writers(value):
            files += 1
            result = scan(data, name)
            high = [f for f in result.report.findings() if f.severity >= Severity.HIGH]
            if high or result.file.errors:
                flagged.append((label, writer, describe(result), result.file.errors[:1]))
    assert files > 1000, files
    # (pickle.load's reading of a joblib file, which runs an object array's own pickle with the
    # outer memo, reports only denylisted names: scanner._other_readings)
    assert not flagged, flagged[:10]
