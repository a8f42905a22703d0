"""The scanner registry: every rule has a scanner, every scanner a rule, settings stay compatible,
and declaring modules stay light (a pickle scan imports no format library)."""

from __future__ import annotations

import importlib
import inspect
import io
import json
import pickle
import pkgutil
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import modelscan_core.scanners as scanners_pkg
from modelscan_core import detect, scan_path
from modelscan_core.scanners import MODULES, registry, scanner_class, scanner_for
from modelscan_core.scanners.interface import Scanner
from modelscan_core.settings import Settings, default_settings


def _all_scanner_classes() -> set[type]:
    """Every concrete Scanner subclass defined anywhere under modelscan_core.scanners."""
    found: set[type] = set()
    for info in pkgutil.walk_packages(scanners_pkg.__path__, scanners_pkg.__name__ + "."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Scanner) and obj is not Scanner and obj.__module__ == module.__name__ and not inspect.isabstract(obj):
                found.add(obj)
    return found


def test_every_rule_has_a_scanner_that_reads_its_format():
    assert detect.rules(), "no rules declared"
    for rule in detect.rules():
        cls = scanner_class(rule.format)
        assert cls is not None and issubclass(cls, Scanner), rule
        assert rule.format in cls.formats, f"{cls.__name__} does not say it reads {rule.format}"


def test_every_scanner_has_a_declared_format_and_every_format_a_rule_or_a_container():
    declared = registry().formats
    for cls in _all_scanner_classes():
        assert cls.formats, f"{cls.__name__} reads no format"
        for fmt in cls.formats:
            assert fmt in declared, f"{cls.__name__} reads {fmt!r}, which no module declares"
            assert scanner_class(fmt) is cls, f"{fmt!r} is declared for {scanner_class(fmt).__name__}, not {cls.__name__}"
    sources = {name: Path(importlib.import_module(name).__file__).read_text() for name in MODULES}
    for name, (fmt, module) in declared.items():
        if fmt.rules:
            continue
        # reached only by a container's format_hint: some other module names it as a string
        others = [m for m, text in sources.items() if m != module and re.search(rf"[\"']{re.escape(name)}[\"']", text)]
        assert others, f"format {name!r} has no rule and no container hands it over"


def test_every_format_names_declared_settings_and_defaults_have_a_table():
    reg = registry()
    tables = default_settings()["scanners"]
    for fmt, _ in reg.formats.values():
        assert fmt.settings in reg.settings
        assert reg.settings[fmt.settings].table in tables


def test_rule_order_is_by_priority_and_unique():
    priorities = [r.priority for r in detect.rules()]
    assert priorities == sorted(priorities) and len(set(priorities)) == len(priorities)


def test_modelscan_scanner_names_are_kept():
    tables = default_settings()["scanners"]
    for name in ("PickleUnsafeOpScan", "PyTorchUnsafeOpScan", "NumpyUnsafeOpScan", "H5LambdaDetectScan",
                 "KerasLambdaDetectScan", "SavedModelLambdaDetectScan", "SavedModelTensorflowOpScan"):
        assert tables[f"modelscan.scanners.{name}"]["enabled"] is True
    assert tables["modelscan.scanners.SavedModelTensorflowOpScan"]["unsafe_tf_operators"]["ReadFile"] == "HIGH"
    assert tables["modelscan.scanners.SavedModelLambdaDetectScan"]["unsafe_keras_operators"] == {"Lambda": "MEDIUM"}


EVIL = b"\x80\x02cposix\nsystem\nX\x06\x00\x00\x00echo 1\x85R."


@pytest.mark.parametrize("table", ['"modelscan.scanners.PickleUnsafeOpScan"', "pickle"])
def test_a_scanner_is_switched_off_by_modelscan_name_or_short_key(tmp_path, table):
    (tmp_path / "m.pkl").write_bytes(EVIL)
    settings = Settings.from_dict(_toml(f"[scanners.{table}]\nenabled = false\n"))
    report = scan_path(tmp_path / "m.pkl", settings)
    assert report.files[0].verdict.value == "skipped"
    assert scan_path(tmp_path / "m.pkl").files[0].verdict.value == "issues"


def test_archives_switch_off_by_their_key(tmp_path):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("inner.pkl", EVIL)
    settings = Settings.from_dict({"scanners": {"archives": {"enabled": False}}})
    assert scan_path(path, settings).files[0].verdict.value == "skipped"
    assert scan_path(path).files[0].verdict.value == "issues"


def test_an_option_from_the_modelscan_table_reaches_the_scanner():
    settings = Settings.from_dict({"scanners": {"modelscan.scanners.SavedModelTensorflowOpScan": {"unknown_tf_operator": "LOW"}}})
    assert settings.scanner_option("savedmodel_ops", "unknown_tf_operator") == "LOW"
    assert Settings().scanner_option("savedmodel_ops", "unknown_tf_operator") == "MEDIUM"


def test_detection_can_name_several_formats_one_per_family(tmp_path):
    pickled = pickle.dumps({"a": 1}, protocol=2)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.txt", "hello")
    polyglot = pickled + buf.getvalue()  # zipfile opens it; pickle.load reads the pickle
    found = list(detect.detect_all(polyglot[: detect.HEAD], "blob", io.BytesIO(polyglot)))
    assert found == ["zip", "pickle"]
    assert detect.detect(polyglot[: detect.HEAD], "blob", io.BytesIO(polyglot)) == "zip"
    keras = io.BytesIO()
    with zipfile.ZipFile(keras, "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("metadata.json", "{}")
    data = keras.getvalue()
    assert list(detect.detect_all(data, "model.keras", io.BytesIO(data))) == ["keras_v3"]  # not also a plain zip


def _heavy_imports(path) -> tuple[int, list[str]]:
    code = (
        "import json, sys\n"
        "from modelscan_core.cli import run\n"
        "rc = run(['-p', sys.argv[1]])\n"
        "heavy = ('h5py', 'google', 'jinja2', 'yaml', 'lz4', 'py7zr', 'numpy', 'onnx', 'gguf', 'safetensors',"
        " 'tensorflow', 'torch', 'keras')\n"
        "print(json.dumps([rc, sorted(m for m in sys.modules if m.split('.')[0] in heavy)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rc, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    return rc, heavy


def test_a_pickle_scan_imports_no_format_library(tmp_path):
    path = tmp_path / "small.pkl"
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    assert _heavy_imports(path) == (0, [])


def test_a_safetensors_scan_imports_no_format_library(tmp_path):
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    assert _heavy_imports(path) == (0, [])


def test_scanner_instances_are_shared_between_formats():
    assert scanner_for("zip")[1] is scanner_for("pytorch_zip")[1]
    assert scanner_for("zip")[0] == "archives" and scanner_for("pytorch_zip")[0] == "pytorch"
    assert scanner_for("no-such-format") is None


def _toml(text: str) -> dict:
    import tomlkit

    return tomlkit.parse(text).unwrap()
