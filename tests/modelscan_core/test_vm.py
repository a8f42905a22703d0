"""The pickle VM on its own: CPython's rules, bounded memory, and the C accelerator agreeing
with the pure-Python reference on every stream, valid or not."""

from __future__ import annotations

import io
import pickle
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelscan_core.scanners.pickle import vm as vm_module
from modelscan_core.scanners.pickle.values import CALLED, NEW, Blob, render_call
from modelscan_core.scanners.pickle.vm import PickleVM


def run(data: bytes, accelerate: bool = True, **kw):
    return PickleVM(io.BytesIO(data), size=len(data), accelerate=accelerate, **kw).run()


def summary(facts) -> tuple:
    return (
        facts.stopped,
        facts.error,
        facts.error_offset,
        facts.protocol,
        facts.calls,
        facts.ops,
        [(g.module, g.name, g.offset, g.uses, [render_call(c) for c in g.calls]) for g in facts.globals],
        [render_call(c) for c in facts.dynamic_calls],
        facts.unresolved,
        facts.end,
    )


def test_accelerator_is_built():
    # CI builds the extension; a silent fallback would hide a 4x slowdown
    assert vm_module.ACCELERATED


def test_uses_are_told_apart():
    class Cls:
        pass

    data = (
        b"\x80\x02cmod\nfunc\n)R0"  # called
        b"cmod\nCls\n)\x81}b0"  # NEWOBJ + BUILD
        b"cmod\nref\n."  # only referenced
    )
    facts = run(data)
    uses = {g.name: g.uses for g in facts.globals}
    assert uses["func"] & CALLED
    assert uses["Cls"] & NEW and not uses["Cls"] & CALLED
    assert uses["ref"] == 1


def test_pop_removes_a_bare_mark_like_cpython():
    # "(0" pops the MARK itself; the REDUCE below then has its operands
    data = b"cos\nsystem\n(0(S'x'\ntR."
    facts = run(data)
    assert facts.stopped and facts.globals[0].uses & CALLED


def test_fence_stops_pops_below_a_mark():
    data = b"cos\nsystem\n(S'x'\n(R."  # REDUCE needs two values above the mark
    facts = run(data)
    assert facts.error and "REDUCE" in facts.error
    assert facts.calls == 0


def test_long_bytes_are_skipped_not_copied():
    payload = b"\x00" * (10 * 1024 * 1024)
    data = pickle.dumps([payload], protocol=4)
    facts = run(data)
    assert facts.stopped


def test_blob_offsets_point_at_the_data():
    payload = bytes(range(256)) * 100
    data = b"\x80\x04cpickle\nloads\nB" + struct.pack("<I", len(payload)) + payload + b"\x85R."
    facts = run(data)
    arg = facts.globals[0].calls[0].args[0]
    assert isinstance(arg, Blob)
    assert data[arg.offset : arg.offset + arg.length] == payload


def test_memo_budget_keeps_names_and_fails_closed():
    # past the budget, non-name values are evicted; a GET of one used as a name is unresolved
    data = b"\x80\x04\x8c\x03x y\x94\x8c\x03a-b\x94\x8c\x06system\x94" b"h\x01h\x02\x93)R."
    facts = run(data, memo_budget=1)
    assert facts.unresolved and not facts.globals
    data = b"\x80\x04\x8c\x03a b\x94\x8c\x02os\x94\x8c\x06system\x94" b"h\x01h\x02\x93)R."
    facts = run(data, memo_budget=1)
    assert [(g.module, g.name) for g in facts.globals] == [("os", "system")]


def test_op_dense_memory_is_bounded():
    import resource

    data = pickle.dumps([[i, str(i)] for i in range(300_000)], protocol=4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    facts = run(data)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert facts.stopped
    assert grown_kb < 60_000


@pytest.mark.parametrize("proto", range(pickle.HIGHEST_PROTOCOL + 1))
def test_real_pickles_agree_with_and_without_accelerator(proto):
    import collections

    obj = {"a": [1, 2.5, None, True, "x" * 300, b"y" * 5000], "b": (1, 2, 3, 4), "c": collections.OrderedDict(k=[{}]),
           "d": {frozenset({1}), 2}, "e": [[i, str(i)] for i in range(3000)], "f": 10**40, "g": -7}
    data = pickle.dumps(obj, protocol=proto)
    assert summary(run(data, True)) == summary(run(data, False))


# -- differential fuzzing: C accelerator vs the pure-Python reference ---------------------

_STRINGS = ["os", "system", "builtins", "eval", "a b", "x" * 40, "collections", "OrderedDict", "é"]
_TOKENS = st.one_of(
    st.sampled_from([b"(", b"]", b"}", b")", b"e", b"u", b"s", b"a", b"t", b"\x85", b"\x86", b"\x87", b"N", b"\x88",
                     b"\x89", b"\x94", b"0", b"1", b"2", b"R", b"b", b"\x81", b"\x93", b".", b"l", b"d", b"\x8f",
                     b"\x90", b"\x91", b"cos\nsystem\n", b"ios\nsystem\n", b"o", b"\x95" + struct.pack("<Q", 9),
                     b"I0x10\n", b"I010\n", b"S'abc'\n", b"\xff", b"\x80\x04"]),
    st.integers(0, 255).map(lambda i: b"K" + bytes([i])),
    st.integers(0, 65535).map(lambda i: b"M" + struct.pack("<H", i)),
    st.integers(-(2**31), 2**31 - 1).map(lambda i: b"J" + struct.pack("<i", i)),
    st.floats(allow_nan=False).map(lambda f: b"G" + struct.pack(">d", f)),
    st.integers(0, 6).map(lambda i: b"q" + bytes([i])),
    st.integers(0, 6).map(lambda i: b"h" + bytes([i])),
    st.integers(0, 6).map(lambda i: b"r" + struct.pack("<I", i)),
    st.integers(0, 6).map(lambda i: b"j" + struct.pack("<I", i)),
    st.sampled_from(_STRINGS).map(lambda s: b"\x8c" + bytes([len(s.encode())]) + s.encode()),
    st.binary(max_size=3).map(lambda b: b"C" + bytes([len(b)]) + b),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TOKENS, max_size=60), st.integers(0, 4))
def test_accelerator_agrees_with_reference_on_any_stream(tokens, budget):
    data = b"".join(tokens)
    assert summary(run(data, True, memo_budget=budget)) == summary(run(data, False, memo_budget=budget))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_vm(data):
    facts = run(data)
    assert facts.stopped or facts.error


def test_unbounded_stack_growth_stops_as_incomplete(monkeypatch):
    monkeypatch.setattr(vm_module, "MAX_STACK", 100_000)
    data = b"\x80\x04" + b"N" * 3_000_000 + b"."
    facts = run(data)
    assert facts.error and facts.error_incomplete and not facts.stopped


@pytest.mark.parametrize("op", [b"S'", b"V"])
def test_long_protocol0_line_that_ends_near_eof(op):
    # a line operand spanning chunk refills up to the end of the file is still read whole
    quote = b"'" if op == b"S'" else b""
    data = op + b"a" * (9 << 20) + quote + b"\n0cos\nsystem\n(S'echo'\ntR."
    facts = run(data)
    assert facts.stopped and [g.qualname for g in facts.globals] == ["os.system"]
