"""What happens after a verdict: the one interface a quarantine action plugs into.

Data flows one way: event -> candidate -> scan -> `Outcome` -> `Action.handle()` -> ledger/log.
Detect mode is `LogAction`: it logs ``action.detect`` for every outcome at or above the
severity threshold and touches nothing. Quarantine mode is `modelscand.quarantine.action.
QuarantineAction` (its own package: mover, ledger, review), chosen by `make_action()`.

Scan errors are never detections: `Outcome.actionable` is False for them whatever the mode
(quarantine's ``fail_closed`` option is the one, explicit, exception).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from modelscan_core.model import FileResult, Severity

from modelscand import logging as mlog
from modelscand.state import Identity


@dataclass(frozen=True)
class Outcome:
    path: str
    verdict: str  # clean | issues | error | incomplete | skipped
    severity: Severity | None
    sha256: str | None
    size: int
    inode: tuple[int, int]
    rule_ids: tuple[str, ...] = ()
    findings: tuple[dict, ...] = ()
    hf: dict | None = None
    extra: dict = field(default_factory=dict)
    #: the core's typed result for the bytes that were scanned (None for a scan error)
    result: FileResult | None = None
    #: (dev, ino, size, mtime_ns, ctime_ns) of the file the worker opened: act only on this
    identity: Identity | None = None
    #: the watched root the file was opened below (the quarantine opens it below the same root)
    root: str | None = None

    def actionable(self, threshold: Severity) -> bool:
        return self.verdict == "issues" and self.severity is not None and self.severity >= threshold


class Action(Protocol):
    name: str

    def handle(self, outcome: Outcome) -> dict | None:
        """Act on one outcome; return what was done (logged by the caller) or None."""
        ...

    def acts_on(self, row) -> bool:
        """Would `handle` act on a file (still in place) whose cached verdict is this
        baseline row? Then the row is no settled verdict: the file is scanned again."""
        ...


class LogAction:
    """Detect mode: say what a quarantine would have acted on; never touch the file."""

    name = "detect"

    def __init__(self, threshold: Severity):
        self.threshold = threshold
        self.log = mlog.get()

    def handle(self, outcome: Outcome) -> dict | None:
        if not outcome.actionable(self.threshold):
            return None
        self.log.warning(
            "action.detect",
            path=outcome.path,
            severity=outcome.severity.name.lower(),
            threshold=self.threshold.name.lower(),
            sha256=outcome.sha256,
            rule_ids=list(outcome.rule_ids),
            hf=outcome.hf,
            note="detect mode: logged only, file left in place",
        )
        return {"action": "detect"}

    def acts_on(self, row) -> bool:
        return False  # a log line is no lasting action: a cached verdict is settled


def make_action(mode: str, threshold: Severity, config=None, fingerprint: str | None = None) -> Action:
    if mode == "detect":
        return LogAction(threshold)
    if mode == "quarantine":
        if config is None:
            raise ValueError("quarantine mode needs the daemon's config")
        from modelscand.quarantine.action import QuarantineAction

        return QuarantineAction(config, fingerprint=fingerprint)
    raise ValueError(f"mode {mode!r} has no action")
