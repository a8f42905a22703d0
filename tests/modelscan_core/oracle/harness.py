"""The differential oracle: what CPython's unpickler does with some bytes, against what the
scanner's VM says it would do.

`Oracle` keeps one `inert.py` worker process (limits set inside it) and asks it to read bytes
the way each loader does (see inert.py for the readings). A worker that hangs past the
timeout or dies is killed and replaced; the input is then counted as an oracle timeout, and
never compared (there is nothing to compare against).

`vm_view` runs the product's own pickle scanning (`scan_pickles`, every reading and every
stream it scans, judged by the default policy) and collects the facts it reported.
`uncovered` is the oracle's assertion: every global the unpickler resolved must be reported
by the VM with at least the same uses, every call of a computed value must show as a dynamic
call (or an unresolved name), every EXT lookup as an unresolved name.
"""

from __future__ import annotations

import io
import json
import os
import select
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from modelscan_core.engine import _Context, _Scan
from modelscan_core.settings import Settings

WORKER = Path(__file__).with_name("inert.py")
DEFAULT_READINGS = ("bytes", "file", "peek8192", "peek512", "python")

#: the uses bit set, as in values.py
USE_NAMES = {1: "referenced", 2: "given state", 4: "instantiated", 8: "called"}


class Oracle:
    """One inert worker, restarted after a timeout or a crash."""

    def __init__(self, timeout: float = 20.0):
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.timeouts = 0  # inputs the worker did not answer in time (or died on)
        self.crashes = 0  # of those, the worker had exited (a harness bug or a limit hit)
        self.inputs = 0
        self.longest = 0.0

    def _start(self) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        return subprocess.Popen([sys.executable, "-I", str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env)

    def read(self, data: bytes, readings: tuple[str, ...] = DEFAULT_READINGS) -> list[dict] | None:
        """Each reading's result, or None when the worker timed out or died on this input."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        self.inputs += 1
        started = time.monotonic()
        try:
            self.proc.stdin.write(struct.pack("<I", len(data)) + " ".join(readings).encode() + b"\n" + data)
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
            line = self.proc.stdout.readline() if ready else b""
        except (BrokenPipeError, OSError):
            line = b""
        self.longest = max(self.longest, time.monotonic() - started)
        if not line:
            self.timeouts += 1
            self.crashes += self.proc is not None and self.proc.poll() is not None
            self.close()
            return None
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@dataclass
class VMView:
    """What the scanner's VM reported for some bytes, across every stream and reading."""

    uses: dict[tuple[str, str], int] = field(default_factory=dict)
    dynamic: int = 0
    unresolved: int = 0
    errors: list[str] = field(default_factory=list)
    findings: list = field(default_factory=list)


def vm_view(data: bytes, settings: Settings | None = None) -> VMView:
    """Scan `data` as the pickle scanner does and collect every fact it reported."""
    from modelscan_core.scanners.joblib import joblib_hook
    from modelscan_core.scanners.pickle.policy import resolve_indirect
    from modelscan_core.scanners.pickle.scanner import PickleScanner, scan_pickles

    settings = settings or _default_settings()
    stream = io.BytesIO(data)
    ctx = _Nested(_Scan(settings), "oracle.pkl", PickleScanner.name, 0)
    done = scan_pickles(stream, len(data), ctx, scanner=PickleScanner.name,
                        hooks=lambda c: joblib_hook(stream, len(data), c, PickleScanner.name))
    view = VMView(findings=list(ctx.findings), errors=[e.description for e in ctx.errors])
    for facts in done:
        indirect = resolve_indirect(facts.globals, facts.dynamic_calls, settings.pickle_policy)
        for ref in indirect.globals:
            key = (ref.module, ref.name)
            view.uses[key] = view.uses.get(key, 0) | ref.uses
        view.dynamic += len(facts.dynamic_calls)
        view.unresolved += len(facts.unresolved)
    for f in ctx.findings:
        if f.rule_id == "pickle/unresolved-global":
            view.unresolved += 1
        elif f.rule_id == "pickle/dynamic-call":
            view.dynamic += 1
    # what nested scans (a pickle handed to pickle.loads) saw counts too
    for nested in ctx.nested:
        for key, uses in nested.uses.items():
            view.uses[key] = view.uses.get(key, 0) | uses
        view.dynamic += nested.dynamic
        view.unresolved += nested.unresolved
    return view


@lru_cache(maxsize=1)
def _default_settings() -> Settings:
    """One Settings for every comparison, as one scan uses one (its policy tables are built once)."""
    return Settings()


class _Nested(_Context):
    """The scan context, with the nested pickles it is handed read by vm_view as well."""

    def __init__(self, *args):
        super().__init__(*args)
        self.nested: list[VMView] = []

    def scan_member(self, name, open_stream, size, format_hint=None):
        super().scan_member(name, open_stream, size, format_hint)
        if self.depth < 4:
            stream = open_stream()
            stream.seek(0)
            self.nested.append(vm_view(stream.read()))


def uncovered(results: list[dict], view: VMView) -> list[str]:
    """What the unpickler did that the VM did not report (empty: the VM covers the oracle)."""
    problems: list[str] = []
    for r in results:
        if "globals" not in r:
            continue
        reading = r["reading"]
        for module, name, uses in r["globals"]:
            have = view.uses.get((module, name))
            if have is None:
                if not view.unresolved and not view.dynamic:
                    problems.append(f"[{reading}] {module}.{name} ({_uses(uses)}) not reported at all")
            elif uses & ~_implied(have):
                problems.append(f"[{reading}] {module}.{name} {_uses(uses & ~_implied(have))} by the unpickler, "
                                f"the VM says only {_uses(have)}")
        if r["dynamic"] and not view.dynamic and not view.unresolved:
            producers = [k for k in map(tuple, r["dynamic_from"]) if view.uses.get(k, 0) & 8]
            if not producers:
                problems.append(f"[{reading}] {r['dynamic']} call(s) of computed values "
                                f"({r['dynamic_from']}) and no dynamic call reported")
        if r["ext"] and not view.unresolved:
            problems.append(f"[{reading}] extension code(s) {r['ext']} looked up, nothing unresolved reported")
    return problems


def _implied(bits: int) -> int:
    """Called (any code of it runs, with arguments) covers the weaker uses: instantiated and
    given state. Those two stay apart (different code: __new__ against __setstate__)."""
    return bits | 4 | 2 if bits & 8 else bits


def _uses(bits: int) -> str:
    return "+".join(name for bit, name in USE_NAMES.items() if bits & bit) or "none"
