"""Third red-team round against the pickle policy: what the first two rounds left open.

1. The native half of a denied API: a denied module re-exports objects of an extension module
   the name table cannot list (`torch.distributed.FileStore` is `torch._C._distributed_c10d.
   FileStore`, torch._dynamo's frame hook lives in `torch._C._dynamo.eval_frame`).
2. An object trusted code made, then called by the load: its `__call__` may call what it is
   handed, as any trusted callable may (joblib's `Parallel()([(f, args, kwargs)])`).
3. Native model loaders (AOTInductor, nativert), and bare library or script names as paths.
4. Classes built by a trusted metaclass other than type (typing's NamedTupleMeta).
5. A mapping's planted `items()`, which OrderedDict calls.
6. The 2025-2026 advisory gadgets in every spelling find_class takes.
7. Constructors that compile and run text (torch's benchmark Timer over timeit).
8. Modules that run a program when imported (a package's `__main__`).

Payloads only `touch`; nothing built here is ever unpickled.
"""

from __future__ import annotations

import pickle

import pytest

from modelscan_core.scanners.pickle import names

from .pickle_ops import call_op, global_op, stack_global_op, unicode_op
from .policy_util import UNKNOWN_FUNC, describe, high_or_worse, scan, settings, thinned

CMD = "touch /tmp/modelscand-redteam3"


def _args(*values) -> bytes:
    return b"".join(pickle.dumps(v, protocol=2)[2:-1] for v in values)


def _call(module: str, name: str, *values) -> bytes:
    return b"\x80\x02" + call_op(global_op(module, name), _args(*values)) + b"."


# -- 1. the native half of a denied API ----------------------------------------------------------

def _native_reexports() -> list[tuple[str, str, str]]:
    """(re-exporting module, name, native module): what a denied module of the table re-exports
    from a module of its own package that the table does not list."""
    table = names.default_table()
    policy = settings().pickle_policy
    out = []
    for module in sorted(table._index()):
        if policy._denied_module(module)[0] is None:
            continue
        for name, what in sorted((table.entries(module) or {}).items()):
            target, _, target_name = what.partition(":")
            if what[:1] in ("!", "@") or not target_name or table.covers(target) \
                    or target.split(".")[0] != module.split(".")[0] or "." in target_name \
                    or policy._denied_module(target)[0] is not None:
                continue
            out.append((module, name, f"{target}:{target_name}"))
    return out


NATIVE = _native_reexports()


def test_the_table_knows_the_native_halves_of_denied_apis():
    found = {entry[2] for entry in NATIVE}
    assert {"torch._C._distributed_c10d:FileStore", "torch._C._distributed_c10d:TCPStore",
            "torch._C._dynamo.eval_frame:set_eval_frame"} <= found
    assert len(NATIVE) >= 50


@pytest.mark.parametrize("module,name,native", thinned(NATIVE, 25))
def test_native_objects_spelled_by_their_own_module_are_high(module, name, native):
    target, _, target_name = native.partition(":")
    result = scan(_call(target, target_name, "/tmp/store", 1))
    assert high_or_worse(result), (module, name, describe(result))


@pytest.mark.parametrize("spelling", ["GLOBAL", "STACK_GLOBAL", "dotted from torch._C"])
def test_file_store_and_tcp_store_however_spelled(spelling):
    for cls, args in [("FileStore", ("store", 1)), ("TCPStore", ("0.0.0.0", 29500, 1, True))]:
        if spelling == "GLOBAL":
            data = _call("torch._C._distributed_c10d", cls, *args)
        elif spelling == "STACK_GLOBAL":
            data = b"\x80\x04" + call_op(stack_global_op("torch._C._distributed_c10d", cls), _args(*args)) + b"."
        else:
            data = b"\x80\x04" + call_op(stack_global_op("torch._C", f"_distributed_c10d.{cls}"), _args(*args)) + b"."
        result = scan(data)
        assert high_or_worse(result), (cls, describe(result))


def test_frame_evaluation_hook_is_high():
    """set_eval_frame(callback) makes every later Python frame call the callback."""
    data = b"\x80\x02" + call_op(global_op("torch._C._dynamo.eval_frame", "set_eval_frame"),
                                 global_op(*UNKNOWN_FUNC)) + b"."
    assert high_or_worse(scan(data))


