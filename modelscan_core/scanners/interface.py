"""What a format scanner is, and what the engine offers it while it works.

A scanner knows one format and nothing about files, archives or reports: it is handed an
`Item` (a name and a seekable byte stream) and a `ScanContext`, and tells the context what it
finds. Findings are reported as they are made, so an exception half-way through a file
never loses what was already found. A container format (a zip of pickles, a joblib stream
holding arrays) hands the bytes it holds back to the engine with `ScanContext.scan_member`,
so nesting, limits and naming live in one place.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Callable

from modelscan_core.model import Finding, Limits, ScanError, Severity

if TYPE_CHECKING:
    from modelscan_core.settings import Settings


@dataclass(frozen=True)
class Item:
    """The bytes a scanner reads: one file or one archive member."""

    source: str  # display name, relative to the scan root; members are `outer:inner`
    stream: BinaryIO  # seekable, positioned at 0
    size: int
    format: str  # what detection decided; a scanner may serve several formats
    #: the file on disk, for a file given by path; None for archive members and bare streams.
    #: Formats that name other files (ONNX external data) resolve them against its directory.
    path: str | None = None


class ScanFailed(Exception):
    """Raised by a scanner that cannot go on; becomes a `ScanError` for its item.

    `category` uses modelscan's error vocabulary where one fits (MODEL_SCAN, PICKLE_GENOPS,
    JSON_DECODE, NESTED_ZIP, ...).
    """

    def __init__(self, description: str, category: str = "MODEL_SCAN", incomplete: bool = False):
        super().__init__(description)
        self.description = description
        self.category = category
        self.incomplete = incomplete


class ScanContext(abc.ABC):
    """The engine's side of the conversation with a scanner."""

    settings: "Settings"
    limits: Limits
    depth: int

    @abc.abstractmethod
    def report(
        self,
        rule_id: str,
        severity: Severity,
        description: str,
        *,
        module: str = "",
        operator: str = "",
        offset: int | None = None,
        call: str | None = None,
        source: str | None = None,
    ) -> Finding:
        """Record a finding against the current item (or a named part of it)."""

    @abc.abstractmethod
    def error(self, description: str, category: str = "MODEL_SCAN", incomplete: bool = False) -> ScanError:
        """Record that part of the item could not be read; the item is then never clean."""

    @abc.abstractmethod
    def scan_member(
        self,
        name: str,
        open_stream: Callable[[], BinaryIO],
        size: int,
        format_hint: str | None = None,
    ) -> None:
        """Scan bytes the current item contains, as the engine would scan a file.

        `name` is the member's path inside the item; reports show `outer:name`.
        `format_hint` forces a format when the container defines it (a joblib array that is
        a pickle by construction); otherwise detection decides from content.
        """

    def charge_bytes(self, nbytes: int) -> bool:
        """Count `nbytes` of decompressed (or spooled) data against `limits.max_total_bytes`.

        Shared by everything one top-level file contains. False once the budget is spent:
        the caller stops reading and records an incomplete error naming the limit.
        """
        return True


class Scanner(abc.ABC):
    """One format. Subclasses set `name` and `formats` and implement `scan`."""

    #: shown in reports as the `scanner` of each issue (modelscan style)
    name: str = ""
    #: the detect.py format names this scanner reads
    formats: tuple[str, ...] = ()

    @abc.abstractmethod
    def scan(self, item: Item, ctx: ScanContext) -> None:
        """Read `item`, reporting into `ctx`. Raise `ScanFailed` when the bytes cannot be read."""
