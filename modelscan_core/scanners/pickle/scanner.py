"""The pickle format: run the VM over every pickle in the stream, judge what it found.

Also the entry point other scanners use for the pickles they contain (`scan_pickles`):
torch's legacy format is five pickles in a row, joblib interleaves arrays with opcodes.
"""

from __future__ import annotations

import binascii
import bz2
import io
import zlib
from typing import BinaryIO, Callable

from modelscan_core.model import Severity
from modelscan_core.scanners.interface import Item, ScanContext, Scanner
from modelscan_core.scanners.pickle.flow import analyse, observer_factory, reachable_globals
from modelscan_core.scanners.pickle.policy import NESTED
from modelscan_core.scanners.pickle.values import Blob, Call, GlobalRef, grown_bytes, render, render_call
from modelscan_core.scanners.pickle.vm import BuildHook, PickleVM, StreamFacts
from modelscan_core.sources.window import Window
from modelscan_core.scanners.joblib import joblib_hook


class PickleScanner(Scanner):
    name = "modelscan.scanners.PickleUnsafeOpScan"
    formats = ("pickle",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        scan_pickles(item.stream, item.size, ctx, scanner=self.name,
                     hooks=lambda c: joblib_hook(item.stream, item.size, c, self.name))


#: readings of one stream the scanner follows besides the first (every way a loader could
#: read FRAMEs that end inside operands); a file needing more is reported incomplete
MAX_READINGS = 16

HookFactory = Callable[[ScanContext], BuildHook]


def scan_pickles(
    stream: BinaryIO,
    size: int | None,
    ctx: ScanContext,
    *,
    scanner: str,
    hooks: HookFactory | None = None,
    max_streams: int | None = None,
    reader: str = "bytes",
) -> list[StreamFacts]:
    """Scan one or more pickles from the stream's current position; report into `ctx`.

    Pickles that follow a complete one are scanned too (a loader may call `load` again).
    Bytes after a complete pickle that do not form one are data the loader never executes.

    The bytes are read as `reader` reads them (vm.py), with `hooks` (joblib's arrays); then,
    where loaders would read the same bytes differently, every other reading is scanned too
    and what only they do is reported as well (`_other_readings`). Returns the facts of every
    stream of every reading.
    """
    start = stream.tell()
    seen: set = set()
    primary = _Reporting(ctx, seen, alternate=False)
    done, vm = _read_streams(stream, start, size, primary, scanner, reader, (), hooks, max_streams)
    return done + _other_readings(stream, start, size, ctx, seen, scanner, reader, hooks, max_streams, vm)


def _read_streams(stream, start, size, ctx, scanner, reader, choices, hooks, max_streams,
          speculative: bool = False) -> tuple[list[StreamFacts], PickleVM]:
    """One reading: the pickles from `start` on, reported into `ctx` as they are read."""
    stream.seek(start)
    vm = new_vm(stream, size, ctx, reader=reader, frame_choices=choices,
                build_hook=hooks(ctx) if hooks is not None else None)
    done: list[StreamFacts] = []
    while max_streams is None or len(done) < max_streams:
        facts = vm.run()
        if done and facts.error and not (facts.globals or facts.unresolved or facts.calls):
            break  # trailing data after a complete pickle
        done.append(facts)
        if speculative:  # a call of a plain value from the benign part is no payload of this reading
            facts.dynamic_calls = [c for c in facts.dynamic_calls if reachable_globals(c.func)]
        report_facts(facts, ctx, scanner=scanner, stream=stream, errors=not isinstance(ctx, _Reporting) or not ctx.alternate)
        if facts.error or vm.at_eof():
            break
    return done, vm


def _other_readings(stream, start, size, ctx, seen, scanner, reader, hooks, max_streams, vm) -> list[StreamFacts]:
    """The readings other loaders make of the same bytes, where they differ from the first.

    - FRAMEs whose end falls inside an operand (or before a STOP): the C unpickler reading a
      file without `peek` (torch.load's data.pkl) skips what is left of the frame; with `peek`
      (pickle.load, np.load) each such FRAME may go either way. Every combination of choices
      that changes something is followed (`vm.mattered`), up to MAX_READINGS.
    - joblib arrays (a hook took bytes): `pickle.load` of the same file reads those bytes as
      opcodes; and an array read while a frame still had bytes is read by joblib.load's
      pure-Python unpickler from the frame's end, with the rest of the frame run after it.
    What only those readings do is reported too; their errors are not the file's.
    """
    if reader != "bytes":
        return []
    out: list[StreamFacts] = []
    alternate = _Reporting(ctx, seen, alternate=True)

    # a speculative reading (pickle.load of a joblib file: array bytes as opcodes, an object
    # array's own pickle run with the outer memo) reports only names on the denylist: what a
    # benign file's bytes spell there is noise the real load fails on, never a payload
    speculative_ctx = _Reporting(ctx, seen, alternate=True, only=_DENYLISTED)

    def run(reader_: str, choices: tuple[bool, ...], hooks_, speculative=False) -> PickleVM:
        facts, other = _read_streams(stream, start, size, speculative_ctx if speculative else alternate, scanner,
                                     reader_, choices, hooks_, max_streams, speculative)
        out.extend(facts)
        return other

    framing = bool(vm.mattered)
    if vm.hook_in_frame and hooks is not None:
        run("python", (), hooks)
    if vm.hook_consumed:
        # pickle.load of a joblib file: no hooks, the array bytes are opcodes (a benign array's
        # bytes break off at once; only calls of denylisted names they import count)
        first = len(out)
        root = run("bytes", (), None, speculative=True)
        if root.mattered:
            run("file", (), None, speculative=True)
        arrays = getattr(vm.build_hook, "arrays", ())
        policy = ctx.settings.pickle_policy
        calls = [at for facts in out[first:] for at in _call_offsets(facts, policy) if any(a <= at < a + n for a, n in arrays)]
        if calls:
            ctx.report(
                "joblib/array-bytes-are-a-pickle",
                Severity.HIGH,
                f"the bytes of a joblib array form opcodes that make {len(calls)} call(s) (first at offset {calls[0]}): "
                "joblib.load skips them, but pickle.load would run them",
                module="joblib.numpy_pickle",
                operator="NumpyArrayWrapper",
                offset=calls[0],
            )
    elif framing:
        run("file", (), None)
        queue = [(False,) * j + (True,) for j in sorted(vm.mattered)]
        readings = 1
        while queue and readings < MAX_READINGS:
            choices = queue.pop(0)
            other = run("bytes", choices, None)
            readings += 1
            queue += [choices + (False,) * (j - len(choices)) + (True,) for j in sorted(other.mattered) if j >= len(choices)]
        if queue:
            ctx.error(f"pickle stream at offset {start}: FRAMEs end inside operands in more places than the scanner "
                      f"follows; {readings} of the ways a loader could read it were scanned", "PICKLE_GENOPS",
                      incomplete=True)
    if framing or vm.hook_in_frame:
        at, what = vm.divergences[0] if vm.divergences else (start, "a joblib array inside a frame")
        ctx.report(
            "pickle/frame-straddle",
            ctx.settings.pickle_policy.unknown.unresolved,
            f"Pickle framing no writer produces, at offset {at} ({what}): pickle.loads, torch.load, pickle.load "
            "and joblib.load read different opcodes here; every reading was scanned",
            offset=at,
        )
    stream.seek(start)
    return out


def _report_bombs(facts: StreamFacts, ctx: ScanContext) -> None:
    """Values built to exhaust whoever loads or walks them (billion laughs, deep nesting, a
    key whose hash never finishes): no code runs, but the process loading them is stuck."""
    if facts.hash_bomb is not None:
        at, weight = facts.hash_bomb
        ctx.report("pickle/hash-bomb", Severity.MEDIUM,
                   f"Pickle makes the unpickler hash a key of more than {weight:,} values (shared parts counted each "
                   "time): loading it does not finish", offset=at)
    if facts.expansion is not None:
        at, weight = facts.expansion
        ctx.report("pickle/expansion-bomb", Severity.MEDIUM,
                   f"Pickle builds a value of more than {weight:,} values for a walk over it (repr, copy, json, "
                   "hashing), shared parts counted each time: a resource-exhaustion payload", offset=at)
    if facts.nesting is not None:
        at, depth = facts.nesting
        ctx.report("pickle/deep-nesting", Severity.MEDIUM,
                   f"Pickle nests values more than {depth:,} deep (no writer does): code that walks the loaded "
                   "object recursively crashes", offset=at)


#: what a speculative reading may report: the denylist, and dunder walks (`numpy.__builtins__`),
#: which no benign bytes spell either
_DENYLISTED = frozenset({"pickle/unsafe-global", "pickle/introspection"})


def _call_offsets(facts: StreamFacts, policy) -> list[int]:
    """Where a stream calls a denylisted name (the kept calls of each)."""
    return sorted(c.offset for ref in facts.globals if ref.ncalls
                  and policy.judge(ref.module, ref.name, ref.uses).rule_id in _DENYLISTED for c in ref.calls)


class _Reporting(ScanContext):
    """The scan context as one reading sees it: the first reading reports everything; the
    others report only what no reading reported before, and no errors of their own."""

    def __init__(self, ctx: ScanContext, seen: set, alternate: bool, only: frozenset | None = None):
        self._ctx, self._seen, self.alternate, self.only = ctx, seen, alternate, only
        self.settings, self.limits, self.depth = ctx.settings, ctx.limits, ctx.depth

    def report(self, rule_id, severity, description, **kw):
        if self.only is not None and rule_id not in self.only:
            return None
        key = (rule_id, severity, description, kw.get("module", ""), kw.get("operator", ""), kw.get("source"))
        if key in self._seen:
            return None
        self._seen.add(key)
        return self._ctx.report(rule_id, severity, description, **kw)

    def error(self, description, category="MODEL_SCAN", incomplete=False):
        if self.alternate:
            return None
        return self._ctx.error(description, category, incomplete)

    def scan_member(self, name, open_stream, size, format_hint=None):
        if self.alternate and ("member", name) in self._seen:
            return None
        self._seen.add(("member", name))
        return self._ctx.scan_member(name, open_stream, size, format_hint)

    def charge_bytes(self, nbytes):
        return self._ctx.charge_bytes(nbytes)


def new_vm(stream: BinaryIO, size: int | None, ctx: ScanContext, **kwargs) -> PickleVM:
    """A VM whose globals are observed call by call for the settings' policy (see flow.py).

    The observer lives on the policy itself: kept in a WeakKeyDictionary keyed by the policy,
    it held its key alive (the observer closes over the policy) and every Settings ever made
    stayed in memory (a scan_stream without settings makes one)."""
    policy = ctx.settings.pickle_policy
    observe = getattr(policy, "_vm_observer", None)
    if observe is None:
        observe = policy._vm_observer = observer_factory(policy)
    return PickleVM(stream, size=size, memo_budget=ctx.limits.max_memo_values, observe=observe, **kwargs)


def report_facts(facts: StreamFacts, ctx: ScanContext, *, scanner: str, stream: BinaryIO, errors: bool = True) -> None:
    """Judge one stream's facts with the settings' policy and report them.

    `errors=False` is for streams read speculatively (array bytes as another loader would
    read them): their breaking off is expected and is not an error of the file.
    """
    policy = ctx.settings.pickle_policy
    unknown = policy.unknown
    indirect = analyse(facts, policy)
    payloads: dict[int, object] = {}  # offset -> bytes or Blob that a loader may unpickle
    for ref in indirect.globals:
        if policy.role(ref.module, ref.name) == NESTED:
            _nested_payloads(ref, ctx, stream, payloads)
        for call in ref.calls:  # bytes holding a pickle, passed to anything: scan it too
            for arg in call.args if isinstance(call.args, tuple) else ():
                head = static_bytes(arg, stream, limit=2)  # cheap: array data is not re-encoded
                if head is not None and _looks_like_pickle(head, stream):
                    payloads.setdefault(call.offset, static_bytes(arg, stream))
        if id(ref) in indirect.suppressed:
            continue
        judgement = policy.judge(ref.module, ref.name, ref.uses)
        suspicious = indirect.suspicious.get(id(ref))
        if suspicious is not None and (judgement.severity is None or judgement.severity < unknown.suspicious_args):
            call, why = suspicious
            ctx.report(
                "pickle/suspicious-arguments",
                unknown.suspicious_args,
                f"Construction of '{ref.name}' from module '{ref.module}' with an argument that reads as {why}",
                module=ref.module,
                operator=ref.name,
                offset=call.offset,
                call=render_call(call),
            )
        if judgement.severity is None:
            continue
        description = _describe(judgement.rule_id, ref.module, ref.name)
        if judgement.resolved and judgement.resolved != f"{ref.module}.{ref.name}":
            description += f" (it is {judgement.resolved})"
        ctx.report(
            judgement.rule_id,
            judgement.severity,
            description,
            module=ref.module,
            operator=ref.name,
            offset=ref.offset,
            call=render_call(ref.calls[0]) if ref.calls else None,
        )
    for issue in indirect.issues:
        ctx.report(
            issue.rule_id,
            issue.severity,
            issue.message,
            module=issue.module,
            operator=issue.operator,
            offset=issue.offset,
            call=render_call(issue.call) if issue.call is not None else None,
        )
    for offset, detail in facts.unresolved:
        ctx.report(
            "pickle/unresolved-global",
            unknown.unresolved,
            f"Import of a name the scanner cannot resolve statically: {detail}",
            offset=offset,
        )
    for dyn in indirect.dynamic_calls:
        ctx.report(
            "pickle/dynamic-call",
            unknown.dynamic_call,
            f"Call of a value computed at load time: {render(dyn.func)}",
            offset=dyn.offset,
            call=render_call(dyn),
        )
    _report_bombs(facts, ctx)
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
    for offset, payload in sorted(payloads.items()):
        _scan_nested(ctx, stream, offset, payload)


def _nested_payloads(ref, ctx: ScanContext, stream: BinaryIO, payloads: dict[int, object]) -> None:
    """The pickles a nested loader is handed; a payload that cannot be worked out is a finding."""
    severity = ctx.settings.pickle_policy.unknown.unresolved
    calls = getattr(ref.observer, "calls", None) or ref.calls
    for call in calls:
        args = call.args if isinstance(call.args, tuple) else ()
        payload = static_bytes(args[0], stream) if args else None
        if payload is None:
            ctx.report(
                "pickle/nested-unresolved",
                severity,
                f"'{ref.module}.{ref.name}' unpickles a value the scanner cannot work out statically",
                module=ref.module,
                operator=ref.name,
                offset=call.offset,
                call=render_call(call),
            )
        else:
            payloads[call.offset] = payload
    if ref.ncalls > len(calls):
        ctx.report(
            "pickle/nested-unresolved",
            severity,
            f"'{ref.module}.{ref.name}' is called {ref.ncalls} times; only the first {len(calls)} payloads were scanned",
            module=ref.module,
            operator=ref.name,
            offset=ref.offset,
        )


#: how bytes reach a pickle: as they are, or wrapped the way protocol 2 and callers wrap them
_ENCODERS = {("_codecs", "encode"), ("codecs", "encode")}
_BYTES_WRAPPERS = {("builtins", "bytes"), ("builtins", "bytearray"), ("__builtin__", "bytearray"),
                   ("io", "BytesIO"), ("_io", "BytesIO")}
_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}
_DECODERS = {("_codecs", "decode"), ("codecs", "decode"), ("_codecs", "encode"), ("codecs", "encode")}
#: bytes-to-bytes codecs, by the names codecs.lookup accepts: no pickle writer emits them, a
#: payload hidden behind one (hex text, base64, zlib) is decoded here to be scanned like any
_TRANSFORMS = {"hex": "hex", "hex_codec": "hex", "base64": "base64", "base_64": "base64", "base64_codec": "base64",
               "zlib": "zlib", "zip": "zlib", "zlib_codec": "zlib", "bz2": "bz2", "bz2_codec": "bz2"}
