"""Habit 2: every call counts, whoever makes it.

The generated matrix is (callable value) x (who calls it during the load):
- callable values: a global, a `functools.partial` of it (also nested), a bound method
  fetched with getattr from a class or from an object the pickle built, a name imported by
  numpy's ufunc reconstructor, a STACK_GLOBAL;
- callers: REDUCE itself, torch's `_rebuild_from_type(_v2)` (calls its first argument), a
  method planted by BUILD and called by the next BUILD / APPEND / APPENDS / ADDITEMS, a planted
  `keys` called by `dict()` / `OrderedDict()`, a defaultdict factory reached by `getitem`, the
  dunder methods of a class built by `type()`, torch's `_set_obj_state` planting, a trusted
  class handed the callable.
Each case must report the callable's origin at HIGH or worse (CRITICAL when it is a denied
name). A second matrix spells the planted key in every way a state can: a dict literal, slot
state, OrderedDict/dict pairs, a nested `__dict__`, a computed key, past the display cap.
The benign side uses the same mechanisms for real (tensor subclasses, partials of builtins,
data attributes named `keys`/`append`, defaultdicts, typing aliases).
"""

from __future__ import annotations

import collections
import functools
import pickle
import typing

import pytest

from modelscan_core.model import Severity

from .pickle_ops import binunicode_op, call_op, dict_op, global_op, proto, stack_global_op
from .policy_util import UNKNOWN_CLASS, UNKNOWN_FUNC, describe, high_or_worse, scan, thinned

g, s = global_op, binunicode_op
ORIGIN = ".".join(UNKNOWN_FUNC)


def _callables(module: str, name: str) -> dict[str, tuple[bytes, str]]:
    """Opcodes pushing a callable whose call runs module.name, and the name reported for it."""
    target = g(module, name)
    partial = call_op(g("functools", "partial"), target)
    return {
        "global": (target, f"{module}.{name}"),
        "stack_global": (stack_global_op(module, name), f"{module}.{name}"),
        "partial": (partial, f"{module}.{name}"),
        "partial of partial": (call_op(g("functools", "partial"), partial), f"{module}.{name}"),
        "getattr of a class": (call_op(g("builtins", "getattr"), g(module, "Runner"), s(name)), f"{module}.Runner.{name}"),
        "getattr of an object": (call_op(g("builtins", "getattr"), call_op(g(module, "Runner")), s(name)),
                                 f"{module}.Runner.{name}"),
        "ufunc reconstructor": (call_op(g("numpy.core", "_ufunc_reconstruct"), s(module), s(name)), f"{module}.{name}"),
        # protocol 2+ pickles a partial as partial(func) then BUILD (func, args, kwargs, dict):
        # the state's func is the one the partial calls
        "partial whose BUILD replaces the func": (call_op(g("functools", "partial"), g("builtins", "int"))
                                                  + b"(" + target + b")NNtb", f"{module}.{name}"),
    }


def _namespace() -> bytes:
    return call_op(g("argparse", "Namespace"))


def _planted(attribute: str, f: bytes, trigger: bytes) -> bytes:
    """An object whose `attribute` BUILD sets to f, then the opcode that makes the loader call it."""
    return _namespace() + dict_op((s(attribute), f)) + b"b" + trigger


_DUNDERS = ["__del__", "__eq__", "__hash__", "__setstate__", "__init_subclass__", "__set_name__", "__getattr__",
            "__class_getitem__", "__init__", "__call__", "__repr__"]


