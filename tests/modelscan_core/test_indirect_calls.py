"""Calls a loader makes without a REDUCE on the dangerous name itself: through trusted
helpers, importer functions, getattr, a planted `__setstate__`, nested payloads wrapped the
way protocol 2 wraps bytes. And the benign files that use the same mechanisms."""

from __future__ import annotations

import datetime
import os
import pickle
import struct
import zoneinfo

import numpy as np
import pytest

from modelscan_core.model import Severity

from .pickle_ops import Reduce, binunicode_op, global_op


g = global_op
s = binunicode_op


PAYLOAD = pickle.dumps(Reduce(os.system, ("touch /tmp/modelscand-indirect",)), protocol=2)


def test_call_laundered_through_a_trusted_rebuild_helper(scan_bytes):
    # torch._tensor._rebuild_from_type_v2(func, type, args, state) calls func(*args)
    for func in (g("someones_tools", "run_command"), g("torch.fx.graph_module", "_method_from_src")):
        data = (b"\x80\x02" + g("torch._tensor", "_rebuild_from_type_v2") + b"(" + func
                + g("torch", "Tensor") + b"(" + s("echo hi") + b"tN" + b"tR.")
        assert scan_bytes(data).worst >= Severity.HIGH


def test_nested_payload_wrapped_like_protocol_2_bytes(scan_bytes):
    # protocol 2 writes bytes as _codecs.encode(text, "latin1"): the nested pickle is still read
    wrapped = b"\x80\x02" + g("torch.storage", "_load_from_bytes") + g("_codecs", "encode") \
        + s(PAYLOAD.decode("latin-1")) + s("latin1") + b"\x86R\x85R."
    result = scan_bytes(wrapped)
    assert result.worst == Severity.CRITICAL
    assert any(":pickle@" in f.source for f in result.report.findings())


def test_nested_loader_with_a_computed_payload_fails_closed(scan_bytes):
    data = b"\x80\x02" + g("torch.storage", "_load_from_bytes") + g("someones_tools", "make_bytes") + b")R\x85R."
    assert "pickle/nested-unresolved" in scan_bytes(data).rules()


def test_joblib_unpickle_of_a_bytesio(scan_bytes):
    data = b"\x80\x02" + g("joblib.numpy_pickle", "_unpickle") + g("io", "BytesIO") + b"C" \
        + bytes([len(PAYLOAD)]) + PAYLOAD + b"\x85R\x89\x86R."
    result = scan_bytes(data)
    assert "posix.system" in result.names(Severity.CRITICAL)


def test_any_pickle_handed_to_a_trusted_helper_is_scanned(scan_bytes):
    data = b"\x80\x02" + g("collections", "OrderedDict") + b"C" + bytes([len(PAYLOAD)]) + PAYLOAD + b"\x85R."
    assert "posix.system" in scan_bytes(data).names(Severity.CRITICAL)


def test_importer_helpers_are_judged_by_the_names_they_import(scan_bytes):
    data = b"\x80\x02" + g("scipy._lib._uarray._backend", "unpickle_function") + s("posix") + s("system") + b"N\x87R" \
        + s("echo hi") + b"\x85R."
    assert scan_bytes(data).worst == Severity.CRITICAL


def test_planted_setstate_is_a_call_even_behind_many_keys(scan_bytes):
    # BUILD stores {"__setstate__": f} in the instance dict; the next BUILD calls f(state)
    filler = b"".join(s(f"k{i}") + b"N" for i in range(20))
    data = (b"\x80\x02" + g("argparse", "Namespace") + b")R" + b"}(" + filler + s("__setstate__")
            + g("someones_tools", "run_command") + b"ub" + s("echo hi") + b"b.")
    result = scan_bytes(data)
    assert result.worst >= Severity.HIGH
    assert "someones_tools.run_command" in result.names(Severity.HIGH)


def test_getattr_with_a_dunder_stays_critical(scan_bytes):
    data = b"\x80\x02" + g("builtins", "getattr") + g("builtins", "object") + s("__subclasses__") + b"\x86R)R."
    assert scan_bytes(data).worst == Severity.CRITICAL