#: a text operand longer than this is not re-encoded in memory (the payload stays unresolved)
_MAX_TEXT_PAYLOAD = 64 << 20


def static_bytes(value: object, stream: BinaryIO, limit: int | None = None, *, _depth: int = 0) -> bytes | Blob | None:
    """The bytes a value stands for, when the pickle fixes them: literal bytes (inline or left
    in the file), `_codecs.encode(text, "latin1")`, `bytes(...)`, `bytearray(...)`, `BytesIO(...)`.

    With `limit`, only (at least) the first `limit` bytes matter: long text is not read whole.
    """
    if grown_bytes(value):
        return None  # a bytearray the pickle extended: not what the operand holds
    if isinstance(value, (bytes, bytearray)):
        return bytes(value[:limit] if limit is not None else value)
    if isinstance(value, Blob):
        return value if not value.is_text else None
    if not isinstance(value, Call) or not isinstance(value.func, GlobalRef):
        return None
    key = (value.func.module, value.func.name)
    args = value.args if isinstance(value.args, tuple) else ()
    transform = _TRANSFORMS.get(args[1].lower().replace("-", "_")) if len(args) > 1 and isinstance(args[1], str) else None
    if key in _DECODERS and transform is not None:
        if _depth > 32:
            return None
        data = args[0]
        if isinstance(data, str) or (isinstance(data, Blob) and data.is_text and data.length <= _MAX_TEXT_PAYLOAD):
            data = (data if isinstance(data, str) else _read(stream, data).decode("utf-8", "ignore")).encode("latin-1", "ignore")
        else:
            data = static_bytes(data, stream, None, _depth=_depth + 1)
            if isinstance(data, Blob):
                data = _read(stream, data) if data.length <= _MAX_TEXT_PAYLOAD else None
        return _transform(data, transform, limit)
    if key in _ENCODERS and args:
        encoding = args[1] if len(args) > 1 else "utf-8"
        text = args[0]
        if isinstance(text, Blob) and text.is_text and limit is not None:
            # at most 4 UTF-8 bytes a character; a character cut at the end is dropped
            text = _read(stream, Blob(text.offset, min(text.length, 4 * limit))).decode("utf-8", "ignore")
        elif isinstance(text, Blob) and text.is_text and text.length <= _MAX_TEXT_PAYLOAD:
            text = _read(stream, text).decode("utf-8", "surrogatepass")
        if not isinstance(text, str) or not isinstance(encoding, str):
            return None
        if limit is not None:
            text = text[:limit]
        try:
            return text.encode("latin-1" if encoding.lower() in _LATIN1 else encoding)
        except (UnicodeError, LookupError, ValueError):  # (ValueError: a NUL in the codec's name)
            return None
    if key in _BYTES_WRAPPERS and len(args) == 1:
        if _depth > 32:  # bytes(bytes(bytes(...))) a hundred thousand deep: give up, unresolved
            return None
        return static_bytes(args[0], stream, limit, _depth=_depth + 1)
    return None