def _callers() -> dict[str, callable]:
    out = {
        "reduce": lambda f: f + b"(" + s("echo hi") + b"tR",
        "_rebuild_from_type_v2": lambda f: call_op(g("torch._tensor", "_rebuild_from_type_v2"), f, g("torch", "Tensor"),
                                                    b")", b"N"),
        "_rebuild_from_type": lambda f: call_op(g("torch._tensor", "_rebuild_from_type"), f, g("torch", "Tensor"), b")",
                                                 b"}"),
        "planted __setstate__, BUILD": lambda f: _planted("__setstate__", f, s("state") + b"b"),
        "planted append, APPEND": lambda f: _planted("append", f, b"N" + b"a"),
        "planted extend, APPENDS": lambda f: _planted("extend", f, b"(N" + b"e"),
        "planted add, ADDITEMS": lambda f: _planted("add", f, b"(N" + b"\x90"),
        "planted keys, dict()": lambda f: _planted("keys", f, b"q\x050") + call_op(g("builtins", "dict"), b"h\x05"),
        "planted keys, OrderedDict()": lambda f: _planted("keys", f, b"q\x050")
        + call_op(g("collections", "OrderedDict"), b"h\x05"),
        "defaultdict factory, getitem": lambda f: call_op(g("collections", "defaultdict"), f) + b"q\x060"
        + call_op(g("operator", "getitem"), b"h\x06", s("missing")),
        "_set_obj_state, BUILD": lambda f: _namespace() + b"q\x070"
        + call_op(g("torch._utils", "_set_obj_state"), b"h\x07", dict_op((s("__setstate__"), f))) + b"0h\x07Nb",
        "handed to a trusted class": lambda f: call_op(g("torch.nn.modules.linear", "Linear"), f),
        "_rebuild_parameter_with_state state, BUILD": lambda f: call_op(
            g("torch._utils", "_rebuild_parameter_with_state"), call_op(g("torch", "Tensor")), b"\x89",
            call_op(g("collections", "OrderedDict")), dict_op((s("__setstate__"), f))) + s("state") + b"b",
        "_rebuild_from_type_v2 state, BUILD": lambda f: call_op(
            g("torch._tensor", "_rebuild_from_type_v2"), g("torch._utils", "_rebuild_tensor_v2"), g("torch", "Tensor"),
            b")", dict_op((s("__setstate__"), f))) + s("state") + b"b",
    }
    for dunder in _DUNDERS:
        out[f"type() namespace {dunder}"] = (lambda d: lambda f: call_op(
            g("builtins", "type"), s("X"), g("builtins", "object") + b"\x85", dict_op((s(d), f))))(dunder)
    return out


CALLABLES = _callables(*UNKNOWN_FUNC)
CALLERS = _callers()


@pytest.mark.parametrize("callable_,caller", thinned([(c, k) for c in sorted(CALLABLES) for k in sorted(CALLERS)], 2))
def test_a_callable_value_called_by_the_load_is_judged_as_called(callable_, caller):
    f, origin = CALLABLES[callable_]
    result = scan(proto(CALLERS[caller](f)))
    assert high_or_worse(result), describe(result)
    flagged = {f"{x.module}.{x.operator}" for x in result.report.findings() if x.severity >= Severity.HIGH}
    assert origin in flagged or any(r in result.rules() for r in ("pickle/dynamic-call", "pickle/class-built")), \
        describe(result)


DENIED = _callables("posix", "system")


@pytest.mark.parametrize("callable_,caller", thinned(
    [(c, k) for c in ["global", "partial", "ufunc reconstructor"] for k in sorted(CALLERS)], 3))
def test_a_denied_callable_keeps_its_severity_whoever_calls_it(callable_, caller):
    f, origin = DENIED[callable_]
    result = scan(proto(CALLERS[caller](f)))
    assert result.worst == Severity.CRITICAL, describe(result)


# -- however the planted key is spelled ----------------------------------------------------

def _states(f: bytes, attribute: str) -> dict[str, bytes]:
    filler = b"".join(s(f"k{i}") + b"N" for i in range(100))
    key = s(attribute)
    computed = call_op(g("builtins", "str"), key)
    decoded = call_op(g("_codecs", "decode"), b"C" + bytes([len(attribute)]) + attribute.encode(), s("ascii"))
    return {
        "dict literal": dict_op((key, f)),
        "slot state": b"N" + dict_op((key, f)) + b"\x86",
        "OrderedDict pairs": call_op(g("collections", "OrderedDict"), b"]" + key + f + b"\x86" + b"a"),
        "dict pairs": call_op(g("builtins", "dict"), key + f + b"\x86" + b"\x85"),
        "nested __dict__ in slots": b"N" + dict_op((s("__dict__"), dict_op((key, f)))) + b"\x86",
        "computed key str()": dict_op((computed, f)),
        "computed key _codecs.decode()": dict_op((decoded, f)),
        "after 100 keys": b"}(" + filler + key + f + b"u",
        "computed key after 100 keys": b"}(" + filler + computed + f + b"u",
        "memoized state": dict_op((key, f)) + b"q\x09",
        "pairs after 20 filler pairs": call_op(g("collections", "OrderedDict"), b"](" + b"".join(
            s(f"k{i}") + b"N\x86" for i in range(20)) + key + f + b"\x86e"),
    }


