"""The data every part of the scanner shares: small, frozen, and free of behaviour.

Scanners produce `Finding`s and `ScanError`s, the engine folds them into one
`FileResult` per file it was given, and the reports render a `ScanReport`. Keeping these
immutable means a report can never be edited after the fact by the code that renders it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Severity(enum.IntEnum):
    """How bad a finding is. Ordered, so `max()` and thresholds work directly."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @classmethod
    def parse(cls, text: str) -> "Severity":
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown severity {text!r}; expected one of LOW, MEDIUM, HIGH, CRITICAL") from None


class Verdict(str, enum.Enum):
    """What a user should conclude about one file.

    `ISSUES` wins over everything: an error later in a file never hides what was found
    before it. `ERROR` and `INCOMPLETE` both mean "not known to be safe".
    """

    CLEAN = "clean"
    ISSUES = "issues"
    ERROR = "error"
    INCOMPLETE = "incomplete"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Finding:
    """One thing a loader would do that a user should know about.

    `module`/`operator` keep modelscan's vocabulary; `call` is the resolved call with its
    static arguments (``posix.system('touch /tmp/x')``) when the scanner could work it out.
    """

    rule_id: str
    severity: Severity
    description: str
    source: str
    scanner: str
    module: str = ""
    operator: str = ""
    offset: int | None = None
    call: str | None = None


@dataclass(frozen=True)
class ScanError:
    """A file, or part of one, that could not be fully read. Never a silent pass."""

    category: str
    description: str
    source: str
    incomplete: bool = False  # True: a limit was hit, the bytes themselves may be fine


@dataclass(frozen=True)
class Skipped:
    """A file no scanner understands (modelscan's vocabulary: category + description)."""

    category: str
    description: str
    source: str


@dataclass(frozen=True)
class FileResult:
    """Everything known about one file or archive member.

    `members` holds the results of what a container held, so `findings`/`errors` here are
    only this object's own; `all_findings()` and `verdict` look through the members.
    """

    source: str
    format: str
    size: int | None = None
    sha256: str | None = None
    findings: tuple[Finding, ...] = ()
    errors: tuple[ScanError, ...] = ()
    skipped: Skipped | None = None
    members: tuple["FileResult", ...] = ()
    scanned: bool = True  # False when no scanner read it (skipped, unopenable, unrecognised)

    def all_findings(self) -> list[Finding]:
        out = list(self.findings)
        for member in self.members:
            out.extend(member.all_findings())
        return out

    def all_errors(self) -> list[ScanError]:
        out = list(self.errors)
        for member in self.members:
            out.extend(member.all_errors())
        return out

    @property
    def verdict(self) -> Verdict:
        if self.all_findings():
            return Verdict.ISSUES
        errors = self.all_errors()
        if any(not e.incomplete for e in errors):
            return Verdict.ERROR
        if errors:
            return Verdict.INCOMPLETE
        if self.skipped is not None and not self.members:
            return Verdict.SKIPPED
        return Verdict.CLEAN

    @property
    def max_severity(self) -> Severity | None:
        found = self.all_findings()
        return max((f.severity for f in found), default=None)


@dataclass(frozen=True)
class ScanReport:
    """The outcome of one `scan_path` call, ready for any report format."""

    input_path: str
    absolute_path: str
    timestamp: str
    version: str
    files: tuple[FileResult, ...] = ()
    errors: tuple[ScanError, ...] = ()  # errors not tied to a file (e.g. a missing path)
    elapsed_s: float = 0.0

    def findings(self) -> list[Finding]:
        return [f for r in self.files for f in r.all_findings()]

    def all_errors(self) -> list[ScanError]:
        return list(self.errors) + [e for r in self.files for e in r.all_errors()]

    def skipped(self) -> list[Skipped]:
        out: list[Skipped] = []

        def walk(result: FileResult) -> None:
            if result.skipped is not None:
                out.append(result.skipped)
            for member in result.members:
                walk(member)

        for r in self.files:
            walk(r)
        return out

    def scanned(self) -> list[FileResult]:
        """Files and members a scanner actually read (modelscan's `scanned_files`)."""
        out: list[FileResult] = []

        def walk(result: FileResult) -> None:
            if result.scanned:
                out.append(result)
            for member in result.members:
                walk(member)

        for r in self.files:
            walk(r)
        return out

    @property
    def exit_code(self) -> int:
        """The contract's exit code: issues beat errors, errors beat "nothing supported"."""
        if self.findings():
            return 1
        if self.all_errors():
            return 2
        if not self.scanned():
            return 3
        return 0


@dataclass(frozen=True)
class Limits:
    """Bounds that keep a hostile file from costing unbounded time or memory."""

    max_depth: int = 8
    max_members: int = 100_000
    max_total_bytes: int = 16 * 1024**3  # decompressed bytes read across one top-level file
    max_ratio: int = 200  # decompressed / compressed, for bomb detection...
    # ...checked only past this much output: arrays of zeros really do compress 1000:1, so a
    # high ratio below it is a sparse tensor; above it a bomb is cut off after ~1 GiB
    ratio_after_bytes: int = 1024**3
    max_memo_values: int = 200_000  # pickle memo entries kept with full values
