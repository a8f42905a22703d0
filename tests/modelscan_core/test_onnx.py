"""ONNX: external data that leaves the model's directory (HIGH), foreign operator domains (LOW).

Benign files are written by the real `onnx` package (its helper API, its external-data
writer, and the models of its own backend test suite); malicious ones are the same models
with an `external_data` location edited, wherever a tensor can sit.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from modelscan_core import scan_path
from modelscan_core.model import Severity

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

FLOAT = TensorProto.FLOAT


def io_info(name: str):
    return helper.make_tensor_value_info(name, FLOAT, [4])


def ext_tensor(name: str, location: str) -> TensorProto:
    t = TensorProto(name=name, data_type=FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def const_node(out: str, tensor: TensorProto):
    return helper.make_node("Constant", [], [out], value=tensor)


def model(nodes, inits=(), sparse=(), functions=(), opsets=None, training=None, outputs=("y",)):
    graph = helper.make_graph(list(nodes), "g", [io_info("x")], [io_info(o) for o in outputs], initializer=list(inits),
                              sparse_initializer=list(sparse))
    m = helper.make_model(graph, functions=list(functions),
                          opset_imports=opsets or [helper.make_opsetid("", 17)])
    if training is not None:
        m.training_info.append(training)
    return m


def subgraph(nodes, inits=()):
    return helper.make_graph(list(nodes), "body", [], [io_info("s")], initializer=list(inits))


def placements(location: str) -> dict:
    """The same external tensor wherever a model can hold one."""
    t = lambda: ext_tensor("w", location)  # noqa: E731
    add = helper.make_node("Add", ["x", "w"], ["y"])
    sparse = helper.make_sparse_tensor(ext_tensor("sv", location), numpy_helper.from_array(np.array([0], np.int64), "si"), [4])
    cond = helper.make_node("If", ["c"], ["y"], then_branch=subgraph([helper.make_node("Identity", ["w"], ["s"])], [t()]),
                            else_branch=subgraph([const_node("s", t())]))
    loop = helper.make_node("Loop", ["", "c"], ["y"], body=subgraph([const_node("s", t())]))
    scan = helper.make_node("Scan", ["x"], ["y"], num_scan_inputs=1, body=subgraph([const_node("s", t())]))
    fn = helper.make_function("local", "Payload", ["a"], ["b"], [const_node("b", t())], [helper.make_opsetid("", 17)])
    training = onnx.TrainingInfoProto(initialization=subgraph([const_node("s", t())]))
    return {
        "initializer": model([add], inits=[t()]),
        "sparse_initializer": model([helper.make_node("Identity", ["x"], ["y"])], sparse=[sparse]),
        "constant": model([const_node("w", t()), add]),
        "sparse_constant": model([helper.make_node("Constant", [], ["y"], sparse_value=sparse)]),
        "if_subgraph": model([cond]),
        "loop_body": model([loop]),
        "scan_body": model([scan]),
        "function": model([helper.make_node("Payload", ["x"], ["y"], domain="local")], functions=[fn],
                          opsets=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]),
        "training_info": model([helper.make_node("Identity", ["x"], ["y"])], training=training),
    }


def save(m, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, path)
    return path


# -- benign ------------------------------------------------------------------------------------


def test_models_with_inline_and_sibling_external_data_are_clean(tmp_path):
    w = numpy_helper.from_array(np.ones(4096, np.float32), "w")
    m = model([helper.make_node("Add", ["x", "w"], ["y"])], inits=[w])
    save(m, tmp_path / "inline" / "model.onnx")
    (tmp_path / "ext").mkdir()
    onnx.save_model(m, tmp_path / "ext" / "model.onnx", save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    report = scan_path(tmp_path)
    formats = {r.source: r.format for r in report.files}
    assert formats["inline/model.onnx"] == "onnx" and formats["ext/model.onnx"] == "onnx"
    assert report.exit_code == 0, report.findings() or report.all_errors()


def test_every_placement_with_a_relative_location_is_clean(tmp_path):
    for name, m in placements("weights/data.bin").items():
        report = scan_path(save(m, tmp_path / name / "model.onnx"))
        assert report.exit_code == 0, (name, report.findings(), report.all_errors())


def test_onnx_backend_test_models_are_clean(tmp_path):
    data = Path(onnx.__file__).parent / "backend" / "test" / "data"
    models = sorted(glob.glob(str(data / "**" / "*.onnx"), recursive=True))
    assert len(models) >= 100
    for i, src in enumerate(models):
        shutil.copy(src, tmp_path / f"{i}.onnx")
    report = scan_path(tmp_path)
    assert len(report.files) == len(models) and {r.format for r in report.files} == {"onnx"}
    assert report.exit_code == 0, [(f.source, f.description) for f in report.findings()][:5] or report.all_errors()[:5]


def test_onnxruntime_contrib_domain_and_local_functions_are_not_foreign(tmp_path):
    fn = helper.make_function("my.functions", "Double", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    m = model([helper.make_node("Double", ["x"], ["t"], domain="my.functions"),
               helper.make_node("FastGelu", ["t"], ["y"], domain="com.microsoft")], functions=[fn],
              opsets=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    assert scan_path(save(m, tmp_path / "m.onnx")).exit_code == 0


def test_hugging_face_cache_symlinks_into_blobs_are_clean(tmp_path):
    repo = tmp_path / "hub" / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123" / "onnx"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    w = numpy_helper.from_array(np.ones(64, np.float32), "w")
    m = model([helper.make_node("Add", ["x", "w"], ["y"])], inits=[w])
    onnx.save_model(m, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    os.replace(tmp_path / "model.onnx", blobs / "aaa")
    os.replace(tmp_path / "model.onnx_data", blobs / "bbb")
    (snap / "model.onnx").symlink_to("../../../blobs/aaa")
    (snap / "model.onnx_data").symlink_to("../../../blobs/bbb")
    report = scan_path(snap)
    assert report.exit_code == 0, report.findings() or report.all_errors()


# -- malicious -------------------------------------------------------------------------------------

LOCATIONS = ["/etc/passwd", "../../../../etc/passwd", "weights/../../secret.bin", "C:\\Windows\\win.ini", "\\\\host\\share\\x"]


@pytest.mark.parametrize("placement", sorted(placements("x")))
@pytest.mark.parametrize("location", LOCATIONS)
def test_escaping_external_data_is_high_wherever_the_tensor_sits(tmp_path, placement, location):
    report = scan_path(save(placements(location)[placement], tmp_path / "m.onnx"))
    high = [f for f in report.findings() if f.rule_id == "onnx/external-data-path"]
    assert high and high[0].severity == Severity.HIGH and repr(location) in high[0].description


def test_a_sibling_that_is_a_symlink_out_of_the_directory_is_high(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    save(placements("weights.bin")["initializer"], tmp_path / "model" / "m.onnx")
    (tmp_path / "model" / "weights.bin").symlink_to(outside)
    found = scan_path(tmp_path / "model" / "m.onnx").findings()
    assert [f.severity for f in found] == [Severity.HIGH] and "symbolic link" in found[0].description


def test_a_sibling_that_is_a_hard_link_is_high(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    save(placements("weights.bin")["constant"], tmp_path / "model" / "m.onnx")
    os.link(outside, tmp_path / "model" / "weights.bin")
    found = scan_path(tmp_path / "model" / "m.onnx").findings()
    assert [f.severity for f in found] == [Severity.HIGH] and "hard links" in found[0].description


def test_foreign_operator_domain_is_low_with_the_domain(tmp_path):
    m = model([helper.make_node("Exec", ["x"], ["y"], domain="com.attacker.ops")],
              opsets=[helper.make_opsetid("", 17), helper.make_opsetid("com.attacker.ops", 1)])
    found = scan_path(save(m, tmp_path / "m.onnx")).findings()
    assert [(f.rule_id, f.severity, f.operator) for f in found] == [("onnx/custom-domain", Severity.LOW, "com.attacker.ops")]


def test_onnx_is_recognised_by_content(tmp_path):
    save(placements("/etc/passwd")["initializer"], tmp_path / "blob")
    report = scan_path(tmp_path / "blob")
    assert report.files[0].format == "onnx" and report.exit_code == 1


def test_a_broken_onnx_file_is_an_error(tmp_path):
    path = save(placements("a.bin")["if_subgraph"], tmp_path / "m.onnx")
    path.write_bytes(path.read_bytes()[:-7])
    assert scan_path(path).files[0].verdict.value == "error"


# -- the schema we keep matches onnx's ----------------------------------------------------------------


def test_minimal_onnx_proto_agrees_with_the_onnx_package():
    from onnx import onnx_ml_pb2

    from modelscan_core.scanners.proto import message_class

    compatible = {("bytes", "string"), ("int32", "enum")}  # same wire format
    for name in ("ModelProto", "GraphProto", "NodeProto", "AttributeProto", "TensorProto", "SparseTensorProto",
                 "FunctionProto", "TrainingInfoProto", "OperatorSetIdProto", "StringStringEntryProto"):
        ours = message_class("onnx.proto", name).DESCRIPTOR
        theirs = getattr(onnx_ml_pb2, name).DESCRIPTOR
        for field in ours.fields:
            real = theirs.fields_by_name[field.name]
            assert real.number == field.number, (name, field.name)
            kinds = (_kind(field), _kind(real))
            assert kinds[0] == kinds[1] or kinds in compatible, (name, field.name, kinds)
            assert field.is_repeated == real.is_repeated, (name, field.name)
            if field.message_type is not None:
                assert field.message_type.name == real.message_type.name


def _kind(field) -> str:
    from google.protobuf.descriptor import FieldDescriptor

    names = {v: k[5:].lower() for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}
    return names[field.type]


# -- how onnx and onnxruntime really read the file ---------------------------------------------------


def _with_location_bytes(m, placeholder: str, raw: bytes) -> bytes:
    """The serialized model with the bytes of a location replaced (same length): locations that are
    not UTF-8 (a C++ loader opens them byte for byte)."""
    data = m.SerializeToString()
    assert len(placeholder.encode()) == len(raw) and data.count(placeholder.encode()) == 1
    return data.replace(placeholder.encode(), raw)


def test_a_location_that_is_not_utf8_is_resolved_by_its_bytes(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"\0" * 16)
    folder = tmp_path / "model"
    folder.mkdir()
    raw = b"w\xff\xfe.bin"
    (folder / "m.onnx").write_bytes(_with_location_bytes(placements("wXY.bin")["initializer"], "wXY.bin", raw))
    os.symlink(outside, os.path.join(os.fsencode(folder), raw))
    found = scan_path(folder / "m.onnx").findings()
    assert found and found[0].severity == Severity.HIGH and "symbolic link" in found[0].description


def test_a_dangling_symlink_out_of_the_directory_is_high(tmp_path):
    """The file it names may exist only where the model is loaded (a home directory, a key)."""
    save(placements("weights.bin")["initializer"], tmp_path / "model" / "m.onnx")
    (tmp_path / "model" / "weights.bin").symlink_to(tmp_path / "not-here-yet" / "id_rsa")
    found = scan_path(tmp_path / "model" / "m.onnx").findings()
    assert found and found[0].severity == Severity.HIGH and "symbolic link" in found[0].description


def test_a_directory_component_that_is_a_symlink_out_is_high(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"\0" * 16)
    save(placements("sub/secret")["constant"], tmp_path / "model" / "m.onnx")
    (tmp_path / "model" / "sub").symlink_to(tmp_path / "outside")
    found = scan_path(tmp_path / "model" / "m.onnx").findings()
    assert found and found[0].severity == Severity.HIGH


@pytest.mark.parametrize("location", [".. \\.. \\secret", "... /x", "sub/.. /.. /secret"])
def test_windows_dot_space_components_climb_too(tmp_path, location):
    """Win32 path normalisation drops trailing dots and spaces: `.. ` is `..` there."""
    report = scan_path(save(placements(location)["initializer"], tmp_path / "m.onnx"))
    assert report.files[0].max_severity == Severity.HIGH


def test_every_location_entry_is_judged_not_only_the_last(tmp_path):
    t = ext_tensor("w", "weights.bin")
    entry = t.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    t.external_data[0].value = "../../etc/shadow"
    m = model([helper.make_node("Add", ["x", "w"], ["y"])], inits=[t])
    assert scan_path(save(m, tmp_path / "m.onnx")).files[0].max_severity == Severity.HIGH


def test_function_default_attributes_are_searched(tmp_path):
    fn = helper.make_function("local", "Payload", ["a"], ["b"], [helper.make_node("Identity", ["a"], ["b"])],
                              [helper.make_opsetid("", 17)], attributes=[])
    fn.attribute_proto.append(helper.make_attribute("value", ext_tensor("w", "/etc/passwd")))
    m = model([helper.make_node("Payload", ["x"], ["y"], domain="local")], functions=[fn],
              opsets=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    assert scan_path(save(m, tmp_path / "m.onnx")).files[0].max_severity == Severity.HIGH


def _group_field(number: int) -> bytes:
    """An unknown field of the (deprecated) group wire type: protobuf parsers step over it."""
    start, end = bytes([(number << 3) | 3]), bytes([(number << 3) | 4])
    inner = bytes([(1 << 3) | 0, 7])  # a varint inside the group
    return start + inner + end


def test_an_unknown_group_field_does_not_stop_the_scan(tmp_path):
    data = placements("/etc/passwd")["initializer"].SerializeToString() + _group_field(15)
    onnx.load_model_from_string(data)  # the onnx package reads it
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    report = scan_path(path)
    assert report.files[0].max_severity == Severity.HIGH, report.all_errors()


def test_fields_in_any_order_are_recognised_without_the_name(tmp_path):
    """Protobuf readers accept fields in any order: a graph first, the IR version last."""
    m = placements("/etc/passwd")["initializer"]
    ir = m.ir_version
    m.ClearField("ir_version")
    data = m.SerializeToString() + bytes([0x08, ir])
    assert onnx.load_model_from_string(data).ir_version == ir
    (tmp_path / "blob").write_bytes(data)
    report = scan_path(tmp_path / "blob")
    assert report.files[0].format == "onnx" and report.files[0].max_severity == Severity.HIGH