def _transform(data: bytes | None, codec: str, limit: int | None) -> bytes | None:
    """What a bytes-to-bytes codec makes of `data` (decoding), at most _MAX_TEXT_PAYLOAD bytes."""
    if data is None:
        return None
    cap = _MAX_TEXT_PAYLOAD if limit is None else max(limit, 64)
    try:
        if codec == "hex":
            return binascii.a2b_hex(b"".join(data.split()))[:cap]
        if codec == "base64":
            return binascii.a2b_base64(data)[:cap]
        if codec == "zlib":
            return zlib.decompressobj().decompress(data, cap)
        return bz2.BZ2Decompressor().decompress(data, cap)
    except (binascii.Error, ValueError, OSError, zlib.error, EOFError):
        return None


def _read(stream: BinaryIO, blob: Blob) -> bytes:
    pos = stream.tell()
    try:
        stream.seek(blob.offset)
        return stream.read(blob.length)
    finally:
        stream.seek(pos)


def _looks_like_pickle(payload: bytes | Blob, stream: BinaryIO) -> bool:
    head = payload[:2] if isinstance(payload, bytes) else _read(stream, Blob(payload.offset, min(2, payload.length)))
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _scan_nested(ctx: ScanContext, stream: BinaryIO, offset: int, payload: object) -> None:
    """A pickle handed to pickle.loads (or torch's _load_from_bytes...) is scanned as a member."""
    if isinstance(payload, bytes):
        opener, size, head = (lambda: io.BytesIO(payload)), len(payload), payload[:2]
    elif isinstance(payload, Blob):
        opener, size = (lambda: Window(stream, payload.offset, payload.length)), payload.length
        head = _read(stream, Blob(payload.offset, min(2, payload.length)))
    else:
        return
    # torch.save output is a zip since 1.6: let detection take those; anything else the loader
    # unpickles, so it is read as a pickle whatever it looks like
    ctx.scan_member(f"pickle@{offset}", opener, size, None if head == b"PK" else "pickle")


def _describe(rule_id: str, module: str, name: str) -> str:
    if rule_id == "pickle/unsafe-global":
        return f"Use of unsafe operator '{name}' from module '{module}'"
    what = {
        "pickle/introspection": "Attribute walk into the interpreter's internals through",
        "pickle/unresolved-attribute": "Use of an unresolvable attribute",
        "pickle/unknown-call": "Call of unknown callable",
        "pickle/unknown-class-call": "Construction of unknown class",
        "pickle/unknown-instance": "Instantiation of unknown class",
        "pickle/unknown-reference": "Import of unknown name",
    }.get(rule_id, "Use of")
    return f"{what} '{name}' from module '{module}'"
