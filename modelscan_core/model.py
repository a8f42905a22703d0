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


# -- a lossless, data-only JSON form of FileResult ----------------------------------------
# For a process boundary where the receiver must not trust the sender (the daemon's
# workers parse hostile bytes): plain JSON types in, every field type-checked out, so a
# compromised sender can at worst lie about a verdict, never run code in the receiver.

_MAX_RESULT_DEPTH = 64


def file_result_to_json(result: FileResult) -> dict:
    """`result` as JSON-ready dicts and lists; `file_result_from_json` gives it back equal."""
    return {
        "source": result.source,
        "format": result.format,
        "size": result.size,
        "sha256": result.sha256,
        "findings": [
            {"rule_id": f.rule_id, "severity": f.severity.name, "description": f.description, "source": f.source,
             "scanner": f.scanner, "module": f.module, "operator": f.operator, "offset": f.offset, "call": f.call}
            for f in result.findings
        ],
        "errors": [{"category": e.category, "description": e.description, "source": e.source,
                    "incomplete": e.incomplete} for e in result.errors],
        "skipped": None if result.skipped is None else {
            "category": result.skipped.category, "description": result.skipped.description,
            "source": result.skipped.source},
        "members": [file_result_to_json(m) for m in result.members],
        "scanned": result.scanned,
    }


def file_result_from_json(data: object, _depth: int = 0) -> FileResult:
    """Rebuild a FileResult; ValueError if anything is not exactly the expected shape."""
    if _depth > _MAX_RESULT_DEPTH:
        raise ValueError("FileResult nested too deeply")
    d = _obj(data, "FileResult")
    findings = tuple(
        Finding(_str(f, "rule_id"), _severity(f), _str(f, "description"), _str(f, "source"), _str(f, "scanner"),
                _str(f, "module"), _str(f, "operator"), _opt_int(f, "offset"), _opt_str(f, "call"))
        for f in (_obj(x, "Finding") for x in _list(d, "findings"))
    )
    errors = tuple(
        ScanError(_str(e, "category"), _str(e, "description"), _str(e, "source"), _bool(e, "incomplete"))
        for e in (_obj(x, "ScanError") for x in _list(d, "errors"))
    )
    sk = d.get("skipped")
    skipped = None if sk is None else Skipped(*(_str(_obj(sk, "Skipped"), k) for k in ("category", "description",
                                                                                        "source")))
    members = tuple(file_result_from_json(m, _depth + 1) for m in _list(d, "members"))
    return FileResult(_str(d, "source"), _str(d, "format"), _opt_int(d, "size"), _opt_str(d, "sha256"), findings,
                      errors, skipped, members, _bool(d, "scanned"))


def _obj(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what}: expected an object")
    return value


def _list(d: dict, key: str) -> list:
    value = d.get(key)
    if not isinstance(value, list):
        raise ValueError(f"{key}: expected a list")
    return value


def _str(d: dict, key: str) -> str:
    value = d.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a string")
    return value


def _opt_str(d: dict, key: str) -> str | None:
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key}: expected a string or null")
    return value


def _opt_int(d: dict, key: str) -> int | None:
    value = d.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{key}: expected an integer or null")
    return value


def _bool(d: dict, key: str) -> bool:
    value = d.get(key)
    if not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false")
    return value


def _severity(d: dict) -> Severity:
    name = _str(d, "severity")
    if name not in Severity.__members__:
        raise ValueError(f"severity: unknown {name!r}")
    return Severity[name]
