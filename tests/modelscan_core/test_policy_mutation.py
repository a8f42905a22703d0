"""Habit 3: mutation is itself the attack.

The generated matrix is (what the pickle imports) x (the opcode that changes it): BUILD with a
dict state, BUILD with a slot state (setattr), SETITEM, SETITEMS, APPEND, APPENDS, ADDITEMS,
on a class, a function, a module reached through an alias, a user class, and the
unpickler's own tables (copyreg's registries, sys.modules, _compat_pickle's mappings,
pickle's module attributes). Every case is HIGH, the unpickler's tables and planted
callables CRITICAL. Then later uses of a patched name are judged as the patched value.
"""

from __future__ import annotations

import pytest

from modelscan_core.model import Severity

from .pickle_ops import binunicode_op, call_op, dict_op, global_op, proto
from .policy_util import UNKNOWN_FUNC, describe, high_or_worse, scan

g, s = global_op, binunicode_op

TARGETS = {
    "a class (collections.OrderedDict)": (g("collections", "OrderedDict"), False),
    "a class (torch.nn.modules.linear.Linear)": (g("torch.nn.modules.linear", "Linear"), False),
    "a function (numpy.prod)": (g("numpy", "prod"), False),
    "a function (torch._utils._rebuild_tensor_v2)": (g("torch._utils", "_rebuild_tensor_v2"), False),
    "a module through an alias (torch.nn.modules.linear.F)": (g("torch.nn.modules.linear", "F"), False),
    "a user class": (g("my_project.models", "Net"), False),
    "copyreg._extension_registry": (g("copyreg", "_extension_registry"), True),
    "copyreg.dispatch_table": (g("copyreg", "dispatch_table"), True),
    "sys.modules": (g("sys", "modules"), True),
    "_compat_pickle.NAME_MAPPING": (g("_compat_pickle", "NAME_MAPPING"), True),
    "_compat_pickle.IMPORT_MAPPING": (g("_compat_pickle", "IMPORT_MAPPING"), True),
    "pickle.Unpickler": (g("pickle", "Unpickler"), True),
    "builtins.object": (g("builtins", "object"), True),
}

OPS = {
    "BUILD dict state": lambda t: t + dict_op((s("attr"), s("value"))) + b"b",
    "BUILD slot state": lambda t: t + b"N" + dict_op((s("attr"), s("value"))) + b"\x86b",
    "SETITEM": lambda t: t + s("key") + s("value") + b"s",
    "SETITEMS": lambda t: t + b"(" + s("key") + s("value") + b"u",
    "APPEND": lambda t: t + s("value") + b"a",
    "APPENDS": lambda t: t + b"(" + s("value") + b"e",
    "ADDITEMS": lambda t: t + b"(" + s("value") + b"\x90",
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_changing_an_imported_object_is_a_finding(target, op):
    opcodes, machinery = TARGETS[target]
    result = scan(proto(OPS[op](opcodes)))
    assert "pickle/mutation" in result.rules(), describe(result)
    assert high_or_worse(result), describe(result)
    if machinery:
        assert result.worst == Severity.CRITICAL, describe(result)


@pytest.mark.parametrize("target", sorted(t for t, (_, machinery) in TARGETS.items() if not machinery))
def test_planting_a_callable_in_an_imported_object_is_critical(target):
    opcodes, _ = TARGETS[target]
    result = scan(proto(opcodes + b"N" + dict_op((s("forward"), g(*UNKNOWN_FUNC))) + b"\x86b"))
    assert any(f.rule_id == "pickle/mutation" and f.severity == Severity.CRITICAL for f in result.report.findings()), \
        describe(result)


def test_a_patched_name_is_judged_as_what_was_written_there():
    # numpy.prod.run = <unknown function>; then numpy.prod.run(...) calls that function
    data = proto(g("numpy", "prod") + b"N" + dict_op((s("run"), g(*UNKNOWN_FUNC))) + b"\x86b0"
                 + g("numpy", "prod.run") + s("echo hi") + b"\x85R")
    result = scan(data)
    assert ".".join(UNKNOWN_FUNC) in result.names(Severity.HIGH), describe(result)


def test_names_under_a_patch_with_unknown_keys_are_unresolved():
    # modelscan issue 89: BUILD numpy.prod with sys.modules as the slot state, then numpy.prod.os.system
    data = proto(g("numpy", "prod") + b"N" + g("numpy", "core._internal.sys.modules") + b"\x86b0"
                 + g("numpy", "prod.os.system") + s("echo hi") + b"\x85R")
    result = scan(data)
    assert result.worst == Severity.CRITICAL
    assert "pickle/unresolved-global" in result.rules(), describe(result)


@pytest.mark.parametrize("table,key", [("sys", "modules"), ("_compat_pickle", "IMPORT_MAPPING")])
def test_names_imported_after_the_loader_tables_change_are_unresolved(table, key):
    # sys.modules["collections"] = <something>; every later collections.* is what was put there
    data = proto(g(table, key) + s("collections") + g("builtins", "object") + b"s0"
                 + g("collections", "OrderedDict") + b")R")
    result = scan(data)
    assert "pickle/unresolved-global" in result.rules(), describe(result)


def test_name_mapping_rewrite_makes_later_names_unresolved():
    data = proto(g("_compat_pickle", "NAME_MAPPING") + s("harmless") + s("name") + b"\x86" + s("posix") + s("system")
                 + b"\x86s0" + g("harmless", "name") + s("id") + b"\x85R", 2)
    result = scan(data)
    assert result.worst == Severity.CRITICAL
    assert "pickle/unresolved-global" in result.rules(), describe(result)


def test_rewriting_an_object_fetched_with_getattr_is_a_finding():
    data = proto(call_op(g("builtins", "getattr"), g("torch.nn.modules.linear", "Linear"), s("forward"))
                 + dict_op((s("x"), s("y"))) + b"b")
    result = scan(data)
    assert "pickle/mutation" in result.rules(), describe(result)


def test_objects_the_pickle_made_are_not_mutations():
    import collections
    import pickle

    value = {"od": collections.OrderedDict(a=1), "dd": collections.defaultdict(list, a=[1]), "dq": collections.deque([1])}
    for protocol in range(0, 6):
        result = scan(pickle.dumps(value, protocol=protocol))
        assert "pickle/mutation" not in result.rules(), (protocol, describe(result))
