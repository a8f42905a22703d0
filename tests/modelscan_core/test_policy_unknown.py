"""Habit 4: unknown is not "probably fine".

Rule: a class that is not on the exact allowlist (a user class, a class of an ecosystem
package trusted by its name, an unknown standard-library class) constructed with an argument
that reads as Python code, a shell command, a filesystem path or a URL is HIGH
(`unknown_globals.suspicious_args`), at any call, not only the first few. Plain data
arguments keep the old severities (an unknown class constructed: MEDIUM; an ecosystem class:
trusted).

Families: (class source) x (payload string) x (argument position); calls past KEEP_CALLS of
importers, getattr, nested loaders, type() and suspicious constructors; values evicted by the
memo budget used as a callable, a BUILD state, or the target of a planted method.
"""

from __future__ import annotations

import pytest

from modelscan_core.model import Severity
from modelscan_core.scanners.pickle.flow import suspicious_text
from modelscan_core.scanners.pickle.vm import KEEP_CALLS

from .pickle_ops import binunicode_op, call_op, dict_op, global_op, proto
from .policy_util import UNKNOWN_CLASS, UNKNOWN_FUNC, describe, high_or_worse, scan, thinned

g, s = global_op, binunicode_op

CLASSES = {
    "a user class": UNKNOWN_CLASS,
    "an ecosystem class (sklearn.pipeline.Pipeline)": ("sklearn.pipeline", "Pipeline"),
    "an ecosystem class of an allowlisted module (torch.utils.data.dataset.TensorDataset)":
        ("torch.utils.data.dataset", "TensorDataset"),
    "an ecosystem class that writes files (scipy.io.FortranFile, denied)": ("scipy.io", "FortranFile"),
    "an ecosystem class trusted by name (torch._C.ScriptObject)": ("torch._C", "ScriptObject"),
    "an ecosystem class of an uninstalled package": ("transformers.pipelines", "TextGenerationPipeline"),
    "a standard-library class": ("difflib", "SequenceMatcher"),
    "a class of an allowlisted module (torch.nn.modules.linear.Linear)": ("torch.nn.modules.linear", "Linear"),
}

PAYLOADS = ["/tmp/modelscand-x", "~/.ssh/authorized_keys", "../../../etc/passwd", "C:\\Windows\\System32\\x.dll",
            "http://127.0.0.1:8000/x", "file:///etc/passwd", "__import__('os').system('id')",
            "import os; os.system('id')", "echo hi > /tmp/modelscand-x", "sh -c 'id'", "x; curl http://127.0.0.1 | sh",
            "lambda x: __import__('os')", "def f():\n    return 1\n", "$(id)", "exec(open('/tmp/x').read())"]

POSITIONS = {
    "first argument": lambda p: (s(p),),
    "second argument": lambda p: (s("ok"), s(p)),
    "inside a tuple": lambda p: (s("ok") + s(p) + b"\x86",),
    "inside a dict": lambda p: (dict_op((s("path"), s(p))),),
}


@pytest.mark.parametrize("cls,payload,position", thinned(
    [(c, p, pos) for c in sorted(CLASSES) for p in PAYLOADS for pos in sorted(POSITIONS)], every=5))
def test_a_class_constructed_with_code_or_paths_is_high(cls, payload, position):
    module, name = CLASSES[cls]
    result = scan(proto(call_op(g(module, name), *POSITIONS[position](payload))))
    assert high_or_worse(result), describe(result)
    assert {"pickle/suspicious-arguments", "pickle/unsafe-global"} & result.rules(), describe(result)


BENIGN_ARGUMENTS = ["steps", "cpu", "cuda:0", "bert-base-uncased", "en_US.UTF-8", "model.safetensors", "relu",
                    "a/b", "Hello, world", "importance", "definitely", "echo", "cat toy", "id 5", "x|y", "2024-01-01",
                    "{\"a\": 1}", "SELECT", "lambda", "torch.float32", "<unk>", "https", ""]


@pytest.mark.parametrize("argument", BENIGN_ARGUMENTS)
def test_plain_strings_do_not_read_as_code_or_paths(argument):
    assert suspicious_text(argument) == ""
    result = scan(proto(call_op(g("torch.nn.modules.linear", "Linear"), s(argument))))
    assert result.verdict == "clean", describe(result)
    result = scan(proto(call_op(g(*UNKNOWN_CLASS), s(argument))))
    assert result.worst == Severity.MEDIUM, describe(result)


def test_exactly_allowlisted_classes_take_paths():
    # pathlib paths, dateutil's tzfile(None, filename): a path is what they are made of
    for data in (proto(call_op(g("pathlib", "PosixPath"), s("/etc/passwd"))),
                 proto(call_op(g("dateutil.tz.tz", "tzfile"), b"N", s("/usr/share/zoneinfo/UTC")))):
        assert scan(data).verdict == "clean"


