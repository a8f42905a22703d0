"""Threat classes A (callables short denylists miss) and B (VM vs static-parser differentials).

Every fixture is built from opcodes or from `pickle.dumps` of an object whose `__reduce__`
names the payload; nothing here is ever unpickled. Payloads are harmless (`echo`, `touch`).
"""

from __future__ import annotations

import pickle
import struct

import pytest

from modelscan_core.model import Severity

from .pickle_ops import Reduce, global_op, unicode_op


def call(module: str, name: str, *args: str, proto: int = 2) -> bytes:
    """A protocol-2 pickle of module.name(*args) from opcodes."""
    body = global_op(module, name) + b"(" + b"".join(b"X" + struct.pack("<I", len(a.encode())) + a.encode() for a in args) + b"tR."
    return b"\x80" + bytes([proto]) + body


# -- class A: dangerous callables a 21-module denylist misses -----------------------

CLASS_A = {
    "pip.main": call("pip", "main", "install", "--quiet", "harmless-package"),
    "runpy._run_code": call("runpy", "_run_code", "print('hi')"),
    "timeit.timeit": call("timeit", "timeit", "", "import os; os.system('echo hi')"),
    "cProfile.run": call("cProfile", "run", "print('hi')"),
    "pydoc.pipepager": call("pydoc", "pipepager", "", "echo hi"),
    "types.FunctionType": call("types", "FunctionType", "x"),
    "marshal.loads": call("marshal", "loads", "x"),
    "_posixsubprocess.fork_exec": call("_posixsubprocess", "fork_exec", "echo"),
    "importlib.import_module": call("importlib", "import_module", "os"),
    "inspect.getattr_static": call("inspect", "getattr_static", "os", "system"),
    "codecs.open": call("codecs", "open", "/etc/passwd"),
    "uuid._get_command_stdout": call("uuid", "_get_command_stdout", "echo"),
    "_osx_support._read_output": call("_osx_support", "_read_output", "echo hi"),
    "io.open for writing": call("io", "open", "/tmp/x", "w"),
    "_pyio.FileIO": call("_pyio", "FileIO", "/tmp/x", "w"),
    "torch.load": call("torch", "load", "/tmp/other.pt"),
    "torch.serialization.load": call("torch.serialization", "load", "/tmp/other.pt"),
    "numpy.load": call("numpy", "load", "/tmp/x.npy"),
    "pandas.read_pickle": call("pandas", "read_pickle", "/tmp/x.pkl"),
    "numpy.testing._private.utils.runstring": call("numpy.testing._private.utils", "runstring", "print(1)", "x"),
    "torch.utils.collect_env.run": call("torch.utils.collect_env", "run", "echo hi"),
    "asyncio.subprocess.create_subprocess_shell": call("asyncio.subprocess", "create_subprocess_shell", "echo hi"),
    "subprocess.Popen": call("subprocess", "Popen", "echo"),
    "builtins.exec": call("builtins", "exec", "print(1)"),
    "__builtin__.eval": call("__builtin__", "eval", "1+1"),
    "webbrowser.open": call("webbrowser", "open", "http://127.0.0.1/"),
    "socket.create_connection": call("socket", "create_connection", "x"),
    "shutil.rmtree": call("shutil", "rmtree", "/tmp/nothing-here"),
    "ctypes.CDLL": call("ctypes", "CDLL", "libc.so.6"),
    "pty.spawn": call("pty", "spawn", "echo"),
    "code.interact": call("code", "interact", "x"),
    "os.path.exists": call("os.path", "exists", "/etc/passwd"),
    "posixpath.os": call("posixpath", "os"),
    "logging.config.listen": call("logging.config", "listen"),
    "dill._dill._create_code": call("dill._dill", "_create_code", "x"),
    "cloudpickle.cloudpickle.subimport": call("cloudpickle.cloudpickle", "subimport", "os"),
    "operator.methodcaller": call("operator", "methodcaller", "system", "echo hi"),
    "an unknown function": call("someones_tools.helpers", "run_command", "echo hi"),
}


@pytest.mark.parametrize("label", sorted(CLASS_A))
def test_class_a_callables_are_high_or_critical(scan_bytes, label):
    result = scan_bytes(CLASS_A[label])
    assert result.verdict == "issues"
    assert result.worst >= Severity.HIGH, result.report.findings()


def test_pickle_dumps_of_reduce_objects(scan_bytes):
    import os
    import subprocess

    for proto in range(0, pickle.HIGHEST_PROTOCOL + 1):
        result = scan_bytes(pickle.dumps(Reduce(os.system, ("touch /tmp/modelscand-test",)), protocol=proto))
        assert result.worst == Severity.CRITICAL, proto
        finding = result.report.findings()[0]
        assert finding.call == "posix.system('touch /tmp/modelscand-test')"
        assert finding.description == "Use of unsafe operator 'system' from module 'posix'"
        result = scan_bytes(pickle.dumps(Reduce(subprocess.check_output, (["echo", "hi"],)), protocol=proto))
        assert result.worst == Severity.CRITICAL


