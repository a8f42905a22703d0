"""Mutations of real files: every container reader ends in a result, and the VM still covers
what CPython's unpickler does with mutated pickles.

For containers (zip, torch zip and legacy, tar.gz, joblib raw and compressed, npy, npz, HDF5,
ONNX protobuf) each mutated file must be scanned to a verdict: no exception escapes a scanner
(the engine would turn it into an "internal error"), no input takes long (the longest is
printed; the bound asserted is only a hang detector), memory stays bounded (the run's peak
RSS is checked). For pickles the oracle compares as in test_oracle.py.

Example counts: CI defaults below; `ORACLE_EXAMPLES=N` for a long run.
"""

from __future__ import annotations

import io
import resource
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelscan_core.engine import scan_stream

from .conftest import EXAMPLES
from .fixtures import containers, pickles
from .harness import uncovered, vm_view

#: what mutations splice in: magics, opcodes, lengths that point anywhere
TOKENS = [b"PK\x03\x04", b"PK\x05\x06", b"PK\x01\x02", b"\x80\x04\x95", b"\x95\xff\xff\x00\x00\x00\x00\x00\x00",
          b"cposix\nsystem\n", b"\x93NUMPY", b"\x89HDF\r\n\x1a\n", b"\xff\xff\xff\xff", b"\x00" * 8, b"(", b".",
          b"\x8c\x05posix\x8c\x06system\x93", b"R", b"b", b"\x1f\x8b\x08", b"ustar\x00", b"\x04\x22\x4d\x18"]

#: an input taking longer than this is a hang, not a slow scan (the machine is shared)
HANG = 60.0


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
        pos = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "set", "insert", "token", "delete", "truncate", "dup", "length"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "token":
            token = draw(st.sampled_from(TOKENS))
            data[pos : pos + (len(token) if draw(st.booleans()) else 0)] = token
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "dup":
            end = min(len(data), pos + draw(st.integers(1, 256)))
            data[end:end] = data[pos:end]
        else:  # a 4- or 8-byte little-endian length set to something big or small
            width = draw(st.sampled_from([4, 8]))
            data[pos : pos + width] = draw(st.sampled_from([0, 1, 255, 2**31 - 1, 2**32 - 1])).to_bytes(8, "little")[:width]
    return bytes(data)


class Stats:
    def __init__(self):
        self.inputs = 0
        self.longest = 0.0
        self.longest_name = ""

    def timed(self, name: str, run):
        started = time.monotonic()
        result = run()
        took = time.monotonic() - started
        self.inputs += 1
        if took > self.longest:
            self.longest, self.longest_name = took, name
        assert took < HANG, f"{name}: {took:.1f} s"
        return result


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torch_zip", "torch_legacy", "joblib_raw", "joblib_3", "joblib_lz4", "npy_object",
                                  "npz", "keras_h5", "onnx", "tar_gz", "zip"])
def test_mutated_containers_end_in_a_verdict(name):
    seed, filename = containers()[name]
    stats = Stats()
    assert _internal_errors(seed, filename) == [], "the seed itself"

    @settings(max_examples=EXAMPLES or 60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutated(seed))
    def run(data):
        problems = stats.timed(name, lambda: _internal_errors(data, filename))
        assert not problems, (data[:200], problems)

    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(f"\n{name}: {stats.inputs} mutated inputs, longest {stats.longest:.3f} s, peak RSS {peak} MB")
    assert peak < 4096


def _internal_errors(data: bytes, filename: str) -> list[str]:
    result = scan_stream(io.BytesIO(data), filename, name=filename)
    assert result.verdict is not None
    return [e.description for e in result.all_errors() if "internal error" in e.description]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torch_data_pkl", "torch_legacy", "joblib", "sklearn_p2", "sklearn_p4", "sklearn_p5",
                                  "npy_object_pickle", "protocol0"])
def test_mutated_pickles_against_the_oracle(oracle, name):
    seed = pickles()[name]
    stats = Stats()

    @settings(max_examples=EXAMPLES or 150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutated(seed))
    def run(data):
        results = stats.timed(name, lambda: oracle.read(data))
        if results is None:
            return
        problems = uncovered(results, stats.timed(name, lambda: vm_view(data)))
        assert not problems, (data, problems)

    run()
    print(f"\n{name}: {stats.inputs // 2} mutated pickles, longest step {stats.longest:.3f} s, "
          f"oracle timeouts {oracle.timeouts}")
