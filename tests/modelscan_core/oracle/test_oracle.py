"""The VM against CPython's own unpickler: every discrepancy the oracle found, kept as a case,
and the fuzzing that finds the next ones.

A case names what the real unpickler does (checked against the oracle, so a case cannot pass
by the oracle seeing nothing) and then asserts that the VM reports at least that.
"""

from __future__ import annotations

import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelscan_core.model import Severity

from .conftest import EXAMPLES
from .harness import uncovered, vm_view
from .streams import framed, pickles

CALLED, BUILT, NEW = 8, 2, 4


def observed(results: list[dict], module: str, name: str) -> int:
    """The uses the unpickler made of module.name, over every reading."""
    bits = 0
    for r in results:
        for m, n, uses in r.get("globals", ()):
            if (m, n) == (module, name):
                bits |= uses
    return bits


def check(oracle, data: bytes, module: str, name: str, use: int) -> None:
    results = oracle.read(data)
    assert results is not None, "the oracle timed out"
    assert observed(results, module, name) & use, f"the unpickler does not do this: {results}"
    problems = uncovered(results, vm_view(data))
    assert not problems, problems


# -- cases: what the oracle found ----------------------------------------------------------

FOUND = {
    # APPEND/APPENDS on an object the load built calls that object's own append/extend
    "append on a built object": (b"\x80\x04cmypkg\nThing\n)\x81K\x01a.", "mypkg", "Thing", BUILT),
    "appends on a built object": (b"\x80\x04cmypkg\nThing\n)\x81(K\x01K\x02e.", "mypkg", "Thing", BUILT),
    # SETITEMS on an object calls its __setitem__
    "setitems on a built object": (b"\x80\x02cmypkg\nThing\n)\x81(K\x01K\x02u.", "mypkg", "Thing", BUILT),
    # ADDITEMS on an object calls its add
    "additems on a built object": (b"\x80\x04cmypkg\nThing\n)\x81(K\x01\x90.", "mypkg", "Thing", BUILT),
    # APPEND with a class on the stack: Class.append(value), the class's own code
    "append on a class": (b"\x80\x04cmypkg\nThing\nK\x01a.", "mypkg", "Thing", BUILT),
    # BUILD into a class with slot state sets class attributes: a planted __new__ runs at NEWOBJ
    "planted __new__ on a class": (
        b"\x80\x02cargparse\nNamespace\n(N}S'__new__'\ncmypkg\nevil\nstbN\x85\x81.", "mypkg", "evil", CALLED),
    # ...a planted __setstate__ runs at the next BUILD of an instance
    "planted __setstate__ on a class": (
        b"\x80\x02cargparse\nNamespace\n(N}S'__setstate__'\ncmypkg\nevil\nstb)\x81}b.", "mypkg", "evil", CALLED),
    # __class__ set through slot state: the new class's __setitem__ gets the next SETITEMS
    "planted __class__ on an instance": (
        b"\x80\x02cargparse\nNamespace\n)\x81(N}S'__class__'\ncmypkg\nEvil\nstb(K\x01K\x02u.", "mypkg", "Evil", BUILT),
    # a planted `append` after the first 8 keys of the state (the VM kept only 8 then)
    "planted append after eight keys": (
        b"\x80\x02cargparse\nNamespace\n)\x81}(" + b"".join(b"X\x01\x00\x00\x00" + bytes([97 + i]) + b"K\x01" for i in range(9))
        + b"X\x06\x00\x00\x00appendcmypkg\nevil\nubK\x01a.", "mypkg", "evil", CALLED),
    # joblib.load's pure-Python unpickler calls func(*args) with any iterable, C wants a tuple
    "reduce with a str argument list": (b"\x80\x02cmypkg\nevil\nX\x02\x00\x00\x00idR.", "mypkg", "evil", CALLED),
    "newobj with a list argument list": (b"\x80\x02cmypkg\nThing\n]\x81.", "mypkg", "Thing", NEW),
    # ...imports an INST's name before it looks for the MARK
    "inst without a mark": (b"\x80\x02imypkg\nevil\n.", "mypkg", "evil", 1),
    # ...sets the pairs of an odd SETITEMS before it fails
    "odd setitems on a built object": (b"\x80\x02cmypkg\nThing\n)\x81(K\x01K\x02K\x03u.", "mypkg", "Thing", BUILT),
    # ...and calls an INST whose lines EOF cuts, if a MARK is there (less the last byte of each)
    "inst cut by the end of the file": (b"(imypkg\nev", "mypkg", "e", NEW),
    # the C unpickler parses protocol-0 numbers as C strings: a NUL ends them (the VM stopped)
    "float line ending at a NUL": (b"F2\x005\n0cmypkg\nevil\n)R.", "mypkg", "evil", CALLED),
    "int line ending at a NUL": (b"I12\x00x\n0cmypkg\nevil\n)R.", "mypkg", "evil", CALLED),
    "long line ending at a NUL": (b"L7\x00zz\n0cmypkg\nevil\n)R.", "mypkg", "evil", CALLED),
    "memo index ending at a NUL": (b"cmypkg\nevil\np1\x00x\n0g1\x00y\n)R.", "mypkg", "evil", CALLED),
    "int line that is only a NUL": (b"I\x00\n0cmypkg\nevil\n)R.", "mypkg", "evil", CALLED),
    # APPEND(S) on a BYTEARRAY8 value calls bytearray.extend, which takes ints (the VM stopped)
    "append to a bytearray": (b"\x80\x05\x96\x03" + bytes(7) + b"abcK\x01a0cmypkg\nevil\n)R.", "mypkg", "evil", CALLED),
    "appends to a bytearray": (b"\x80\x05\x96\x03" + bytes(7) + b"abc(K\x01\x88e0cmypkg\nevil\n)R.", "mypkg", "evil",
                               CALLED),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_vm_covers_what_the_oracle_found(oracle, case):
    data, module, name, use = FOUND[case]
    check(oracle, data, module, name, use)


def test_a_planted_new_of_an_unknown_callable_is_high(scan_bytes):
    data = FOUND["planted __new__ on a class"][0]
    scanned = scan_bytes(data)
    assert "mypkg.evil" in scanned.names(Severity.HIGH)


def test_a_bytearray_grown_by_appends_and_unpickled_is_unresolved_not_its_first_bytes(scan_bytes):
    # pickle.loads(bytearray(b"\x80\x02N") + ...): what it unpickles is built at load time
    data = b"\x80\x05cpickle\nloads\n\x96\x03" + bytes(7) + b"\x80\x02N(K.e\x85R."
    scanned = scan_bytes(data)
    assert "pickle/nested-unresolved" in scanned.rules() and scanned.worst >= Severity.HIGH, scanned.report.findings()


@pytest.mark.slow
def test_the_bytes_reading_is_pickle_loads(oracle):
    """The oracle's `bytes` reading goes through a file whose peek returns everything: it must
    read exactly as pickle.loads (run in the worker, names refused by an audit hook)."""
    from .streams import ops

    @settings(max_examples=EXAMPLES or 150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(framed(max_ops=30))
    def run(data):
        got = oracle.read(data, ("bytes", "loads"))
        assert got is not None
        via_file, real = got
        if via_file["globals"] or via_file["persid"] or via_file["ext"]:
            return  # pickle.loads refuses names here: nothing to compare
        assert (via_file["error"] or "").split(":")[0] == (real["error"] or ""), (via_file, real)
        assert via_file["result"] == real["result"]

    run()


def test_the_oracle_sees_no_real_callable(oracle):
    """A stub stands behind every name: calling `os.system` runs nothing (the marker stays)."""
    import os
    import tempfile

    marker = os.path.join(tempfile.mkdtemp(), "ran")
    data = pickle.dumps(_Reduce(os.system, (f"touch {marker}",)), protocol=2)
    results = oracle.read(data)
    assert observed(results, "posix", "system") & CALLED
    assert not os.path.exists(marker)


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# -- fuzzing ---------------------------------------------------------------------------------


def _fuzz(oracle, strategy, default: int):
    import time

    stats = {"inputs": 0, "compared": 0, "vm": 0.0}

    @settings(max_examples=EXAMPLES or default, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(data):
        stats["inputs"] += 1
        results = oracle.read(data)
        if results is None:
            return  # counted in oracle.timeouts; nothing to compare against
        stats["compared"] += 1
        started = time.monotonic()
        view = vm_view(data)
        stats["vm"] = max(stats["vm"], time.monotonic() - started)
        problems = uncovered(results, view)
        assert not problems, (data, problems)

    run()
    print(f"\noracle: {stats['inputs']} inputs, {stats['compared']} compared, {oracle.timeouts} oracle timeouts, "
          f"longest: oracle {oracle.longest:.3f} s, scanner {stats['vm']:.3f} s")


@pytest.mark.slow
def test_fuzz_opcode_streams(oracle):
    _fuzz(oracle, pickles(), 1500)


@pytest.mark.slow
def test_fuzz_frames_anywhere(oracle):
    _fuzz(oracle, framed(), 1500)


# -- every fixture the tests make -------------------------------------------------------------


def _fixture_corpus() -> dict[str, bytes]:
    from .. import test_readings, test_robustness
    from ..test_pickle_attacks import CLASS_A
    from .fixtures import pickles as real_pickles

    corpus = {f"class A: {k}": v for k, v in CLASS_A.items()}
    corpus |= {f"found: {k}": v[0] for k, v in FOUND.items()}
    corpus |= {f"real: {k}": v for k, v in real_pickles().items()}
    # bombs: the real unpickler never finishes hashing the hash bombs (nothing to compare)
    corpus |= {f"bomb: {k}": v for k, (v, rule) in test_robustness.BOMBS.items() if rule != "pickle/hash-bomb"}
    corpus["readings: straddle"] = test_readings.straddle()
    corpus["readings: large straddle"] = test_readings.straddle(pad=8200)
    return corpus


@pytest.mark.slow
def test_every_fixture_agrees_with_the_oracle(oracle):
    checked = 0
    for label, data in sorted(_fixture_corpus().items()):
        results = oracle.read(data)
        assert results is not None, f"{label}: the oracle timed out"
        problems = uncovered(results, vm_view(data))
        assert not problems, (label, problems)
        checked += 1
    print(f"\noracle: {checked} fixtures agree")