def test_getattr_of_a_dangerous_method_is_judged_by_its_owner(scan_bytes):
    data = b"\x80\x02" + g("builtins", "getattr") + g("subprocess", "Popen") + s("communicate") + b"\x86R."
    assert scan_bytes(data).worst == Severity.CRITICAL


def test_capwords_functions_of_big_frameworks_are_not_trusted_as_classes(scan_bytes):
    data = b"\x80\x02" + g("tensorflow.python.platform.gfile", "DeleteRecursively") + s("/tmp/x") + b"\x85R."
    assert scan_bytes(data).worst >= Severity.HIGH


def test_pickle_starting_with_any_opcode_is_detected(scan_bytes):
    data = b"\x96" + struct.pack("<Q", 3) + b"abc0" + PAYLOAD[2:]
    result = scan_bytes(data, "pytorch_model.bin")
    assert result.file.format == "pickle"
    assert result.worst == Severity.CRITICAL


# -- the benign files that use the same mechanisms ------------------------------------------

def test_timezone_aware_datetime_via_getattr_is_clean(scan_bytes):
    value = datetime.datetime(2020, 1, 1, tzinfo=zoneinfo.ZoneInfo("UTC"))
    for proto in (2, 4):
        assert scan_bytes(pickle.dumps(value, protocol=proto)).verdict == "clean"


def test_knn_and_kdtree_models_are_clean(scan_bytes):
    from sklearn.datasets import load_iris
    from sklearn.neighbors import KernelDensity, KNeighborsClassifier

    x, y = load_iris(return_X_y=True)
    model = {"knn": KNeighborsClassifier().fit(x, y), "kde": KernelDensity().fit(x)}
    assert scan_bytes(pickle.dumps(model, protocol=4)).verdict == "clean"


def test_simple_namespace_and_bound_methods_of_built_objects_are_clean(scan_bytes):
    import types

    import torch

    class Holder:
        pass

    net = torch.nn.Linear(2, 2)
    value = {"ns": types.SimpleNamespace(a=1), "fwd": net.forward}
    result = scan_bytes(pickle.dumps(value, protocol=4))
    assert result.worst is None or result.worst < Severity.HIGH, result.report.findings()


def test_legacy_torch_whole_model_is_not_a_dynamic_call(tmp_path):
    import torch

    from modelscan_core import scan_path

    path = tmp_path / "legacy_whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), path, _use_new_zipfile_serialization=False)
    report = scan_path(path)
    assert report.files[0].verdict.value == "clean", report.findings()


@pytest.mark.parametrize("compress", [0, 3])
def test_ml_dtypes_arrays_in_joblib_are_clean(tmp_path, compress):
    import joblib
    import ml_dtypes

    from modelscan_core import scan_path

    path = tmp_path / "bf16.joblib"
    joblib.dump({"w": np.ones(5, dtype=ml_dtypes.bfloat16), "after": [1, 2]}, path, compress=compress)
    report = scan_path(path)
    assert report.files[0].verdict.value == "clean", (report.findings(), report.all_errors())


@pytest.mark.parametrize("descr", ["i4,O", "(2,)O", "<i4,|O8"])
def test_npy_with_an_object_field_anywhere_is_scanned_as_a_pickle(tmp_path, descr):
    from modelscan_core import scan_path

    header = repr({"descr": descr, "fortran_order": False, "shape": (1,)}).encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    path = tmp_path / "x.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + PAYLOAD)
    assert scan_path(path).findings()[0].severity == Severity.CRITICAL


def test_joblib_wrapper_named_through_a_dotted_path_still_frames_arrays(tmp_path):
    import joblib

    from modelscan_core import scan_path

    path = tmp_path / "m.joblib"
    joblib.dump({"a": np.arange(5, dtype=np.uint8), "evil": Reduce(os.system, ("touch /tmp/x",))}, path)
    data = path.read_bytes().replace(b"\x8c\x13joblib.numpy_pickle\x94\x8c\x11NumpyArrayWrapper",
                                     b"\x8c\x06joblib\x94\x8c\x1enumpy_pickle.NumpyArrayWrapper")
    assert b"numpy_pickle.NumpyArrayWrapper" in data
    path.write_bytes(data)
    report = scan_path(path)
    assert "system" in {f.operator for f in report.findings() if f.severity == Severity.CRITICAL}


