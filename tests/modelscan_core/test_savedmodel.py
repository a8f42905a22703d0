"""TensorFlow SavedModels and keras_metadata.pb, made with TensorFlow and scanned without it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from modelscan_core import scan_path
from modelscan_core.settings import Settings

from .tf_helpers import CRITICAL, HIGH, MEDIUM, LazyModule, scan_in_subprocess

#: imported on first use: the tests that use it build real models and are slow (conftest.py)
tf = LazyModule("tensorflow")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("savedmodel")
    made: dict[str, Path] = {}

    class Benign(tf.Module):
        def __init__(self):
            self.w = tf.Variable([[1.0, 2.0], [3.0, 4.0]])

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
        def __call__(self, x):
            tf.print("batch", tf.shape(x))  # PrintV2 to stderr: harmless
            return tf.nn.relu(tf.matmul(x, self.w))

    made["benign_module"] = out / "benign_module"
    tf.saved_model.save(Benign(), str(made["benign_module"]))

    class Files(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
        def steal(self, path):
            tf.io.write_file("/tmp/modelscand-test-never-written", path)
            return tf.io.read_file(path)

    made["files"] = out / "files"
    tf.saved_model.save(Files(), str(made["files"]))

    class Many(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
        def glob(self, pattern):
            return tf.io.matching_files(pattern)

        @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
        def leak(self, x):
            tf.print(x, output_stream="file:///tmp/modelscand-test-leak.txt")
            return x

        @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
        def checkpoint_write(self, prefix):
            tf.raw_ops.SaveV2(prefix=prefix, tensor_names=["x"], shape_and_slices=[""], tensors=[tf.constant(1.0)])
            return prefix

        @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
        def callback(self, x):
            return tf.py_function(lambda v: v, [x], tf.float32)

    made["many"] = out / "many"
    tf.saved_model.save(Many(), str(made["many"]))

    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"), keras.layers.Dense(1)])
    made["keras_export"] = out / "keras_export"
    model.export(str(made["keras_export"]), verbose=False)
    return made


def _ops(report) -> dict[str, tuple[str, object]]:
    return {f.operator: (f.rule_id, f.severity) for f in report.findings()}


@pytest.mark.parametrize("name", ["benign_module", "keras_export"])
def test_real_benign_savedmodels_are_clean(saved, name):
    report = scan_path(saved[name])
    assert report.exit_code == 0, report.findings() or report.all_errors()
    formats = {r.source: r.format for r in report.files}
    assert formats["saved_model.pb"] == "tf_savedmodel" and formats["fingerprint.pb"] == "tf_fingerprint"


def test_read_file_and_write_file_in_a_tf_function(saved):
    report = scan_path(saved["files"])
    assert _ops(report) == {"ReadFile": ("tf/unsafe-op", HIGH), "WriteFile": ("tf/unsafe-op", HIGH)}
    assert {f.source for f in report.findings()} == {"saved_model.pb"}
    assert all(f.module == "Tensorflow" and "function __inference_steal" in f.description for f in report.findings())


def test_glob_print_to_file_checkpoint_write_and_python_callback(saved):
    ops = _ops(scan_path(saved["many"]))
    assert ops["MatchingFiles"] == ("tf/unsafe-op", HIGH)
    assert ops["PrintV2"] == ("tf/unsafe-op", HIGH)
    assert ops["SaveV2"] == ("tf/unsafe-op", HIGH)  # outside the SavedModel's own saver
    assert ops["EagerPyFunc"] == ("tf/unsafe-op", HIGH)


def test_op_severities_come_from_settings_with_modelscan_key(saved):
    settings = Settings.from_dict({"scanners": {"modelscan.scanners.SavedModelTensorflowOpScan": {"unsafe_tf_operators": {"ReadFile": "CRITICAL"}}}})
    assert _ops(scan_path(saved["files"], settings))["ReadFile"] == ("tf/unsafe-op", CRITICAL)


def test_an_op_tensorflow_does_not_know_is_reported(saved, tmp_path):
    copy = tmp_path / "custom_op"
    shutil.copytree(saved["benign_module"], copy)
    pb = copy / "saved_model.pb"
    data = pb.read_bytes()
    assert b"\x12\x06MatMul" in data
    pb.write_bytes(data.replace(b"\x12\x06MatMul", b"\x12\x06MatMux"))  # NodeDef.op (field 2)
    assert _ops(scan_path(copy)) == {"MatMux": ("tf/unknown-op", MEDIUM)}


@pytest.mark.slow
def test_shipped_op_list_covers_installed_tensorflow():
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "gen_tf_ops.py"
    spec = importlib.util.spec_from_file_location("gen_tf_ops", script)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    from modelscan_core.scanners.savedmodel import known_ops

    version, installed = gen.installed_ops()
    missing = sorted(installed - known_ops())
    assert not missing, f"TensorFlow {version} registers ops missing from tf_ops.txt (run scripts/gen_tf_ops.py): {missing[:20]}"
    assert {"MatMul", "ReadFile", "StatefulPartitionedCall"} <= known_ops()


@pytest.mark.parametrize("cut", [0.5, 0.97])
def test_truncated_saved_model_pb_is_an_error(saved, tmp_path, cut):
    copy = tmp_path / "cut"
    shutil.copytree(saved["files"], copy)
    pb = copy / "saved_model.pb"
    data = pb.read_bytes()
    pb.write_bytes(data[: int(len(data) * cut)])
    result = next(r for r in scan_path(copy).files if r.source == "saved_model.pb")
    assert result.verdict.value in ("error", "issues")
    assert result.all_errors(), "a SavedModel that could not be fully read must carry an error"


def test_pb_that_is_not_protobuf_is_an_error(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"\xff" * 64)
    assert scan_path(tmp_path / "saved_model.pb").exit_code == 2


# -- keras_metadata.pb ------------------------------------------------------------------------


def _field(number: int, payload: bytes) -> bytes:
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _keras_metadata(nodes: list[tuple[str, str, dict]]) -> bytes:
    """SavedMetadata{nodes: SavedObject{node_path=3, identifier=4, metadata=5}} as tf.keras wrote it."""
    return b"".join(_field(1, _field(3, p.encode()) + _field(4, i.encode()) + _field(5, json.dumps(m).encode())) for p, i, m in nodes)


def test_lambda_in_keras_metadata_built_by_hand(tmp_path):
    import base64
    import marshal

    code = base64.b64encode(marshal.dumps(compile("lambda x: exec('import os')", "<l>", "eval"))).decode()
    lam = {"class_name": "Lambda", "name": "lam", "config": {"name": "lam", "function": {"class_name": "__tuple__", "items": [code, None, None]}, "function_type": "lambda", "module": "__main__"}}
    model = {"class_name": "Functional", "name": "model", "config": {"name": "model", "layers": [{"class_name": "InputLayer", "config": {"name": "in"}}, lam]}}
    (tmp_path / "keras_metadata.pb").write_bytes(_keras_metadata([("root", "_tf_keras_network", model), ("root.layer-1", "_tf_keras_layer", lam)]))
    found = scan_path(tmp_path / "keras_metadata.pb").findings()
    # the same layer appears in the model's node and in its own node: one finding
    assert [(f.rule_id, f.severity, f.source) for f in found] == [("keras/lambda-dangerous", CRITICAL, "keras_metadata.pb")]


@pytest.mark.slow
def test_lambda_in_tf_keras_savedmodel(tmp_path):
    tf_keras = pytest.importorskip("tf_keras")
    inner = tf_keras.Sequential([tf_keras.layers.Lambda(lambda x: x * 2, name="deep_lambda", input_shape=(4,))], name="inner")
    inp = tf_keras.Input((3, 4))
    x = tf_keras.layers.TimeDistributed(inner)(inp)
    model = tf_keras.Model(inp, tf_keras.layers.Lambda(lambda t: t + 1, name="top_lambda")(x))
    model.save(str(tmp_path / "sm"), save_format="tf")
    report = scan_path(tmp_path / "sm")
    lambdas = [f for f in report.findings() if f.operator == "Lambda"]
    assert {f.source for f in lambdas} == {"keras_metadata.pb"}
    assert sorted("deep_lambda" in f.description for f in lambdas) == [False, True]
    assert all(f.severity == MEDIUM for f in lambdas)
    assert not [f for f in report.findings() if f.source == "saved_model.pb"]


def test_scanning_savedmodels_imports_no_tensorflow(saved):
    out = scan_in_subprocess([saved["files"], saved["benign_module"]])
    assert out["modules"] == []
    assert sorted(out["verdicts"][str(saved["files"])]) == ["clean", "issues", "skipped", "skipped"]


@pytest.mark.slow
def test_frozen_graphdef_pb_is_read_for_ops(tmp_path):
    evil = tf.function(lambda p: tf.io.read_file(p)).get_concrete_function(tf.TensorSpec([], tf.string))
    benign = tf.function(lambda x: tf.nn.relu(x) * 2.0).get_concrete_function(tf.TensorSpec([3], tf.float32))
    (tmp_path / "evil_graph.pb").write_bytes(evil.graph.as_graph_def().SerializeToString())
    (tmp_path / "frozen_graph.pb").write_bytes(benign.graph.as_graph_def().SerializeToString())
    report = scan_path(tmp_path)
    assert {r.source: (r.format, r.verdict.value) for r in report.files} == {
        "evil_graph.pb": ("tf_graphdef", "issues"),
        "frozen_graph.pb": ("tf_graphdef", "clean"),
    }
    assert _ops(report) == {"ReadFile": ("tf/unsafe-op", HIGH)}


@pytest.mark.slow
def test_immutable_const_memory_maps_a_file_and_is_high(tmp_path):
    fn = tf.function(lambda: tf.raw_ops.ImmutableConst(dtype=tf.float32, shape=[2], memory_region_name="/etc/shadow"))
    (tmp_path / "mapped.pb").write_bytes(fn.get_concrete_function().graph.as_graph_def().SerializeToString())
    found = scan_path(tmp_path / "mapped.pb").findings()
    assert [(f.operator, f.severity) for f in found] == [("ImmutableConst", HIGH)]
    assert "'/etc/shadow'" in found[0].description


@pytest.mark.slow
def test_minimal_tensorflow_proto_agrees_with_tensorflow():
    from google.protobuf.descriptor import FieldDescriptor
    from tensorflow.core.framework import attr_value_pb2, function_pb2, graph_pb2, node_def_pb2, op_def_pb2
    from tensorflow.core.protobuf import fingerprint_pb2, meta_graph_pb2, saved_model_pb2, saved_object_graph_pb2

    from modelscan_core.scanners.proto import message_class

    upstream = {
        "SavedModel": saved_model_pb2.SavedModel, "MetaGraphDef": meta_graph_pb2.MetaGraphDef,
        "MetaInfoDef": meta_graph_pb2.MetaGraphDef.MetaInfoDef, "GraphDef": graph_pb2.GraphDef,
        "NodeDef": node_def_pb2.NodeDef, "AttrEntry": node_def_pb2.NodeDef.AttrEntry, "AttrValue": attr_value_pb2.AttrValue,
        "FunctionDefLibrary": function_pb2.FunctionDefLibrary, "FunctionDef": function_pb2.FunctionDef,
        "GradientDef": function_pb2.GradientDef, "OpDef": op_def_pb2.OpDef,
        "SavedObjectGraph": saved_object_graph_pb2.SavedObjectGraph, "SavedObject": saved_object_graph_pb2.SavedObject,
        "SavedUserObject": saved_object_graph_pb2.SavedUserObject, "FingerprintDef": fingerprint_pb2.FingerprintDef,
        "AssetFileDef": meta_graph_pb2.AssetFileDef, "CollectionDefEntry": meta_graph_pb2.MetaGraphDef.CollectionDefEntry,
        "CollectionDef": meta_graph_pb2.CollectionDef, "AnyList": meta_graph_pb2.CollectionDef.AnyList,
    }
    kinds = {v: k for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}
    for name, real_cls in upstream.items():
        for field in message_class("tensorflow.proto", name).DESCRIPTOR.fields:
            real = real_cls.DESCRIPTOR.fields_by_name[field.name]
            pair = (kinds[field.type], kinds[real.type])
            assert real.number == field.number, (name, field.name)
            assert pair[0] == pair[1] or pair == ("TYPE_BYTES", "TYPE_STRING"), (name, field.name, pair)
            assert field.is_repeated == real.is_repeated, (name, field.name)
