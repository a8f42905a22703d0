"""A report a person can act on: what was found, where, how bad, what it would do."""

from __future__ import annotations

from modelscan_core.model import ScanReport, Severity, Verdict
from modelscan_core.reports.interface import ReportOptions
from modelscan_core.reports.text import printable

_COLORS = {Severity.CRITICAL: "\033[1;31m", Severity.HIGH: "\033[31m", Severity.MEDIUM: "\033[33m", Severity.LOW: "\033[36m"}
_RESET = "\033[0m"


def render(report: ScanReport, options: ReportOptions) -> str:
    def paint(text: str, severity: Severity | None = None, code: str | None = None) -> str:
        if not options.color:
            return text
        return f"{code or _COLORS.get(severity, '')}{text}{_RESET}"

    out: list[str] = []
    scanned = report.scanned()
    findings = report.findings()
    errors = report.all_errors()
    skipped = report.skipped()
    out.append(f"modelscan {report.version}: scanned {len(scanned)} file(s) under {report.absolute_path} "
               f"in {report.elapsed_s:.2f} s")
    out.append("")
    out.append(paint("--- Summary ---", code="\033[34m"))
    if findings:
        counts = {s: sum(1 for f in findings if f.severity == s) for s in reversed(Severity)}
        out.append(f"Total issues: {len(findings)}")
        for severity, n in counts.items():
            out.append(f"    - {paint(severity.name, severity) if n else severity.name}: {n}")
        out.append("")
        out.append(paint("--- Issues by severity ---", code="\033[34m"))
        for severity in reversed(Severity):
            group = [f for f in findings if f.severity == severity]
            if not group:
                continue
            out.append("")
            out.append(paint(f"--- {severity.name} ---", severity))
            for f in group:
                where = f.source + (f" (byte {f.offset})" if f.offset is not None else "")
                out.append("")
                out.append(f"{paint(severity.name, severity)}  {where}")
                out.append(f"    {f.description}")
                if f.call:
                    out.append(f"    would run: {f.call}")
                out.append(f"    rule: {f.rule_id}   scanner: {f.scanner}")
    elif errors:
        out.append("No issues found in what could be read, but some files could not be fully read (see Errors):")
        out.append("they are NOT known to be safe.")
    elif scanned:
        out.append(paint("No issues found.", code="\033[32m"))
    else:
        out.append("No supported model files were found: nothing was scanned.")
    if errors:
        out.append("")
        out.append(paint("--- Errors ---", code="\033[31m"))
        for n, e in enumerate(errors, 1):
            kind = "incomplete" if e.incomplete else "error"
            out.append(f"{n}. {e.source}: [{e.category}, {kind}] {e.description}")
    unsafe = [r for r in report.files if r.verdict in (Verdict.ERROR, Verdict.INCOMPLETE, Verdict.ISSUES)]
    if unsafe and (findings or errors):
        out.append("")
        out.append(paint("--- Files not known to be safe ---", code="\033[34m"))
        for r in unsafe:
            worst = r.max_severity
            out.append(f"{r.source}: {r.verdict.value}" + (f" (worst: {worst.name})" if worst else "") +
                       (f" sha256={r.sha256}" if r.sha256 else ""))
    if skipped:
        out.append("")
        out.append(paint("--- Skipped ---", code="\033[34m"))
        out.append(f"{len(skipped)} file(s) were not scanned: no model format was recognised in their content.")
        if options.show_skipped:
            for s in skipped:
                out.append(f"    {s.source}: {s.description}")
        else:
            out.append("Use --show-skipped to list them.")
    # names and operands from hostile files may hold undecodable bytes: shown as \xNN
    return printable("\n".join(out) + "\n")
