"""What a report format is: a pure function from a ScanReport to text.

Formats never print and never decide exit codes; the CLI writes their text to stdout or to
`-o FILE`, which keeps stdout of `-r json` exactly one JSON document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from modelscan_core.model import ScanReport


@dataclass(frozen=True)
class ReportOptions:
    show_skipped: bool = False
    color: bool = False  # console only: ANSI colours when writing to a terminal


class ReportFormat(Protocol):
    def __call__(self, report: ScanReport, options: ReportOptions) -> str: ...