def test_marshal_function_chain_is_critical(scan_bytes):
    # types.FunctionType(marshal.loads(b"..."), {})()
    data = (
        b"\x80\x02" + global_op("types", "FunctionType")
        + global_op("marshal", "loads") + b"C\x03abc\x85R}\x86R)R."
    )
    result = scan_bytes(data)
    assert {"types.FunctionType", "marshal.loads"} <= result.names(Severity.CRITICAL)
    assert "pickle/dynamic-call" in result.rules()


def test_partial_wrapped_payload_is_called(scan_bytes):
    # functools.partial(os.system, "echo hi")() : partial is harmless, the call of it is not
    data = b"\x80\x02" + global_op("functools", "partial") + global_op("os", "system") + b"X\x07\x00\x00\x00echo hi\x86R)R."
    result = scan_bytes(data)
    assert result.worst == Severity.CRITICAL
    assert "pickle/dynamic-call" in result.rules()


# -- class B: where a static parser and the real unpickler disagree ---------------

def test_int_parsed_with_base_zero_does_not_stop_the_scan(scan_bytes):
    # pickletools raises on I0x10; CPython's load_int accepts it and goes on to the call
    data = b"I0x10\n0" + global_op("os", "system") + b"(S'echo hi'\ntR."
    result = scan_bytes(data)
    assert result.worst == Severity.CRITICAL
    assert result.file.errors == ()


def test_octal_int_and_bool_forms(scan_bytes):
    data = b"(I010\nI00\nI01\nI-5\nL12L\nl0" + global_op("posix", "system") + b"(S'echo'\ntR."
    assert scan_bytes(data).worst == Severity.CRITICAL


def test_stack_global_fed_by_protocol0_strings(scan_bytes):
    data = b"\x80\x04S'os'\nS'system'\n\x93S'echo hi'\n\x85R."
    result = scan_bytes(data)
    assert "os.system" in result.names(Severity.CRITICAL)


def test_stack_global_fed_by_memo_with_decoys(scan_bytes):
    data = (
        b"\x80\x04" + unicode_op("builtins") + b"q\x01" + unicode_op("print") + b"q\x02" + b"00"
        + unicode_op("os") + b"q\x03" + unicode_op("system") + b"q\x04" + b"00"
        + unicode_op("decoy") + b"q\x01" + b"0"
        + b"h\x03h\x04\x93" + unicode_op("echo hi") + b"\x85R."
    )
    result = scan_bytes(data)
    assert "os.system" in result.names(Severity.CRITICAL)
    assert "builtins.print" not in result.names()


def test_memoize_uses_the_count_of_entries(scan_bytes):
    # PUT 5 then MEMOIZE: CPython stores at index 1 (memo_len), not 6
    data = (
        b"\x80\x04" + unicode_op("decoy") + b"q\x05" + b"0" + unicode_op("os") + b"\x94" + b"0"
        + b"h\x01" + unicode_op("system") + b"\x93" + unicode_op("echo") + b"\x85R."
    )
    assert "os.system" in scan_bytes(data).names(Severity.CRITICAL)


@pytest.mark.parametrize(
    "module,name",
    [("builtins", "eval.__call__"), ("pathlib", "os.system"), ("posixpath", "os.system"), ("torch.serialization", "pickle.loads")],
)
def test_dotted_names_resolve_like_find_class(scan_bytes, module, name):
    data = b"\x80\x04" + unicode_op(module) + unicode_op(name) + b"\x93" + unicode_op("1") + b"\x85R."
    assert scan_bytes(data).worst == Severity.CRITICAL


def test_inst_and_obj_call_without_global(scan_bytes):
    inst = b"(S'echo hi'\nios\nsystem\n."
    obj = b"(" + global_op("os", "system") + b"S'echo hi'\no."
    for data in (inst, obj):
        result = scan_bytes(data)
        assert result.worst == Severity.CRITICAL
        assert result.report.findings()[0].call == "os.system('echo hi')"


def test_truncated_after_reduce_keeps_the_finding_and_is_an_error(scan_bytes):
    data = b"\x80\x02" + global_op("os", "system") + b"X\x02\x00\x00\x00hi\x85R"  # no STOP
    result = scan_bytes(data)
    assert result.verdict == "issues"
    assert result.worst == Severity.CRITICAL
    assert "pickle/call-before-error" in result.rules()
    assert result.file.errors and result.file.errors[0].category == "PICKLE_GENOPS"
    assert result.report.exit_code == 1


