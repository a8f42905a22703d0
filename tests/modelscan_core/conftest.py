"""Shared helpers for the core's tests: scanning a blob of bytes as a user would."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelscan_core import scan_path
from modelscan_core.model import ScanReport, Severity


class Scanned:
    """A scan of one file, with the questions tests ask of it."""

    def __init__(self, report: ScanReport):
        self.report = report

    @property
    def file(self):
        assert len(self.report.files) == 1, self.report
        return self.report.files[0]

    @property
    def verdict(self) -> str:
        return self.file.verdict.value

    @property
    def worst(self) -> Severity | None:
        return self.file.max_severity

    def names(self, at_least: Severity = Severity.LOW) -> set[str]:
        return {f"{f.module}.{f.operator}" for f in self.report.findings() if f.severity >= at_least and f.module}

    def rules(self) -> set[str]:
        return {f.rule_id for f in self.report.findings()}


@pytest.fixture
def scan_bytes(tmp_path: Path):
    """Write bytes under a name and scan the file as `modelscan -p` would."""

    def run(data: bytes, name: str = "model.pkl") -> Scanned:
        path = tmp_path / name
        path.write_bytes(data)
        return Scanned(scan_path(path))

    return run


#: module fixtures built by TensorFlow or Keras at test time (seconds each, and the import of
#: TensorFlow): every test that uses one is slow, so the fast tier never imports TensorFlow
REAL_LIBRARY_FIXTURES = frozenset({"saved", "models"})


def pytest_collection_modifyitems(items):
    for item in items:
        if REAL_LIBRARY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
