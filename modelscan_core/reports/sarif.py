"""SARIF 2.1.0, for code-scanning dashboards: one rule per rule id, one result per finding.

Locations are relative URIs under the `SCANROOT` base (the scanned directory). An archive
member cannot be a URI of its own, so its result points at the outer file and names the
member in the message and in `properties.member`.
"""

from __future__ import annotations

import json
import os
from urllib.parse import quote

from modelscan_core.model import Finding, ScanReport, Severity
from modelscan_core.reports.interface import ReportOptions
from modelscan_core.reports.text import clean_tree, raw_bytes

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_LEVEL = {Severity.CRITICAL: "error", Severity.HIGH: "error", Severity.MEDIUM: "warning", Severity.LOW: "note"}
_SCORE = {Severity.CRITICAL: "9.8", Severity.HIGH: "8.0", Severity.MEDIUM: "5.0", Severity.LOW: "2.0"}


def render(report: ScanReport, options: ReportOptions) -> str:
    return json.dumps(as_dict(report), indent=2, ensure_ascii=False) + "\n"


def as_dict(report: ScanReport) -> dict:
    """SARIF as JSON-ready data; strings that are not valid UTF-8 are escaped (`reports.text`)."""
    return clean_tree(_raw_dict(report), keep_bytes=False)  # SARIF objects take no extra keys


def _raw_dict(report: ScanReport) -> dict:
    findings = report.findings()
    rules: list[dict] = []
    index: dict[str, int] = {}
    for f in findings:
        if f.rule_id not in index:
            index[f.rule_id] = len(rules)
            rules.append(_rule(f))
        else:  # a rule's default level is the worst it was seen at
            rule = rules[index[f.rule_id]]
            if float(_SCORE[f.severity]) > float(rule["properties"]["security-severity"]):
                rule["defaultConfiguration"]["level"] = _LEVEL[f.severity]
                rule["properties"]["security-severity"] = _SCORE[f.severity]
    results = [_result(f, index[f.rule_id]) for f in findings]
    notifications = [
        {
            "level": "error",
            "message": {"text": f"{e.source}: {e.description}"},
            "descriptor": {"id": e.category},
            "locations": [_location(e.source, None)],
        }
        for e in report.all_errors()
    ]
    base_uri = "file://" + quote(raw_bytes(report.absolute_path.rstrip(os.sep) + "/"))
    return {
        "$schema": SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "modelscan",
                        "semanticVersion": report.version,
                        "rules": rules,
                    }
                },
                "originalUriBaseIds": {"SCANROOT": {"uri": base_uri}},
                "invocations": [
                    {
                        "executionSuccessful": not notifications,
                        "toolExecutionNotifications": notifications,
                    }
                ],
                "results": results,
            }
        ],
    }


def _rule(f: Finding) -> dict:
    return {
        "id": f.rule_id,
        "name": "".join(part.capitalize() for part in f.rule_id.replace("/", "-").split("-")),
        "shortDescription": {"text": f.rule_id.replace("/", ": ").replace("-", " ")},
        "defaultConfiguration": {"level": _LEVEL[f.severity]},
        "properties": {"security-severity": _SCORE[f.severity], "tags": ["security", "model-serialization"]},
    }


def _result(f: Finding, rule_index: int) -> dict:
    text = f"{f.description} in {f.source}"
    if f.call:
        text += f"; the loader would run {f.call}"
    properties = {"severity": f.severity.name, "scanner": f.scanner}
    outer, _, member = f.source.partition(":")
    if member:
        properties["member"] = member
    if f.call:
        properties["call"] = f.call
    return {
        "ruleId": f.rule_id,
        "ruleIndex": rule_index,
        "level": _LEVEL[f.severity],
        "message": {"text": text},
        "locations": [_location(f.source, f.offset)],
        "properties": properties,
    }


def _location(source: str, offset: int | None) -> dict:
    outer, _, member = source.partition(":")
    physical: dict = {"artifactLocation": {"uri": quote(raw_bytes(outer.replace(os.sep, "/"))), "uriBaseId": "SCANROOT"}}
    if offset is not None and not member:
        physical["region"] = {"byteOffset": offset}
    return {"physicalLocation": physical}