_TRIGGERS = {"__setstate__": s("state") + b"b", "append": b"Na", "extend": b"(Ne", "add": b"(N\x90"}


@pytest.mark.parametrize("attribute", sorted(_TRIGGERS))
@pytest.mark.parametrize("spelling", sorted(_states(b"N", "x")))
def test_a_planted_method_is_called_however_the_state_spells_it(spelling, attribute):
    f, origin = CALLABLES["partial"]
    state = _states(f, attribute)[spelling]
    result = scan(proto(_namespace() + state + b"b" + _TRIGGERS[attribute]))
    assert high_or_worse(result), describe(result)


def test_a_lossy_state_fails_closed():
    # more computed keys than the scanner keeps: the one that plants a method may be among them
    keys = b"".join(call_op(g("builtins", "str"), s(f"k{i}")) + b"N" for i in range(200))
    result = scan(proto(_namespace() + b"}(" + keys + b"ub" + s("state") + b"b"))
    assert "pickle/blind" in result.rules() and high_or_worse(result), describe(result)


def test_a_class_swapped_in_by_build_gets_the_next_state():
    # obj.__class__ = X (slot state), then BUILD runs X.__setstate__
    data = proto(_namespace() + b"N" + dict_op((s("__class__"), g(*UNKNOWN_CLASS))) + b"\x86b" + s("state") + b"b")
    result = scan(data)
    assert ".".join(UNKNOWN_CLASS) in result.names(Severity.LOW), describe(result)


# -- the benign side: the same mechanisms in real pickles ----------------------------------

class _Tagged:
    pass


def _benign():
    import torch

    class MyTensor(torch.Tensor):
        pass

    MyTensor.__module__ = "my_project.tensors"
    MyTensor.__qualname__ = "MyTensor"

    def tensor_subclass():
        import sys
        import types

        module = types.ModuleType("my_project.tensors")
        module.MyTensor = MyTensor
        package = types.ModuleType("my_project")
        sys.modules.update({"my_project": package, "my_project.tensors": module})
        try:
            return pickle.dumps(torch.ones(2).as_subclass(MyTensor), protocol=2)
        finally:
            del sys.modules["my_project.tensors"], sys.modules["my_project"]

    import argparse

    return {
        "tensor subclass (_rebuild_from_type_v2)": tensor_subclass,
        "data attributes named keys/append/add/extend": lambda: pickle.dumps(
            argparse.Namespace(keys=["a", "b"], append=True, add=3, extend="x", __setstate__=None), protocol=2),
        "defaultdict(list) with items": lambda: pickle.dumps(collections.defaultdict(list, {"a": [1]}), protocol=4),
        "partial of a builtin": lambda: pickle.dumps(functools.partial(int, base=2), protocol=4),
        "typing aliases": lambda: pickle.dumps([typing.Optional[int], typing.List[str], typing.Dict[str, float]]),
        "OrderedDict of many items": lambda: pickle.dumps(collections.OrderedDict((f"k{i}", i) for i in range(500))),
        "dict with many int keys": lambda: pickle.dumps({i: str(i) for i in range(5000)}, protocol=2),
        "dict with tuple keys": lambda: pickle.dumps({(i, i + 1): i for i in range(3000)}, protocol=4),
    }


BENIGN = _benign()


@pytest.mark.parametrize("label", sorted(BENIGN))
def test_benign_pickles_with_the_same_mechanisms_are_not_high(label):
    result = scan(BENIGN[label]())
    assert not high_or_worse(result), describe(result)


def test_enum_member_fetched_with_getattr_is_clean():
    # Python 3.12 pickles enum members as getattr(EnumClass, "NAME")
    data = proto(call_op(g("builtins", "getattr"), g("http", "HTTPStatus"), s("OK")), 4)
    assert scan(data).verdict == "clean"
