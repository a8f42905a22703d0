"""Results: one verdict per scanned identity, logged, recorded, then acted on.

A worker's answer becomes, in this order: the verdict event (``scan.clean``,
``scan.finding``, ...) with everything an operator needs to act, the baseline row (a
state dir that cannot take it degrades the baseline to memory, never the verdict), and
the action (`Action.handle(Outcome)`: detect logs, quarantine moves). A file that changed
or was replaced under the scan gets no verdict: it is offered again.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from modelscan_core.model import Severity

from modelscand import hfcache
from modelscand.actions import Action, Outcome
from modelscand.config import Config
from modelscand.queue import Candidate
from modelscand.state import Baseline, Identity
from modelscand.workers import ScanReply
from modelscand.writers import looks_like_model, temp_rule

EVENTS = {
    "clean": ("scan.clean", "info"),
    "issues": ("scan.finding", "warning"),
    "error": ("scan.error", "error"),
    "incomplete": ("scan.incomplete", "warning"),
    "skipped": ("scan.skipped", "info"),
}


def new_counts() -> dict[str, int]:
    return {"scanned": 0, "clean": 0, "issues": 0, "error": 0, "incomplete": 0, "skipped": 0,
            "over_threshold": 0, "cached": 0, "overflows": 0, "handler_errors": 0,
            "unscanned": 0}  # model-named special files, directories a walk could not read


class Results:
    def __init__(self, config: Callable[[], Config], baseline: Callable[[], Baseline], action: Callable[[], Action],
                 log, counts: dict, reoffer: Callable[[str, str, str], None] | None = None,
                 watched: Callable[[str], bool] | None = None):
        self._config = config
        # is the candidate's root still watched? (a reload may remove it mid-scan: its verdict is
        # logged, but nothing is moved out of a directory the daemon no longer watches)
        self._watched = watched
        # a move refused because the file is not what was scanned any more (a chmod, a rewrite
        # no event announced) must not end there: what is there now is scanned again
        self._reoffer = reoffer
        self._baseline = baseline
        self._action = action
        self.log = log
        self.counts = counts

    def handle(self, cand: Candidate, ident: Identity, reply: ScanReply) -> None:
        status = reply.status
        baseline = self._baseline()
        if reply.verdict is None:  # gone, changed, replaced, escaped: no verdict for these bytes
            self.log.debug("scan.changed", path=cand.path, why=status, error=reply.error,
                           answer="the scheduler offers what is there now")
            return
        verdict = reply.verdict or "error"
        result = reply.result
        if reply.identity is not None:
            ident = reply.identity
        found = result.all_findings() if result is not None else []
        severity = result.max_severity if result is not None else None
        sev_name = severity.name.lower() if severity is not None else None
        rule_ids = sorted({f.rule_id for f in found})
        findings = [
            {"rule_id": f.rule_id, "severity": f.severity.name.lower(), "description": f.description[:500],
             "module": f.module, "operator": f.operator, "offset": f.offset,
             "call": (f.call or None) and f.call[:300], "source": f.source}
            for f in found[:50]
        ]
        errors = [{"category": e.category, "description": e.description[:300], "incomplete": e.incomplete}
                  for e in (result.all_errors()[:20] if result is not None else [])]
        sha = reply.sha256
        action = self._action()
        if getattr(action, "is_tombstone", None) is not None and action.is_tombstone(sha, ident.size):
            baseline.record(ident, cand.path, sha, "skipped", None, [])  # our own: neither a finding nor a move
            self.log.debug("quarantine.tombstone_seen", path=cand.path, sha256=sha)
            return
        self.counts["scanned"] += 1
        self.counts[verdict] = self.counts.get(verdict, 0) + 1
        if verdict == "issues" and severity is not None and severity >= self._config().threshold:
            self.counts["over_threshold"] += 1
        event, level = EVENTS.get(verdict, ("scan.error", "error"))
        # a model by name that no scanner can read: someone must look at it (an empty file
        # is nothing a loader could run)
        model_named = verdict == "skipped" and ident.size > 0 and self._model_named(cand)
        if model_named:
            level = "warning"
        elif verdict in ("clean", "skipped") and hfcache.metadata(cand.path):
            level = "debug"  # HF's refs, negative cache and locks: one info line each is noise
        fields = {
            "path": cand.path, "root": cand.root, "reason": cand.reason, "verdict": verdict,
            "format": result.format if result is not None else None, "size": ident.size, "sha256": sha,
            "severity": sev_name, "rule_ids": rule_ids, "inode": list(ident.inode),
            "mtime_ns": ident.mtime_ns, "ctime_ns": ident.ctime_ns, "scan_ms": reply.scan_ms,
            "latency_ms": round((time.monotonic() - cand.since) * 1000, 2),
        }
        if model_named:
            fields["model_named"] = True
        if cand.via:
            fields["via"] = cand.via
            if cand.outside:
                fields["outside_roots"] = True
        if reply.hash_note:
            fields["hash_note"] = reply.hash_note
        rule = temp_rule(os.path.basename(cand.path))
        if rule is not None:
            fields["temp"] = {"writer": rule.name, "status": "stale" if cand.reason == "stale_temp" else "temp"}
        if findings:
            fields["findings"] = findings
        if errors:
            fields["errors"] = errors
        if status != "ok":
            fields["error"] = reply.error
        hf = hfcache.describe(cand.path) if hfcache.maybe(cand.path) else None
        if hf:
            fields["hf"] = hf
        if sha and verdict == "issues":
            again = [r.path for r in baseline.same_content(sha, ident) if r.verdict == "issues"]
            if again:
                fields["seen_before"] = again[:3]
        getattr(self.log, level)(event, **fields)
        baseline.record(ident, cand.path, sha, verdict, sev_name, rule_ids)  # after the log: a full disk loses nothing
        outcome = Outcome(cand.path, verdict, severity, sha, ident.size, ident.inode, tuple(rule_ids),
                          tuple(findings), hf, result=result, identity=ident, root=cand.root,
                          extra={"format": fields["format"], "errors": errors, "error": fields.get("error"),
                                 **({"via": cand.via} if cand.via else {}),
                                 **({"outside_roots": True} if cand.outside else {}),
                                 **({"root_gone": True} if self._watched is not None and cand.root
                                    and not self._watched(cand.root) else {})})
        try:
            done = action.handle(outcome)
            if isinstance(done, dict) and done.get("action") == "changed" and self._reoffer is not None:
                self._reoffer(cand.path, "changed_before_move", cand.root)
        except Exception as exc:
            self.log.error("action.failed", path=cand.path, action=getattr(action, "name", "?"),
                           error=f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _model_named(cand: Candidate) -> bool:
        names = [os.path.basename(cand.path)] + ([os.path.basename(cand.via)] if cand.via else [])
        if hfcache.maybe(cand.path):  # an HF blob is known by its snapshot names
            hf = hfcache.describe(cand.path) or {}
            names += [os.path.basename(f["file"]) for f in hf.get("files", [])]
        return any(looks_like_model(n) for n in names)

    def log_cached(self, path: str, row) -> None:
        """run --once / scan: a file the baseline already knows is reported from it."""
        self.counts["cached"] += 1
        sev = Severity.parse(row.severity) if row.severity else None
        if row.verdict == "issues" and sev is not None and sev >= self._config().threshold:
            self.counts["over_threshold"] += 1
        if row.verdict in ("error", "incomplete"):
            self.counts[row.verdict] += 1
        self.log.info("scan.cached", path=path, verdict=row.verdict, severity=row.severity, sha256=row.sha256,
                      rule_ids=list(row.rule_ids), scanned_at=row.scanned_at, hf=hfcache.describe(path))
