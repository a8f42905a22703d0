"""The pickle format: run the VM over every pickle in the stream, judge what it found.

Also the entry point other scanners use for the pickles they contain (`scan_pickles`):
torch's legacy format is five pickles in a row, joblib interleaves arrays with opcodes.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from modelscan_core.scanners.interface import Item, ScanContext, Scanner
from modelscan_core.scanners.pickle.policy import NESTED_LOADERS, propagate_uses
from modelscan_core.scanners.pickle.values import Blob, render, render_call
from modelscan_core.scanners.pickle.vm import BuildHook, PickleVM, StreamFacts
from modelscan_core.sources.window import Window
from modelscan_core.scanners.joblib import joblib_hook


class PickleScanner(Scanner):
    name = "modelscan.scanners.PickleUnsafeOpScan"
    formats = ("pickle",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        scan_pickles(item.stream, item.size, ctx, scanner=self.name, build_hook=joblib_hook(item.stream, item.size, ctx, self.name))


def scan_pickles(
    stream: BinaryIO,
    size: int | None,
    ctx: ScanContext,
    *,
    scanner: str,
    build_hook: BuildHook | None = None,
    max_streams: int | None = None,
) -> list[StreamFacts]:
    """Scan one or more pickles from the stream's current position; report into `ctx`.

    Pickles that follow a complete one are scanned too (a loader may call `load` again).
    Bytes after a complete pickle that do not form one are data the loader never executes.
    """
    vm = PickleVM(stream, size=size, memo_budget=ctx.limits.max_memo_values, build_hook=build_hook)
    done: list[StreamFacts] = []
    while max_streams is None or len(done) < max_streams:
        facts = vm.run()
        if done and facts.error and not (facts.globals or facts.unresolved or facts.calls):
            break  # trailing data after a complete pickle
        done.append(facts)
        report_facts(facts, ctx, scanner=scanner, stream=stream)
        if facts.error or vm.at_eof():
            break
    return done


def report_facts(facts: StreamFacts, ctx: ScanContext, *, scanner: str, stream: BinaryIO, errors: bool = True) -> None:
    """Judge one stream's facts with the settings' policy and report them.

    `errors=False` is for streams read speculatively (array bytes as another loader would
    read them): their breaking off is expected and is not an error of the file.
    """
    policy = ctx.settings.pickle_policy
    propagate_uses(facts.globals, facts.dynamic_calls)
    nested: list[tuple[int, object]] = []
    for ref in facts.globals:
        judgement = policy.judge(ref.module, ref.name, ref.uses)
        if (ref.module, ref.name) in NESTED_LOADERS:
            nested += [(call.offset, call.args[0]) for call in ref.calls if isinstance(call.args, tuple) and call.args]
        if judgement.severity is None:
            continue
        call = render_call(ref.calls[0]) if ref.calls else None
        ctx.report(
            judgement.rule_id,
            judgement.severity,
            _describe(judgement.rule_id, ref.module, ref.name),
            module=ref.module,
            operator=ref.name,
            offset=ref.offset,
            call=call,
        )
    unknown = policy.unknown
    for offset, detail in facts.unresolved:
        ctx.report(
            "pickle/unresolved-global",
            unknown.unresolved,
            f"Import of a name the scanner cannot resolve statically: {detail}",
            offset=offset,
        )
    for dyn in facts.dynamic_calls:
        ctx.report(
            "pickle/dynamic-call",
            unknown.dynamic_call,
            f"Call of a value computed at load time: {render(dyn.func)}",
            offset=dyn.offset,
            call=render_call(dyn),
        )
    if facts.error and errors:
        ctx.error(
            f"pickle stream starting at offset {facts.start} cannot be read past offset "
            f"{facts.error_offset}: {facts.error}",
            category="PICKLE_GENOPS",
            incomplete=facts.error_incomplete,
        )
        if facts.calls:
            ctx.report(
                "pickle/call-before-error",
                unknown.call_before_error,
                f"Pickle breaks at offset {facts.error_offset} after {facts.calls} call(s): "
                "a loader makes those calls before it fails",
                offset=facts.error_offset,
            )
    for offset, payload in nested:
        _scan_nested(ctx, stream, offset, payload)


def _scan_nested(ctx: ScanContext, stream: BinaryIO, offset: int, payload: object) -> None:
    """A pickle passed to pickle.loads (or torch's _load_from_bytes) is scanned as a member."""
    if isinstance(payload, (bytes, bytearray)):
        data = bytes(payload)
        ctx.scan_member(f"pickle@{offset}", lambda: io.BytesIO(data), len(data))
    elif isinstance(payload, Blob) and not payload.is_text:
        ctx.scan_member(f"pickle@{offset}", lambda: Window(stream, payload.offset, payload.length), payload.length)


def _describe(rule_id: str, module: str, name: str) -> str:
    if rule_id == "pickle/unsafe-global":
        return f"Use of unsafe operator '{name}' from module '{module}'"
    what = {
        "pickle/unknown-call": "Call of unknown callable",
        "pickle/unknown-class-call": "Construction of unknown class",
        "pickle/unknown-instance": "Instantiation of unknown class",
        "pickle/unknown-reference": "Import of unknown name",
    }.get(rule_id, "Use of")
    return f"{what} '{name}' from module '{module}'"

