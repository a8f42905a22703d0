"""The modelscan JSON report: modelscan 0.8.8's keys in its order, our extras beside them.

Always valid UTF-8 JSON: a path or name that is not valid UTF-8 is shown with `\\xNN` for
each undecodable byte, and its exact bytes are kept in hex in a sibling `<key>_bytes` field
(`source_bytes`, `container_bytes`, ...).
"""

from __future__ import annotations

import json

from modelscan_core.model import FileResult, ScanReport, Severity
from modelscan_core.reports.interface import ReportOptions
from modelscan_core.reports.text import clean_tree


def render(report: ScanReport, options: ReportOptions) -> str:
    return json.dumps(as_dict(report, options), indent=2, ensure_ascii=False) + "\n"


def as_dict(report: ScanReport, options: ReportOptions) -> dict:
    """The report as JSON-ready data, every string printable (see the module docstring)."""
    return clean_tree(_raw_dict(report, options))


def _raw_dict(report: ScanReport, options: ReportOptions) -> dict:
    findings = report.findings()
    by_severity = {s.name: 0 for s in Severity}
    for f in findings:
        by_severity[f.severity.name] += 1
    scanned = [r.source for r in report.scanned()]
    summary: dict = {
        "total_issues_by_severity": by_severity,
        "total_issues": len(findings),
        "input_path": report.input_path,
        "absolute_path": report.absolute_path,
        "modelscan_version": report.version,
        "timestamp": report.timestamp,
        "scanned": {"total_scanned": len(scanned)},
    }
    if scanned:
        summary["scanned"]["scanned_files"] = scanned
    if options.show_skipped:
        skipped = report.skipped()
        summary["skipped"] = {
            "total_skipped": len(skipped),
            "skipped_files": [{"category": s.category, "description": s.description, "source": s.source} for s in skipped],
        }
    issues = [
        {
            "description": f.description,
            "operator": f.operator,
            "module": f.module,
            "source": f.source,
            "scanner": f.scanner,
            "severity": f.severity.name,
            "rule_id": f.rule_id,
            "offset": f.offset,
            "call": f.call,
        }
        for f in findings
    ]
    errors = [
        {"category": e.category, "description": e.description, "source": e.source, "incomplete": e.incomplete}
        for e in report.all_errors()
    ]
    return {
        "summary": summary,
        "issues": issues,
        "errors": errors,
        "files": [entry for r in report.files for entry in _file_entries(r, None)],
        "exit_code": report.exit_code,
    }


def _file_entries(result: FileResult, container: str | None) -> list[dict]:
    worst = result.max_severity
    entries = [
        {
            "source": result.source,
            "container": container,
            "format": result.format,
            "size": result.size,
            "sha256": result.sha256,
            "verdict": result.verdict.value,
            "max_severity": worst.name if worst else None,
        }
    ]
    for member in result.members:
        entries += _file_entries(member, result.source)
    return entries
