"""Nothing a file contains stops the scan or loses a finding, and every report stays printable.

Any exception, in detection, in looking up a scanner or inside a scanner, becomes an error for
that one file; findings made before it are kept; other files are still scanned. The JSON
report is valid UTF-8 JSON whatever bytes names and operands hold.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from modelscan_core import scan_path
from modelscan_core.model import Severity
from modelscan_core.scanners.pickle.vm import READERS, PickleVM

from .pickle_ops import Reduce
from .test_vm import summary

EVIL = pickle.dumps(Reduce(os.system, ("touch /tmp/modelscand-never-run",)), protocol=2)


def test_unhashable_dict_key_is_an_error_for_that_file_and_the_others_are_scanned(tmp_path):
    # `N}]Nsb.`: CPython's SETITEM refuses a list as a key (TypeError); the scanner crashed
    (tmp_path / "a.pkl").write_bytes(b"\x80\x02N}]Nsb.")
    (tmp_path / "b.pkl").write_bytes(EVIL)
    report = scan_path(tmp_path)
    by_name = {r.source: r for r in report.files}
    assert by_name["a.pkl"].verdict.value == "error"
    assert "unhashable" in by_name["a.pkl"].all_errors()[0].description
    assert by_name["b.pkl"].verdict.value == "issues"
    assert report.exit_code == 1


def test_cli_prints_a_report_for_the_seven_byte_crash_file(tmp_path):
    (tmp_path / "x.pkl").write_bytes(b"N}]Nsb.")
    (tmp_path / "evil.pkl").write_bytes(EVIL)
    done = subprocess.run([sys.executable, "-m", "modelscan_core", "-p", str(tmp_path), "-r", "json"],
                          capture_output=True, timeout=120)
    assert b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")
    report = json.loads(done.stdout)
    assert done.returncode == 1
    assert {i["source"] for i in report["issues"]} == {"evil.pkl"}
    # a pickle that breaks when loaded: an error for that file, not "text" skipped
    assert [e["source"] for e in report["errors"]] == ["x.pkl"]
    assert "unhashable" in report["errors"][0]["description"]


def test_a_finding_followed_by_a_break_stays_a_finding(scan_bytes):
    # the call runs, then the loader raises at the unhashable key: both are reported
    data = EVIL[:-1] + b"0N}]Nsb."
    scanned = scan_bytes(data)
    assert scanned.verdict == "issues"
    assert "posix.system" in scanned.names(Severity.CRITICAL)
    assert scanned.file.all_errors(), "the break is still an error"


def test_an_internal_error_in_the_vm_keeps_what_was_found_before_it(scan_bytes, monkeypatch):
    from modelscan_core.scanners.pickle import vm

    def broken(state):
        raise RuntimeError("simulated VM defect")

    monkeypatch.setattr(vm, "_state_attributes", broken)  # what BUILD reads a state with
    data = EVIL[:-1] + b"0\x80\x02cbuiltins\nobject\n)\x81}b."  # a BUILD after the call
    scanned = scan_bytes(data)
    assert scanned.verdict == "issues"
    assert "posix.system" in scanned.names(Severity.CRITICAL)
    assert any("internal error" in e.description for e in scanned.file.all_errors())


def test_an_exception_in_detection_is_an_error_for_that_file(tmp_path, monkeypatch):
    from modelscan_core import engine

    def explode(*args, **kwargs):
        raise RuntimeError("simulated detection defect")

    (tmp_path / "a.pkl").write_bytes(EVIL)
    monkeypatch.setattr(engine.detect, "detect_all", explode)
    report = scan_path(tmp_path)
    assert report.files[0].verdict.value == "error"
    assert "detecting" in report.files[0].errors[0].description
    assert report.exit_code == 2


def test_an_exception_looking_up_a_scanner_is_an_error_for_that_file(tmp_path, monkeypatch):
    from modelscan_core import engine

    def explode(fmt):
        raise ImportError("simulated missing dependency")

    (tmp_path / "a.pkl").write_bytes(EVIL)
    monkeypatch.setattr(engine, "scanner_for", explode)
    report = scan_path(tmp_path)
    assert report.files[0].verdict.value == "error"
    assert "ImportError" in report.files[0].errors[0].description


# -- reports stay valid UTF-8 ---------------------------------------------------------


def _cli_json(path: Path, *extra: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "modelscan_core", "-p", str(path), *extra],
                          capture_output=True, timeout=120)
    assert b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")
    done.stdout.decode("utf-8")  # strict: raises on any byte that is not UTF-8
    return json.loads(done.stdout) if "-r" in extra and extra[extra.index("-r") + 1] != "console" else {}


def test_json_is_valid_utf8_for_a_tar_member_name_that_is_not(tmp_path):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        info = tarfile.TarInfo("bad-\udcff-name.pkl")
        info.size = len(EVIL)
        tar.addfile(info, io.BytesIO(EVIL))
    assert b"bad-\xff-name.pkl" in out.getvalue()
    (tmp_path / "model.tar").write_bytes(out.getvalue())
    report = _cli_json(tmp_path, "-r", "json")
    issue = next(i for i in report["issues"] if i["operator"] == "system")
    assert issue["source"] == "model.tar:bad-\\xff-name.pkl"
    assert bytes.fromhex(issue["source_bytes"]) == b"model.tar:bad-\xff-name.pkl"


def test_json_is_valid_utf8_for_a_file_name_and_an_operand_that_are_not(tmp_path):
    payload = b"\x80\x04\x8c\x05posix\x8c\x06system\x93X\x03\x00\x00\x00\xed\xb2\x80\x85R."  # a lone surrogate
    (tmp_path / os.fsdecode(b"\xfe\xff.pkl")).write_bytes(payload)
    report = _cli_json(tmp_path, "-r", "json")
    issue = report["issues"][0]
    assert issue["source"] == "\\xfe\\xff.pkl" and issue["source_bytes"] == "feff2e706b6c"
    assert report["files"][0]["source_bytes"] == "feff2e706b6c"
    for fmt in ("console", "sarif"):
        _cli_json(tmp_path, "-r", fmt)  # decodes as UTF-8, no traceback


# -- settings: a key the scanner does not know is refused, by name -------------------------


@pytest.mark.parametrize("text, named", [
    ('[unsafe_global.CRITICAL]\nmytools = "*"\n', "'unsafe_global' (did you mean 'unsafe_globals'?)"),
    ("[limits]\nmax_memo_value = 10\n", "limits.max_memo_value"),
    ('[unknown_globals]\ncalls = "LOW"\n', "unknown_globals.calls"),
    ('[scanners."modelscan.scanners.PickleUnsafeOpScan"]\nenabeld = false\n', "enabeld"),
    ("[scanners.pickles]\nenabled = false\n", "'pickles'"),
])
def test_settings_with_an_unknown_key_are_refused_naming_it(tmp_path, text, named):
    settings = tmp_path / "s.toml"
    settings.write_text(text)
    (tmp_path / "m.pkl").write_bytes(EVIL)
    done = subprocess.run([sys.executable, "-m", "modelscan_core", "-p", str(tmp_path / "m.pkl"),
                           "--settings-file", str(settings)], capture_output=True, timeout=120, text=True)
    assert done.returncode == 4, done.stdout
    assert named in done.stderr and done.stdout == ""


def test_a_modelscan_settings_file_still_loads(tmp_path):
    # modelscan 0.8.8 writes a `middlewares` table: meaningless here, accepted
    from modelscan_core.settings import Settings

    settings = tmp_path / "s.toml"
    settings.write_text(
        'modelscan_version = "0.8.8"\nsupported_zip_extensions = [".zip", ".npz"]\n'
        '[scanners."modelscan.scanners.SavedModelTensorflowOpScan"]\nenabled = true\n'
        'supported_extensions = [".pb"]\n[scanners."modelscan.scanners.SavedModelTensorflowOpScan".unsafe_tf_operators]\n'
        'ReadFile = "HIGH"\n[middlewares."modelscan.middlewares.FormatViaExtensionMiddleware".formats]\n'
        'pickle = [".pkl"]\n[unsafe_globals.CRITICAL]\nos = "*"\n[reporting]\nmodule = "modelscan.reports.ConsoleReport"\n'
        "[reporting.settings]\nanything = 1\n")
    assert Settings.load(settings).scanner_enabled("savedmodel_ops")


# -- memo and nesting bombs: an explicit verdict, within limits --------------------------------


def _put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)


def _get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)


def _laughs_lists(levels: int = 40) -> bytes:
    # each level is a list of ten references to the one before: 10**40 values for a walk
    data = b"\x80\x04]" + _put(0)
    for level in range(1, levels):
        data += b"]" + _put(level) + b"(" + _get(level - 1) * 10 + b"e0"
    return data + _get(levels - 1) + b"."


def _laughs_across(segments: int = 7) -> bytes:
    # a list of 1000 references made by LIST (run in Python: it keeps 8 items and records its
    # size), then a list holding it made by APPEND (run by the C accelerator), and again: the
    # C side must find the size Python recorded (walking the 8 kept items undercounts)
    data = b"\x80\x04]" + _put(0)
    for seg in range(1, segments + 1):
        data += b"(" + _get(2 * seg - 2) * 1000 + b"l" + _put(2 * seg - 1) + b"0"
        data += b"]" + _get(2 * seg - 1) + b"a" + _put(2 * seg) + b"0"
    return data + _get(2 * segments) + b"."


def _laughs_tuples(levels: int = 80) -> bytes:
    data = b"\x80\x04)" + _put(0)
    for level in range(1, levels):
        data += _get(level - 1) + _get(level - 1) + b"\x86" + _put(level) + b"0"
    return data + _get(levels - 1) + b"."


BOMBS = {
    "billion laughs in lists": (_laughs_lists(), "pickle/expansion-bomb"),
    "billion laughs in tuples": (_laughs_tuples(), "pickle/expansion-bomb"),
    "billion laughs, lists made by LIST and APPEND in turn": (_laughs_across(), "pickle/expansion-bomb"),
    # hashing a tuple DAG as a dict key walks all of it: pickle.loads never returns
    "hash bomb, dict key": (_laughs_tuples()[:-1] + b"0}" + _get(79) + b"Ns.", "pickle/hash-bomb"),
    "hash bomb, frozenset": (_laughs_tuples()[:-1] + b"0(" + _get(79) + b"\x91.", "pickle/hash-bomb"),
    "deep nesting, marks": (b"\x80\x04" + b"(" * 200_000 + b"N" + b"t" * 200_000 + b".", "pickle/deep-nesting"),
    "deep nesting, appends": (b"\x80\x04" + b"]" * 200_000 + b"a" * 199_999 + b".", "pickle/deep-nesting"),
}


# -- frame ends: the C accelerator runs up to them, each reader handles what straddles one -------

_PUSH = st.one_of(
    st.sampled_from([b"N", b"]", b")", b"}", b"\x88", b"\x8c\x06system", b"\x8c\x02os", b"cos\nsystem\n"]),
    st.integers(0, 255).map(lambda i: b"K" + bytes([i])),
    st.integers(0, 65535).map(lambda i: b"M" + struct.pack("<H", i)),
    st.integers(-(2**31), 2**31 - 1).map(lambda i: b"J" + struct.pack("<i", i)),
    st.floats(allow_nan=False).map(lambda f: b"G" + struct.pack(">d", f)),
)
_NEAR_FRAME_ENDS = st.one_of(
    _PUSH,
    _PUSH,
    st.sampled_from([b"(", b"e", b"u", b"s", b"a", b"t", b"\x85", b"\x86", b"\x87", b"\x94", b"0", b"l", b"R", b"b",
                     b"\x93", b"."]),
    st.integers(0, 3).map(lambda i: b"q" + bytes([i])),
    st.integers(0, 3).map(lambda i: b"h" + bytes([i])),
    st.integers(0, 3).map(lambda i: b"r" + struct.pack("<I", i)),
    st.integers(0, 3).map(lambda i: b"j" + struct.pack("<I", i)),
    # frames short enough that their ends fall inside operands, between opcodes, on FRAMEs
    st.integers(0, 24).map(lambda n: b"\x95" + struct.pack("<Q", n)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_NEAR_FRAME_ENDS, max_size=50), st.sampled_from(READERS), st.lists(st.booleans(), max_size=6))
# a FRAME cut by its frame's end: the bytes reader reads its length across the end, a number
# past any offset, that the accelerator must take as a frame end too
@example([b"\x95" + struct.pack("<Q", 12), b"N", b"M\x00\x00", b"r\x00\x00\x00\x00", b"\x95" + struct.pack("<Q", 0),
          b"M\x80\x00"], "bytes", [True])
def test_accelerator_agrees_with_reference_at_frame_ends_in_every_reader(tokens, reader, choices):
    data = b"\x80\x04" + b"".join(tokens)

    def read(accelerate: bool) -> tuple:
        vm = PickleVM(io.BytesIO(data), size=len(data), accelerate=accelerate, reader=reader,
                      frame_choices=tuple(choices))
        facts = vm.run()
        return summary(facts), facts.next_start, vm.divergences, vm.mattered

    assert read(True) == read(False)


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_bombs_get_an_explicit_verdict(scan_bytes, case):
    data, rule = BOMBS[case]
    scanned = scan_bytes(data)
    assert scanned.verdict == "issues"
    assert rule in scanned.rules()


def test_a_wide_shared_tuple_as_call_arguments_is_shown_shortly(scan_bytes):
    # three levels of 20000-wide tuples, each the one below 20000 times, passed to a call:
    # showing the call used to render all 8e12 leaves
    wide = 20_000
    data = b"\x80\x04N" + _put(0) + b"0"
    data += b"(" + _get(0) * wide + b"t" + _put(1) + b"0"
    data += b"(" + _get(1) * wide + b"t" + _put(2) + b"0"
    data += b"cmypkg\nf\n(" + _get(2) * wide + b"tR."
    scanned = scan_bytes(data)
    call = next(f.call for f in scanned.report.findings() if f.operator == "f")
    assert len(call) < 10_000


def test_shared_but_small_structures_are_no_bomb(scan_bytes):
    shared = list(range(1000))
    data = pickle.dumps({"a": [shared] * 500, "b": (shared, shared)}, protocol=4)
    assert scan_bytes(data).verdict == "clean"


def test_a_call_of_a_value_built_from_a_wide_shared_structure_is_judged_quickly(scan_bytes):
    # calling what mypkg.f returned makes the policy look for the names inside it: five levels
    # of 2000-wide tuples, each the one below 2000 times, used to mean 2000**5 steps
    wide = 2000
    data = b"\x80\x04cmypkg\ng\n" + _put(0) + b"0"
    for level in range(1, 6):
        data += b"(" + _get(level - 1) * wide + b"t" + _put(level) + b"0"
    data += b"cmypkg\nf\n" + _get(5) + b"\x85R)R."
    scanned = scan_bytes(data)
    assert scanned.verdict == "issues"
    assert "pickle/dynamic-call" in scanned.rules()


def test_bytes_wrapped_a_hundred_thousand_times_is_no_crash(scan_bytes):
    data = b"\x80\x04cpickle\nloads\n" + b"cbuiltins\nbytes\n" * 100_000 + b"C\x02\x80\x02" + b"\x85R" * 100_001 + b"."
    scanned = scan_bytes(data)
    assert "pickle.loads" in scanned.names()
    assert not any("RecursionError" in e.description for e in scanned.file.all_errors())


def test_a_zip64_record_with_an_offset_no_file_has_is_an_error_not_a_crash(scan_bytes):
    # found by mutating a torch zip: detection sought to 2**63 - 1 (OverflowError out of detection)
    body = b"PK\x03\x04" + b"\x00" * 26
    record = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, 1, 1, 0, (1 << 63) - 1)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, len(body), 1)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    scanned = scan_bytes(body + record + locator + end, "model.zip")
    assert scanned.verdict == "error"
    assert not any("internal error" in e.description for e in scanned.file.all_errors())


def test_a_nul_in_a_codec_name_is_no_crash(scan_bytes):
    # found by mutating an sklearn pickle: str.encode("\x00atin1") raises ValueError, not LookupError
    data = b"\x80\x02cpickle\nloads\nc_codecs\nencode\nX\x01\x00\x00\x00bX\x06\x00\x00\x00\x00atin1\x86R\x85R."
    scanned = scan_bytes(data)
    assert "pickle.loads" in scanned.names()
    assert not any("internal error" in e.description for e in scanned.file.all_errors())


def test_scanning_without_settings_again_and_again_keeps_memory_flat():
    # each scan_stream without settings makes a Settings; its policy stayed alive forever
    # (a WeakKeyDictionary whose values referred to their keys)
    import gc
    import weakref

    from modelscan_core.engine import scan_stream
    from modelscan_core.settings import Settings

    policies = []
    for _ in range(5):
        settings = Settings()
        policies.append(weakref.ref(settings.pickle_policy))
        scan_stream(io.BytesIO(EVIL), "x.pkl", settings)
        del settings
    gc.collect()
    assert all(ref() is None for ref in policies)
