"""Scanning many generated pickles quickly: one Settings (one policy) for a whole family."""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache

from modelscan_core import scan_path
from modelscan_core.model import Severity
from modelscan_core.settings import Settings

from .conftest import Scanned

#: a name nothing installs: calling it can only be judged as unknown
UNKNOWN_FUNC = ("someones_tools.helpers", "run_command")
UNKNOWN_CLASS = ("someones_tools.helpers", "Runner")


@lru_cache(maxsize=None)
def settings(**limits: int) -> Settings:
    return Settings.from_dict({"limits": limits}) if limits else Settings()


def scan(data: bytes, name: str = "model.pkl", **limits: int) -> Scanned:
    """Scan bytes as `modelscan -p` would, with the default settings (or limits changed)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        return Scanned(scan_path(path, settings(**limits)))


def high_or_worse(result: Scanned) -> bool:
    return result.worst is not None and result.worst >= Severity.HIGH


def describe(result: Scanned) -> list[tuple[str, str, str]]:
    return [(f.severity.name, f.rule_id, f"{f.module}.{f.operator}") for f in result.report.findings()]


def thinned(cases, every: int) -> list:
    """pytest params: every `every`-th case runs in the fast tier, all of them in the slow one."""
    import pytest

    out = []
    for i, case in enumerate(cases):
        values = case if isinstance(case, tuple) else (case,)
        marks = () if i % every == 0 else (pytest.mark.slow,)
        out.append(pytest.param(*values, marks=marks))
    return out