# -- round two: trust that was too wide, more planted methods, more formats --------------------

@pytest.mark.parametrize("module,name", [
    ("torch.jit.unsupported_tensor_ops", "execWrapper"),  # camelCase is not a class
    ("tf_keras.src.engine.functional", "reconstruct_from_config"),  # public API, not a pickle helper
])
def test_ecosystem_functions_that_run_code_are_not_trusted(scan_bytes, module, name):
    data = b"\x80\x02" + g(module, name) + s("print(1)") + b"\x85R."
    assert scan_bytes(data).worst >= Severity.HIGH


def test_dangerous_names_re_exported_by_ecosystem_modules(scan_bytes):
    # find_class returns the object itself: tempfile.NamedTemporaryFile, seen through sklearn
    data = b"\x80\x02" + g("sklearn.datasets._base", "NamedTemporaryFile") + b")R."
    assert scan_bytes(data).worst == Severity.CRITICAL


@pytest.mark.parametrize("attribute,trigger", [("append", b"N" + b"a"), ("extend", b"(N" + b"e"), ("add", b"(N" + b"\x90")])
def test_methods_planted_through_build_are_called_by_later_opcodes(scan_bytes, attribute, trigger):
    data = (b"\x80\x02" + g("argparse", "Namespace") + b")R" + b"}" + s(attribute)
            + g("someones_tools", "run_command") + b"sb" + trigger + b".")
    assert "someones_tools.run_command" in scan_bytes(data).names(Severity.HIGH)


def test_setstate_planted_through_an_ordereddict_state(scan_bytes):
    data = (b"\x80\x02" + g("argparse", "Namespace") + b")R" + g("collections", "OrderedDict") + b"]" + s("__setstate__")
            + g("someones_tools", "run_command") + b"\x86a\x85Rb" + s("echo") + b"b.")
    assert "someones_tools.run_command" in scan_bytes(data).names(Severity.HIGH)


def test_text_format_savedmodel_is_read(scan_bytes):
    text = b'saved_model_schema_version: 1\nmeta_graphs {\n  graph_def {\n    node {\n      name: "w"\n' \
           b'      op: "WriteFile"\n    }\n  }\n}\n'
    result = scan_bytes(text, "saved_model.pbtxt")
    assert result.file.format == "tf_savedmodel_text"
    assert result.worst >= Severity.HIGH


def test_tar_with_a_base256_checksum_is_still_read(tmp_path):
    import io
    import tarfile

    from modelscan_core import scan_path

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("archive/data.pkl")
        info.size = len(PAYLOAD)
        tar.addfile(info, io.BytesIO(PAYLOAD))
    data = bytearray(buf.getvalue())
    header = data[:512]
    header[148:156] = b" " * 8
    checksum = sum(header)
    data[148:156] = b"\x80" + checksum.to_bytes(7, "big")  # base-256, as tarfile.nti reads it
    tarfile.open(fileobj=io.BytesIO(bytes(data))).getmembers()  # Python's tarfile accepts it
    path = tmp_path / "model.tar"
    path.write_bytes(bytes(data))
    report = scan_path(path)
    assert Severity.CRITICAL in {f.severity for f in report.findings()}


@pytest.mark.parametrize("first", [b"X" + struct.pack("<I", 9 << 20) + b"a" * (9 << 20),
                                   b"S'" + b"a" * (9 << 20) + b"'\n"])
def test_pickle_opening_with_an_operand_longer_than_any_window(scan_bytes, first):
    result = scan_bytes(first + b"0" + PAYLOAD[2:], "pytorch_model.bin")
    assert result.file.format == "pickle" and result.worst == Severity.CRITICAL


def test_long_nested_payload_wrapped_like_protocol_2_bytes(scan_bytes):
    # longer than the VM keeps inline: the text stays in the file and is read back for the scan
    big = pickle.dumps(Reduce(os.system, ("x" * 6000,)), protocol=2)
    data = b"\x80\x02" + g("collections", "OrderedDict") + g("_codecs", "encode") + s(big.decode("latin-1")) \
        + s("latin1") + b"\x86R\x85R."
    result = scan_bytes(data)
    assert any(f.severity == Severity.CRITICAL and ":pickle@" in f.source for f in result.report.findings())
