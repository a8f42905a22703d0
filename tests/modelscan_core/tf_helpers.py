"""Helpers for the Keras/TensorFlow tests: quiet TensorFlow imports, zip rewriting, scanning.

Fixtures are made with the real libraries at test time; they are saved, never loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from modelscan_core import scan_path
from modelscan_core.model import Severity

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


class LazyModule:
    """A library imported on first use, so that collecting the tests (and the fast tier, which
    deselects every test that builds a model with it) never pays for importing TensorFlow."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        import pytest

        return getattr(pytest.importorskip(self._name), attr)


def findings(path: Path):
    report = scan_path(path)
    return report, report.findings()


def by_rule(found, rule: str):
    return [f for f in found if f.rule_id == rule]


def rewrite_keras(src: Path, dst: Path, mutate=None, extra: dict[str, bytes] | None = None) -> Path:
    """Copy a .keras zip, passing its config.json through `mutate(config) -> config`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "config.json" and mutate is not None:
                data = json.dumps(mutate(json.loads(data))).encode()
            zout.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


def first_layer_dict(config: dict, class_name: str) -> dict:
    """One object with this class_name in a config (depth-first from the end: the last layer)."""
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class_name") == class_name:
                return node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise KeyError(class_name)


def scan_in_subprocess(paths: list[Path]) -> dict:
    """Scan in a fresh interpreter and say which heavy modules the scan imported."""
    code = (
        "import json, sys\n"
        "from modelscan_core import scan_path\n"
        "out = {'verdicts': {}, 'modules': []}\n"
        "for p in sys.argv[1:]:\n"
        "    r = scan_path(p)\n"
        "    out['verdicts'][p] = [x.verdict.value for x in r.files]\n"
        "out['modules'] = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras', 'torch', 'jax'))\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


HIGH = Severity.HIGH
CRITICAL = Severity.CRITICAL
MEDIUM = Severity.MEDIUM