def test_listed_objects_re_exported_by_denied_modules_keep_their_judgement():
    """torch._dynamo imports torch's own classes; they are not denied for it."""
    for module, name in [("torch.nn.modules.linear", "Linear"), ("torch", "Size"), ("torch.distributed.tensor", "DTensor"),
                         ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata")]:
        data = b"\x80\x02" + global_op(module, name) + b")\x81."
        assert not high_or_worse(scan(data)), (module, name, describe(scan(data)))


# -- 2. an object trusted code made, called with callables --------------------------------------

def _instance_call(cls: tuple[str, str], handed: bytes) -> bytes:
    return b"\x80\x02" + call_op(call_op(global_op(*cls)), handed) + b"."


PARALLELS = [("sklearn.utils.parallel", "Parallel"), ("sklearn.utils", "Parallel"), ("torch.nn.modules.container", "Sequential")]


@pytest.mark.parametrize("cls", PARALLELS)
@pytest.mark.parametrize("how", ["task tuple", "bare", "partial"])
def test_callables_handed_to_a_trusted_instance_are_called(cls, how):
    func = global_op(*UNKNOWN_FUNC)
    if how == "task tuple":  # Parallel()(delayed(f)(x) for ...): items are (f, args, kwargs)
        handed = b"](" + func + b"(" + unicode_op(CMD) + b"t}ta"
    elif how == "bare":
        handed = func
    else:
        handed = call_op(global_op("functools", "partial"), func + unicode_op(CMD))
    result = scan(_instance_call(cls, handed))
    assert high_or_worse(result), describe(result)


def test_trusted_instance_called_with_data_stays_clean():
    result = scan(_instance_call(("torch.nn.modules.linear", "Identity"), _args(1.0, [1, 2], {"a": "b"})))
    assert not high_or_worse(result), describe(result)


# -- 3. native loaders, and the bare names of what they load --------------------------------------

@pytest.mark.parametrize("module,name,args", [
    ("torch._C._aoti", "AOTIModelContainerRunnerCpu", ("model.so", 1)),
    ("torch._C._aoti", "AOTIModelPackageLoader", ("model.pt2", "model", False, 1)),
    ("torch._C._nativert", "PyModelRunner", ("model.pt2", "forward")),
])
def test_native_model_loaders_are_high(module, name, args):
    """AOTInductor's runner dlopens the library it is handed; the package loader extracts one."""
    result = scan(_call(module, name, *args))
    assert high_or_worse(result), describe(result)


@pytest.mark.parametrize("text", ["libpayload.so", "libx.so.1", "payload.dylib", "evil.dll", "ext.pyd", "run.sh", "setup.bat"])
@pytest.mark.parametrize("cls", [("someones_tools.helpers", "Runner"), ("thinc.backends", "Loader")])
def test_a_bare_library_or_script_name_reads_as_a_path(cls, text):
    """A constructor handed `libx.so` loads it from the loader's working directory, like a path."""
    result = scan(b"\x80\x02" + call_op(global_op(*cls), unicode_op(text)) + b".")
    assert high_or_worse(result), describe(result)
    assert "pickle/suspicious-arguments" in result.rules()


@pytest.mark.parametrize("text", ["weights.bin", "model.safetensors", "config.json", "cuda:0", "bert-base", "so", "x.sox"])
def test_data_file_names_stay_plain(text):
    result = scan(b"\x80\x02" + call_op(global_op("someones_tools.helpers", "Runner"), unicode_op(text)) + b".")
    assert not high_or_worse(result), describe(result)


# -- 4. classes built by a metaclass other than type ----------------------------------------------

METACLASSES = [("typing", "NamedTupleMeta"), ("typing", "_TypedDictMeta"), ("typing", "_ProtocolMeta"),
               ("enum", "EnumType"), ("torch._C", "_TensorMeta"), ("torch.nn.parameter", "_ParameterMeta")]


@pytest.mark.parametrize("bases", ["none", "tuple"])
@pytest.mark.parametrize("meta", METACLASSES)
def test_a_class_built_by_a_trusted_metaclass_is_judged_like_type(meta, bases):
    """NamedTupleMeta("X", (), {"__del__": f}) copies __del__ onto the class; an instance made
    next calls f when it is collected."""
    func = call_op(global_op("functools", "partial"), global_op(*UNKNOWN_FUNC) + unicode_op(CMD))
    namespace = b"}(" + unicode_op("__module__") + unicode_op("x") + unicode_op("__del__") + func + b"u"
    base = b")" if bases == "none" else b"(" + global_op("builtins", "tuple") + b"t"
    cls = call_op(global_op(*meta), unicode_op("X") + base + namespace)
    result = scan(b"\x80\x02" + call_op(cls, _args(1, 2)) + b".")
    assert high_or_worse(result), describe(result)
    assert "pickle/class-built" in result.rules()


@pytest.mark.parametrize("args", [("name", (1, 2), {"a": 1}), ("name", (), {"a": 1}), ("x", "y", "z")])
def test_trusted_constructors_given_three_plain_values_build_no_class(args):
    result = scan(_call("torch.nn.modules.linear", "Identity", *args))
    assert "pickle/class-built" not in result.rules(), describe(result)
    assert not high_or_worse(result), describe(result)


# -- 5. a mapping's planted items(), called by OrderedDict ---------------------------------------

@pytest.mark.parametrize("builder", [("collections", "OrderedDict"), ("builtins", "dict"), ("collections", "Counter")])
@pytest.mark.parametrize("filler", [0, 40])
def test_planted_items_of_a_mapping_handed_to_a_dict_builder(builder, filler):
    """OrderedDict(x) calls x.items() when x has no keys(): an instance attribute set by BUILD."""
    func = call_op(global_op("functools", "partial"), global_op(*UNKNOWN_FUNC) + unicode_op(CMD))
    items = b"".join(unicode_op(f"a{i}") + _args(i) for i in range(filler))
    obj = call_op(global_op("argparse", "Namespace")) + b"}(" + items + unicode_op("items") + func + b"ub"
    result = scan(b"\x80\x02" + call_op(global_op(*builder), obj) + b".")
    assert high_or_worse(result), describe(result)


def test_plain_attributes_of_a_mapping_handed_to_a_dict_builder_stay_clean():
    obj = call_op(global_op("argparse", "Namespace")) + b"}(" + unicode_op("items") + _args([1, 2]) + b"ub"
    result = scan(b"\x80\x02" + call_op(global_op("collections", "OrderedDict"), b"]" ) + b"0" + obj + b".")
    assert not high_or_worse(result), describe(result)


@pytest.mark.parametrize("name,high", [("FunctionType", True), ("CodeType", True), ("MethodType", True), ("slice", False),
                                       ("int", False)])
def test_what_a_type_fetched_by_name_made_is_called(name, high):
    """dill's `_load_type(name)(...)` makes a value; calling that value runs code only when the
    type makes code (a function, a method), never for slices and ints."""
    made = call_op(call_op(global_op("dill._dill", "_load_type"), unicode_op(name)), _args("x", {}))
    result = scan(b"\x80\x02" + call_op(made, _args(CMD)) + b".")
    assert high_or_worse(result) == high, describe(result)


# -- 6. the gadgets of the 2025-2026 scanner advisories, spelled every way find_class takes ------

#: (module, name, args) from picklescan's, fickling's and modelscan's advisories of 2025-2026
ADVISORY_GADGETS = [
    ("_interpreters", "run_string", (0, "x=1")), ("_xxsubinterpreters", "run_string", (0, "x=1")),
    ("asyncio.unix_events", "_UnixSubprocessTransport", (None, None, CMD, True, None, None, None, 0)),
    ("asyncio.base_events", "BaseEventLoop.subprocess_shell", (None, None, CMD)),
    ("distutils.file_util", "write_file", ("x.py", ["import os"])), ("shutil", "copy", ("/etc/passwd", "x")),
    ("numpy.f2py.crackfortran", "getlincoef", ("1", {})), ("numpy.f2py.crackfortran", "_eval_length", ("1", {})),
    ("torch._dynamo.guards", "GuardBuilder.get", (None, "x")), ("torch.utils.bottleneck.__main__", "run_cprofile", ("x", {})),
    ("torch.utils.bottleneck.__main__", "run_autograd_prof", ("x", {})), ("torch.utils.collect_env", "run", (CMD,)),
    ("idlelib.debugobj", "ObjectTreeItem.SetText", (None, "x")), ("idlelib.autocomplete", "AutoComplete.fetch_completions", (None, "x", 1)),
    ("idlelib.pyshell", "ModifiedInterpreter.runcommand", (None, "x")), ("lib2to3.pgen2.pgen", "ParserGenerator.make_label", (None, None, "'x'")),
    ("lib2to3.pgen2.grammar", "Grammar.loads", (None, b"x")), ("operator", "itemgetter", ("x",)),
    ("ssl", "get_server_certificate", (("x", 443),)), ("profile", "Profile.runctx", (None, "x", {}, {})),
    ("trace", "Trace.run", (None, "x")), ("pydoc", "locate", ("os.system",)), ("pty", "spawn", ("id",)),
    ("_pickle", "loads", (b"x",)), ("pickle", "_loads", (b"x",)), ("code", "InteractiveInterpreter.runcode", (None, "x")),
    ("cProfile", "runctx", ("x", {}, {})), ("doctest", "debug_script", ("x",)), ("ensurepip", "_run_pip", (["x"],)),
    ("torch.serialization", "load", ("x.pt",)), ("torch.utils.data.datapipes.utils.decoder", "basichandlers", ("pickle", b"x")),
    ("pkgutil", "resolve_name", ("os:system",)), ("importlib", "import_module", ("os",)), ("marshal", "loads", (b"x",)),
    ("uuid", "_get_command_stdout", ("id",)), ("imaplib", "IMAP4_stream", ("id",)), ("_pyrepl.pager", "pipe_pager", ("x", CMD)),
    ("_osx_support", "_read_output", (CMD,)), ("_aix_support", "_read_cmd_output", (CMD,)), ("logging", "FileHandler", ("x",)),
]


def _spellings(module: str, name: str, args: tuple) -> dict[str, bytes]:
    arg_ops = _args(*args)
    out = {"GLOBAL": b"\x80\x02" + call_op(global_op(module, name), arg_ops) + b".",
           "STACK_GLOBAL": b"\x80\x04" + call_op(stack_global_op(module, name), arg_ops) + b"."}
    if "." not in name:  # INST runs cls(*args) with no REDUCE
        text = b"".join(b"S'" + a.encode("unicode_escape") + b"'\n" for a in args if isinstance(a, str))
        if len(text) and all(isinstance(a, str) for a in args):
            out["INST"] = b"(" + text + b"i" + module.encode() + b"\n" + name.encode() + b"\n."
    head, _, tail = module.rpartition(".")
    if head:  # the module reached as an attribute of its parent package
        out["dotted"] = b"\x80\x04" + call_op(stack_global_op(head, f"{tail}.{name}"), arg_ops) + b"."
    return out


@pytest.mark.parametrize("module,name,args", thinned(ADVISORY_GADGETS, 5))
def test_advisory_gadgets_are_high_however_spelled(module, name, args):
    for spelling, data in _spellings(module, name, args).items():
        result = scan(data)
        assert high_or_worse(result), (spelling, describe(result))


# -- 7. constructors that compile and run text ---------------------------------------------------

#: timeit's template indents stmt after each "\n" only: a bare "\r" ends the line unindented, so
#: the text after it runs when the Timer is made (this one only defines a function)
TEMPLATE_BREAKOUT = "pass\rdef f():\r    if 1:\r        pass"


@pytest.mark.parametrize("module,name", [("torch.utils.benchmark", "Timer"), ("torch.utils.benchmark.utils.timer", "Timer"),
                                         ("timeit", "Timer")])
def test_benchmark_timers_that_exec_their_text_are_high(module, name):
    result = scan(_call(module, name, TEMPLATE_BREAKOUT))
    assert high_or_worse(result), describe(result)


# -- 8. modules that run a program when imported -------------------------------------------------

@pytest.mark.parametrize("module", ["torch.utils.model_dump.__main__", "flask.__main__", "IPython.__main__", "tqdm.__main__",
                                    "somepkg.sub.__main__"])
@pytest.mark.parametrize("use", ["referenced", "called"])
def test_importing_a_package_main_module_is_high(module, use):
    """find_class imports the module first: an unguarded __main__ runs its program right there."""
    ref = global_op(module, "main")
    data = b"\x80\x02" + (call_op(ref) if use == "called" else ref) + b"."
    result = scan(data)
    assert high_or_worse(result), describe(result)


def test_the_loaders_own_main_module_stays_a_plain_name():
    """Classes defined in the script that saved the pickle live in `__main__`: that is no entry point."""
    result = scan(b"\x80\x02" + global_op("__main__", "Net") + b")\x81}" + unicode_op("w") + _args(1) + b"sb.")
    assert not high_or_worse(result), describe(result)


@pytest.mark.parametrize("attribute", ["keys", "items"])
@pytest.mark.parametrize("cls,base", [(("collections", "OrderedDict"), ("builtins", "dict")),
                                      (("collections", "OrderedDict"), ("collections", "OrderedDict")),
                                      (("collections", "Counter"), ("collections", "Counter"))])
def test_planted_mapping_methods_called_by_a_reconstructor_base(attribute, cls, base):
    """copyreg._reconstructor(cls, base, state) runs base.__init__(obj, state): dict's calls keys()."""
    func = call_op(global_op("functools", "partial"), global_op(*UNKNOWN_FUNC) + unicode_op(CMD))
    state = call_op(global_op("argparse", "Namespace")) + b"}" + unicode_op(attribute) + func + b"sb"
    data = b"\x80\x02" + call_op(global_op("copyreg", "_reconstructor"), global_op(*cls) + global_op(*base) + state) + b"."
    result = scan(data)
    assert high_or_worse(result), describe(result)


def test_dict_subclasses_as_protocol_0_writes_them_stay_clean():
    import collections

    for protocol in (0, 1):
        result = scan(pickle.dumps(collections.OrderedDict(a=1, b=[1, 2]), protocol=protocol))
        assert not high_or_worse(result), describe(result)
        result = scan(pickle.dumps(collections.Counter("abca"), protocol=protocol))
        assert not high_or_worse(result), describe(result)