def test_malformed_after_benign_call_is_reported(scan_bytes):
    data = b"\x80\x02" + global_op("collections", "OrderedDict") + b")R\xff"
    result = scan_bytes(data)
    assert "pickle/call-before-error" in result.rules()
    assert result.verdict == "issues"


def test_second_pickle_after_a_benign_one(scan_bytes):
    import os

    data = pickle.dumps({"weights": [1.0, 2.0]}, protocol=2) + pickle.dumps(Reduce(os.system, ("echo hi",)), protocol=2)
    result = scan_bytes(data, "model.bin")
    assert result.worst == Severity.CRITICAL


def test_unresolvable_global_operands_are_reported(scan_bytes):
    # module name computed by a call: the scanner cannot know it statically
    data = (
        b"\x80\x04" + global_op("builtins", "str") + unicode_op("os") + b"\x85R" + unicode_op("system") + b"\x93"
        + unicode_op("echo") + b"\x85R."
    )
    result = scan_bytes(data)
    assert "pickle/unresolved-global" in result.rules()
    assert result.worst >= Severity.HIGH


def test_extension_codes_are_reported(scan_bytes):
    data = b"\x80\x02\x82\x01)R."
    result = scan_bytes(data)
    assert "pickle/unresolved-global" in result.rules()
    assert result.worst >= Severity.HIGH


def test_nested_pickle_payload_is_scanned_as_a_member(scan_bytes):
    import os

    inner = pickle.dumps(Reduce(os.system, ("echo inner",)), protocol=2)
    outer = pickle.dumps(Reduce(pickle.loads, (inner,)), protocol=4)
    result = scan_bytes(outer)
    sources = {f.source for f in result.report.findings() if f.module == "posix"}
    assert any(s.startswith("model.pkl:pickle@") for s in sources), sources


@pytest.mark.parametrize("name", ["payload.txt", "MODEL.BIN", "blob-without-extension", "DATA.PKL"])
def test_content_decides_not_the_name(scan_bytes, name):
    import os

    result = scan_bytes(pickle.dumps(Reduce(os.system, ("echo hi",)), protocol=0), name)
    assert result.file.format == "pickle"
    assert result.worst == Severity.CRITICAL


def test_dill_and_cloudpickle_functions_are_code(scan_bytes):
    import cloudpickle
    import dill

    def add_one(x):
        return x + 1

    for dumps in (dill.dumps, cloudpickle.dumps):
        result = scan_bytes(dumps(add_one))
        assert result.worst == Severity.CRITICAL, dumps
        result = scan_bytes(dumps(lambda x: x * 2))
        assert result.worst == Severity.CRITICAL, dumps


def test_names_imported_through_numpy_ufunc_reconstruct_are_judged(scan_bytes):
    # numpy.core._ufunc_reconstruct("os", "system") returns os.system; calling it runs it
    data = b"\x80\x02" + global_op("numpy.core", "_ufunc_reconstruct") + b"X\x02\x00\x00\x00osX\x06\x00\x00\x00system\x86R" \
        + b"X\x04\x00\x00\x00echo\x85R."
    result = scan_bytes(data)
    assert "os.system" in result.names(Severity.CRITICAL)
    benign = b"\x80\x02" + global_op("numpy.core", "_ufunc_reconstruct") + b"X\x05\x00\x00\x00numpyX\x05\x00\x00\x00log1p\x86R."
    assert scan_bytes(benign).verdict == "clean"


def test_calling_an_ecosystem_function_is_not_trusted(scan_bytes):
    # classes and pickle helpers of torch/numpy/... are trusted; their other functions are not
    result = scan_bytes(call("transformers", "pipeline", "text-generation"))
    assert result.worst == Severity.HIGH
    result = scan_bytes(call("torch.nn.modules.linear", "Linear", "4", "4"))
    assert result.verdict == "clean"


def test_pickle_without_proto_header_is_still_a_pickle(scan_bytes):
    # PROTO is optional to CPython: protocol 4 opcodes from the first byte, after a long string
    long = b"x" * 100_000
    data = b"X" + struct.pack("<I", len(long)) + long + b"0" + unicode_op("os") + unicode_op("system") + b"\x93" \
        + unicode_op("echo") + b"\x85R."
    for blob, name in ((data, "weights.bin"), (data[5 + len(long) + 1:], "noheader")):
        result = scan_bytes(blob, name)
        assert result.file.format == "pickle", name
        assert result.worst == Severity.CRITICAL


def test_binary_data_that_starts_like_an_opcode_is_not_a_pickle(scan_bytes):
    import random

    rng = random.Random(7)
    for first in b"XKJG(]c":
        blob = bytes([first]) + bytes(rng.getrandbits(8) for _ in range(50_000))
        result = scan_bytes(blob, "tensor.bin")
        assert result.verdict == "skipped", (chr(first), result.report)
