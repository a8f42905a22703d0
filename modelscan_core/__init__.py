"""modelscan_core: read model files byte by byte, never load them, say what they would do.

    >>> from modelscan_core import scan_path
    >>> report = scan_path("model.pt")
    >>> report.exit_code, [f.severity.name for f in report.findings()]

Exports are resolved lazily so that importing the package (and starting the CLI) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelscan_core._version import __version__

if TYPE_CHECKING:
    from modelscan_core.engine import scan_path, scan_stream
    from modelscan_core.model import FileResult, Finding, ScanError, ScanReport, Severity, Verdict
    from modelscan_core.settings import Settings

_EXPORTS = {
    "scan_path": "modelscan_core.engine",
    "scan_stream": "modelscan_core.engine",
    "FileResult": "modelscan_core.model",
    "Finding": "modelscan_core.model",
    "ScanError": "modelscan_core.model",
    "ScanReport": "modelscan_core.model",
    "Severity": "modelscan_core.model",
    "Verdict": "modelscan_core.model",
    "Settings": "modelscan_core.settings",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modelscan_core' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