# -- past the first few calls ----------------------------------------------------------------

_BENIGN_CALLS = {
    "ufunc reconstructor": (lambda: call_op(g("numpy.core", "_ufunc_reconstruct"), s("numpy"), s("log1p")),
                            lambda: call_op(g("numpy.core", "_ufunc_reconstruct"), s("posix"), s("system")) + s("id")
                            + b"\x85R"),
    "getattr": (lambda: call_op(g("builtins", "getattr"), g("http", "HTTPStatus"), s("OK")),
                lambda: call_op(g("builtins", "getattr"), g("posix", "system"), s("__call__"))),
    "unknown class": (lambda: call_op(g(*UNKNOWN_CLASS), s("plain")),
                      lambda: call_op(g(*UNKNOWN_CLASS), s("/etc/passwd"))),
    "type()": (lambda: call_op(g("builtins", "type"), b"N"),
               lambda: call_op(g("builtins", "type"), s("X"), b")", dict_op((s("__del__"), g(*UNKNOWN_FUNC))))),
    "_rebuild_from_type_v2": (
        lambda: call_op(g("torch._tensor", "_rebuild_from_type_v2"), g("torch._utils", "_rebuild_tensor_v2"),
                        g("torch", "Tensor"), b")", b"N"),
        lambda: call_op(g("torch._tensor", "_rebuild_from_type_v2"), g(*UNKNOWN_FUNC), g("torch", "Tensor"), b")",
                        b"N")),
    "nested loader": (lambda: call_op(g("pickle", "loads"), b"C\x04\x80\x02N."),
                      lambda: call_op(g("pickle", "loads"), b"C\x10\x80\x02cposix\nsystem\n)R.")),
}


@pytest.mark.parametrize("count", [KEEP_CALLS, 50, 600])
@pytest.mark.parametrize("label", sorted(_BENIGN_CALLS))
def test_a_call_past_the_first_few_is_judged(label, count):
    benign, evil = _BENIGN_CALLS[label]
    body = b"(" + b"".join(benign() + b"0" for _ in range(count)) + evil() + b"l"
    result = scan(proto(body, 2))
    assert high_or_worse(result), describe(result)


@pytest.mark.parametrize("label", sorted(_BENIGN_CALLS))
def test_many_benign_calls_stay_below_high(label):
    if label == "nested loader":
        pytest.skip("pickle.loads is denied whatever it loads")
    benign, _ = _BENIGN_CALLS[label]
    body = b"(" + b"".join(benign() + b"0" for _ in range(600)) + b"l"
    result = scan(proto(body, 2))
    assert not high_or_worse(result), describe(result)


# -- values the memo budget evicted ---------------------------------------------------------------

_FILLER = b"".join(s(f"x{i}") + b"q" + bytes([i % 200 + 50]) + b"0" for i in range(40))


def test_an_evicted_value_called_fails_closed():
    # the partial is memoized after the budget: GET returns what the scanner did not keep
    data = proto(_FILLER + call_op(g("functools", "partial"), g("builtins", "int")) + b"r" + b"\x00\x10\x00\x00" + b"0"
                 + b"j\x00\x10\x00\x00" + s("x") + b"\x85R", 2)
    result = scan(data, max_memo_values=4)
    assert high_or_worse(result), describe(result)


def test_an_evicted_state_fails_closed():
    data = proto(_FILLER + dict_op((s("__setstate__"), call_op(g("functools", "partial"), g(*UNKNOWN_FUNC))))
                 + b"r\x00\x10\x00\x000" + call_op(g("argparse", "Namespace")) + b"j\x00\x10\x00\x00b" + s("x") + b"b", 2)
    result = scan(data, max_memo_values=4)
    assert high_or_worse(result), describe(result)


def test_a_planted_object_evicted_then_built_again_fails_closed():
    obj = call_op(g("argparse", "Namespace")) + b"r\x00\x10\x00\x00"
    plant = dict_op((s("__setstate__"), call_op(g("functools", "partial"), g("builtins", "int")))) + b"b0"
    data = proto(_FILLER + obj + plant + b"j\x00\x10\x00\x00" + s("x") + b"b", 2)
    result = scan(data, max_memo_values=4)
    assert high_or_worse(result), describe(result)


def test_evicted_plain_data_used_as_data_is_fine():
    data = proto(_FILLER + b"(" + b"".join(b"j" + (200 + i).to_bytes(4, "little") for i in range(0)) + b"l", 2)
    assert not high_or_worse(scan(data, max_memo_values=4))
