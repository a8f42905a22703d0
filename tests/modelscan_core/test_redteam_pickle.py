"""Red-team families against the pickle policy, built from the public record of scanner bypasses.

Each family is a technique, with its cases generated: the callables that published advisories
and papers used (picklescan's and modelscan's advisories, "The Art of Hide and Seek" gadget
classes), the ecosystem classes whose constructors act on the world (read from the generated
name table, so a new torch brings its own), dill's type-by-name helper, copyreg's base
initialiser, and code spelled to slip past the argument rules. Payloads only `touch` or `echo`;
nothing built here is ever unpickled.
"""

from __future__ import annotations

import pickle

import pytest

from modelscan_core.model import Severity
from modelscan_core.scanners.pickle import names
from modelscan_core.scanners.pickle.lists import ECOSYSTEM_PACKAGES, SAFE_REASONS

from .pickle_ops import Reduce, call_op, global_op, stack_global_op, unicode_op
from .policy_util import UNKNOWN_CLASS, describe, high_or_worse, scan, settings, thinned

CMD = "touch /tmp/modelscand-redteam"


def _args(*values) -> bytes:
    """Opcodes pushing each value (plain data only), as pickle protocol 2 writes them."""
    return b"".join(pickle.dumps(v, protocol=2)[2:-1] for v in values)


def _call(module: str, name: str, *values) -> bytes:
    return b"\x80\x02" + call_op(global_op(module, name), _args(*values)) + b"."


# -- 1. gadget callables of the standard library and the ML libraries -----------------------------

#: (module, name, arguments): callables published as scanner bypasses, by what they do with
#: arguments the attacker chooses. Each must be reported HIGH or worse when called.
PUBLISHED_GADGETS = [
    # evaluate or compile text, run code objects
    ("numpy.f2py.crackfortran", "myeval", ("1",)), ("numpy.testing._private.utils", "runstring", ("x=1", {})),
    ("torch.jit.unsupported_tensor_ops", "execWrapper", ("x=1", {}, {})),
    ("torch.fx.experimental.symbolic_shapes", "ShapeEnv.evaluate_guards_expression", (None, "1", [])),
    ("torch.jit.annotations", "parse_type_line", ("# type: (int) -> int", None, 1)),
    ("torch._jit_internal", "createResolutionCallbackFromEnv", (None,)),
    ("torch.utils._config_module", "ConfigModule.load_config", (None, b"x")),
    ("code", "InteractiveInterpreter.runsource", (None, "x")), ("cProfile", "run", ("x",)), ("profile", "run", ("x",)),
    ("timeit", "timeit", ("x",)), ("trace", "Trace.runctx", (None, "x")), ("pdb", "run", ("x",)),
    ("bdb", "Bdb.run", (None, "x")), ("doctest", "debug_script", ("x",)), ("runpy", "_run_code", ("x", {})),
    ("pandas", "eval", ("1+1",)), ("numexpr", "evaluate", ("1+1",)), ("numpy.lib.utils", "safe_eval", ("1",)),
    ("sympy", "sympify", ("x",)), ("jinja2", "Template", ("{{x}}",)), ("yaml", "unsafe_load", ("x",)),
    ("builtins", "breakpoint", ()), ("idlelib.pyshell", "ModifiedInterpreter", (None,)),
    # processes
    ("imaplib", "IMAP4_stream", ("id",)), ("_pyrepl.pager", "pipe_pager", ("x", CMD)), ("pydoc", "pipepager", ("x", CMD)),
    ("uuid", "_get_command_stdout", ("touch", "/tmp/x")), ("_osx_support", "_read_output", (CMD,)),
    ("_aix_support", "_read_cmd_output", (CMD,)), ("ensurepip", "_run_pip", (["install", "x"],)),
    ("pip._internal.cli.main", "main", (["install", "x"],)), ("platform", "_syscmd_file", ("x", "")),
    ("multiprocessing.util", "spawnv_passfds", ("/bin/sh", ["sh", "-c", "id"], [])),
    ("asyncio.subprocess", "create_subprocess_shell", (CMD,)), ("subprocess", "getoutput", (CMD,)),
    ("posix", "system", (CMD,)), ("nt", "system", (CMD,)), ("os", "system", (CMD,)), ("webbrowser", "open", ("x",)),
    ("torch.utils.cpp_extension", "load_inline", ("x", "int x;")), ("venv", "create", ("x",)),
    ("setuptools.sandbox", "run_setup", ("x.py",)), ("test.support.script_helper", "assert_python_ok", ("-c", "x")),
    # imports by name, attribute walks, code objects
    ("pkgutil", "resolve_name", ("os:system",)), ("importlib", "import_module", ("os",)), ("marshal", "loads", (b"x",)),
    ("types", "FunctionType", (None, {})), ("operator", "methodcaller", ("system", CMD)),
    ("operator", "attrgetter", ("system",)), ("functools", "reduce", (None, [])), ("ctypes", "CDLL", ("libc.so.6",)),
    ("numpy.ctypeslib", "load_library", ("libx", ".")), ("torch.ops", "load_library", ("x.so",)),
    ("torch.classes", "load_library", ("x.so",)), ("cloudpickle.cloudpickle", "subimport", ("os",)),
    ("cloudpickle.cloudpickle", "_builtin_type", ("CodeType",)), ("dill._dill", "_import_module", ("os",)),
    ("dill._dill", "_create_code", (1, 2, 3)), ("dill._dill", "_create_function", (None, {}, "f")),
    ("dill._dill", "_get_attr", (None, "system")), ("dill._dill", "_eval_repr", ("1",)),
    ("torch._inductor.codecache", "compile_file", ("a", "b", "c")), ("site", "addsitedir", ("x",)),
    ("unittest.mock", "Mock", ()),
    # nested loaders
    ("torch", "load", ("x.pt",)), ("torch.serialization", "load", ("x.pt",)), ("torch.hub", "load", ("a/b", "c")),
    ("torch.package", "PackageImporter", ("x.pt",)), ("numpy", "load", ("x.npy", None, True)),
    ("numpy.lib._npyio_impl", "load", ("x.npy", None, True)), ("joblib", "load", ("x.pkl",)),
    ("joblib.numpy_pickle", "load", ("x.pkl",)), ("pandas", "read_pickle", ("x.pkl",)), ("dill", "loads", (b"x",)),
    ("torch.utils.data.datapipes.utils.decoder", "basichandlers", ("pickle", b"x")), ("shelve", "open", ("db",)),
    ("lib2to3.pgen2.grammar", "Grammar", ()),
    # files written, moved or removed; the network
    ("io", "FileIO", ("x", "w")), ("_pyio", "FileIO", ("x", "w")), ("logging", "FileHandler", ("x.log", "w")),
    ("logging.handlers", "RotatingFileHandler", ("x.log",)), ("zipfile", "ZipFile", ("x.zip", "w")),
    ("tarfile", "open", ("x.tar", "w")), ("gzip", "GzipFile", ("x.gz", "wb")), ("lzma", "LZMAFile", ("x.xz", "wb")),
    ("bz2", "BZ2File", ("x.bz2", "wb")), ("dbm.dumb", "open", ("db", "c")), ("sqlite3", "connect", ("db.sqlite",)),
    ("mailbox", "mbox", ("mb", None, True)), ("wave", "open", ("x.wav", "wb")), ("shutil", "rmtree", ("x",)),
    ("http.cookiejar", "MozillaCookieJar", ("c.txt",)), ("zipapp", "create_archive", ("src", "out.pyz")),
    ("py_compile", "compile", ("x.py",)), ("compileall", "compile_dir", ("lib",)),
    ("xmlrpc.client", "ServerProxy", ("http://x",)), ("smtplib", "SMTP", ("x",)), ("ftplib", "FTP", ("x",)),
    ("socket", "create_connection", (("x", 80),)), ("urllib.request", "urlopen", ("http://x",)),
    ("requests", "get", ("http://x",)), ("logging.config", "listen", (9999,)),
    ("torch.distributed.rpc", "rpc_sync", ("w", None)),
]


@pytest.mark.parametrize("module,name,args", thinned(PUBLISHED_GADGETS, 6))
def test_published_gadget_callables_are_high(module, name, args):
    result = scan(_call(module, name, *args))
    assert high_or_worse(result), (module, name, describe(result))


# -- 2. ecosystem classes whose constructors act on the world ----------------------------------

def _acting_classes() -> list[tuple[str, str]]:
    """Every class of the ecosystem the generated table marks as acting when constructed (but
    those the allowlist names with a reason: dateutil's tzfile(None, name) opens nothing)."""
    table = names.default_table()
    ecosystem = set(ECOSYSTEM_PACKAGES)
    out = []
    for module in table._index():
        if module.split(".")[0] not in ecosystem:
            continue
        for name, what in (table.entries(module) or {}).items():
            if what == names.ACTING and f"{module}:{name}" not in SAFE_REASONS \
                    and not settings().pickle_policy.is_exactly_allowed(module, name):
                out.append((module, name))
    return sorted(out)


ACTING = _acting_classes()


def test_the_table_knows_the_published_acting_constructors():
    """torch's file writers and native-library loaders, joblib's file writers: each constructor
    opens, creates or loads what its arguments name."""
    expected = {("torch.serialization", "_open_file"), ("torch.serialization", "_open_zipfile_writer_file"),
                ("torch.cuda.memory", "CUDAPluggableAllocator"), ("torch.cuda.gds", "GdsFile"),
                ("joblib.logger", "PrintTime"), ("joblib.compressor", "BinaryZlibFile"), ("scipy.odr._odrpack", "ODR")}
    assert expected <= set(ACTING), expected - set(ACTING)
    assert len(ACTING) >= 30


@pytest.mark.parametrize("module,name", thinned(ACTING, 8))
def test_ecosystem_constructors_that_act_are_high(module, name):
    """Arguments that read as plain data (a relative file name, a mode) do not make it safe."""
    result = scan(_call(module, name, "weights.bin", "wb"))
    assert high_or_worse(result), describe(result)
    assert "pickle/acting-constructor" in result.rules() or "pickle/unsafe-global" in result.rules()


@pytest.mark.parametrize("how", ["alias", "partial", "rebuild_from_type", "reconstructor_base"])
def test_acting_constructors_reached_indirectly(how):
    if how == "alias":  # torch.cuda re-exports the allocator
        data = _call("torch.cuda", "CUDAPluggableAllocator", "libx.so", "alloc", "free")
    elif how == "partial":
        partial = call_op(global_op("functools", "partial"), global_op("torch.serialization", "_open_file")
                          + _args("weights.bin", "wb"))
        data = b"\x80\x02" + call_op(partial) + b"."
    elif how == "rebuild_from_type":
        data = b"\x80\x02" + call_op(global_op("torch._tensor", "_rebuild_from_type_v2"),
                                     global_op("joblib.logger", "PrintTime") + _args(None, ("log.txt",), {})) + b"."
    else:  # copyreg._reconstructor(cls, base, state) runs base.__init__(obj, state)
        data = b"\x80\x02" + call_op(global_op("copyreg", "_reconstructor"), global_op("argparse", "Namespace")
                                     + global_op("torch.serialization", "_open_zipfile_writer_file") + _args("w.pt")) + b"."
    result = scan(data)
    assert high_or_worse(result), describe(result)


def test_constructors_that_only_store_values_stay_trusted():
    """The rule is about what a constructor does, not about the package: torch's modules,
    optimizers and numpy's generators still rebuild clean from their arguments."""
    for module, name, args in [("torch.nn.modules.linear", "Identity", ()), ("torch", "device", ("cpu",)),
                               ("torch", "Size", ((2, 3),)), ("numpy.random._pickle", "__bit_generator_ctor", ("PCG64",)),
                               ("typing", "ForwardRef", ("int",)), ("dateutil.tz.tz", "tzfile", (None, "UTC"))]:
        result = scan(_call(module, name, *args))
        assert not high_or_worse(result), (module, name, describe(result))


def test_generator_reads_what_a_constructor_does():
    """The generator's reading of constructor code, on real classes (imported here, never by
    the scanner): one level of self.method() calls is followed."""
    import importlib.util
    import pathlib

    import joblib.logger
    import torch

    path = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "gen_pickle_names.py"
    spec = importlib.util.spec_from_file_location("gen_pickle_names", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.acting_constructor(torch.serialization._open_file) == "open"
    assert gen.acting_constructor(torch.cuda.memory.CUDAPluggableAllocator) == "ctypes.CDLL"
    assert gen.acting_constructor(joblib.logger.PrintTime)
    for plain in (torch.nn.Linear, torch.optim.AdamW, torch.device, dict, joblib.logger.Logger):
        assert gen.acting_constructor(plain) == "", plain


# -- 3. dill's type-by-name helper ---------------------------------------------------------------

def _load_type(name: str) -> bytes:
    return call_op(global_op("dill._dill", "_load_type"), unicode_op(name))


DANGEROUS_TYPES = ["FunctionType", "LambdaType", "CodeType", "FileType", "MethodType", "ModuleType", "AttrGetterType",
                   "PyTextWrapperType", "TextWrapperType", "BufferedWriterType", "CellType", "SuperType", "type"]
PLAIN_TYPES = ["int", "dict", "NoneType", "ValueError", "bytes", "PartialType"]


@pytest.mark.parametrize("name", DANGEROUS_TYPES)
def test_dill_type_by_name_called_is_high(name):
    result = scan(b"\x80\x02" + call_op(_load_type(name), _args("x", {})) + b".")
    assert high_or_worse(result), describe(result)


@pytest.mark.parametrize("name", ["FunctionType", "CodeType"])
def test_dill_type_by_name_handed_to_a_caller_is_high(name):
    partial = call_op(global_op("functools", "partial"), _load_type(name) + _args("x"))
    result = scan(b"\x80\x02" + call_op(partial) + b".")
    assert high_or_worse(result), describe(result)


@pytest.mark.parametrize("name", PLAIN_TYPES + ["FunctionType"])
def test_dill_type_by_name_referenced_or_plain_is_not_high(name):
    """dill writes type objects this way for plain data; only calling a code-making type runs anything."""
    called = name in PLAIN_TYPES
    body = call_op(_load_type(name), _args(1)) if called else _load_type(name)
    result = scan(b"\x80\x02" + body + b".")
    assert not high_or_worse(result), describe(result)


# -- 4. arguments spelled to slip past the argument rules ----------------------------------------

EVASIVE_CODE = [
    "\uff45\uff56\uff41\uff4c('1')",  # fullwidth: Python reads identifiers in NFKC form
    "__\uff49mport__('posix').system('id')",
    "sys.modules['posix'].system('echo x')",
    "__loader__.load_module('posix').system('echo x')",
    "open('/tmp/x', 'w')",
    "open('notes.txt', mode='ab')",
    "builtins.exec('x=1')",
    "breakpoint()",
]


@pytest.mark.parametrize("text", EVASIVE_CODE)
def test_code_spelled_to_evade_in_constructor_arguments(text):
    result = scan(b"\x80\x02" + call_op(global_op(*UNKNOWN_CLASS), unicode_op(text)) + b".")
    assert high_or_worse(result), describe(result)
    assert "pickle/suspicious-arguments" in result.rules()


@pytest.mark.parametrize("text", ["open the file", "the system modules", "w", "load module", "r", "models/bert"])
def test_plain_text_arguments_stay_below_high(text):
    result = scan(b"\x80\x02" + call_op(global_op(*UNKNOWN_CLASS), unicode_op(text)) + b".")
    assert result.worst == Severity.MEDIUM, describe(result)


def test_copyreg_base_initialiser_with_a_command_is_high():
    """copyreg._reconstructor(cls, base, state) calls base.__init__(obj, state): the state is
    the constructor's argument."""
    data = b"\x80\x02" + call_op(global_op("copyreg", "_reconstructor"), global_op("argparse", "Namespace")
                                 + global_op(*UNKNOWN_CLASS) + _args(CMD)) + b"."
    result = scan(data)
    assert high_or_worse(result), describe(result)
    assert "pickle/suspicious-arguments" in result.rules()


def test_copyreg_base_of_a_builtin_with_a_path_stays_clean():
    """A str subclass pickled by protocol 0-1: base is str, its state the text itself."""
    data = b"\x80\x02" + call_op(global_op("copyreg", "_reconstructor"), global_op("pathlib", "PurePosixPath")
                                 + global_op("builtins", "str") + _args("/data/models/bert")) + b"."
    result = scan(data)
    assert not high_or_worse(result), describe(result)


def test_stack_global_spelling_of_an_acting_constructor():
    data = b"\x80\x04" + call_op(stack_global_op("torch.serialization", "_open_file"), _args("w.bin", "wb")) + b"."
    assert high_or_worse(scan(data))


# -- 5. payload bytes hidden behind a bytes-to-bytes codec ---------------------------------------

def _hidden(payload: bytes, codec: str) -> bytes:
    """Opcodes making `codecs.decode(<payload encoded by codec>, codec)`."""
    import base64
    import bz2
    import zlib

    if codec in ("hex", "hex_codec"):
        operand = unicode_op(payload.hex())
    elif codec == "base64":
        operand = unicode_op(base64.b64encode(payload).decode())
    else:
        packed = zlib.compress(payload) if codec == "zlib" else bz2.compress(payload)
        operand = _args(packed)
    return call_op(global_op("_codecs", "decode"), operand + unicode_op(codec))


#: callables that unpickle the bytes they are handed: torch's storage loader, and a helper named
#: like the ecosystem's pickle support in a module the generated table does not cover (numba's
#: `_numba_unpickle(address, bytedata, hashed)` calls pickle.loads)
CARRIERS = {
    "torch._load_from_bytes": lambda inner: call_op(global_op("torch.storage", "_load_from_bytes"), inner),
    "helper of an uncovered module": lambda inner: call_op(global_op("numba.core.serialize", "_numba_unpickle"),
                                                           _args(0) + inner + _args(0)),
}


@pytest.mark.parametrize("codec", ["hex", "hex_codec", "base64", "zlib", "bz2"])
@pytest.mark.parametrize("carrier", sorted(CARRIERS))
def test_nested_payload_behind_a_transform_codec_is_scanned(carrier, codec):
    inner = pickle.dumps(Reduce(__import__("os").system, (CMD,)), protocol=2)
    result = scan(b"\x80\x02" + CARRIERS[carrier](_hidden(inner, codec)) + b".")
    assert result.worst == Severity.CRITICAL, describe(result)
    assert "posix.system" in result.names() or "os.system" in result.names(), describe(result)


def test_benign_bytes_behind_a_transform_codec_stay_clean():
    result = scan(b"\x80\x02" + _hidden(b"\x00\x01 not a pickle", "hex") + b".")
    assert result.worst is None, describe(result)


# -- 6. callables installed after construction, called by the load ------------------------------

def test_defaultdict_factory_set_through_build_is_called_by_a_lookup():
    """BUILD's slot state sets default_factory after construction; getitem of a missing key calls it."""
    dd = call_op(global_op("collections", "defaultdict"), b"N")
    state = b"(N}" + unicode_op("default_factory") + global_op(*UNKNOWN_CLASS[:1], "run_command") + b"st"
    data = b"\x80\x02" + call_op(global_op("operator", "getitem"), dd + state + b"b" + unicode_op("missing")) + b"."
    result = scan(data)
    assert high_or_worse(result), describe(result)


def test_defaultdict_with_a_plain_factory_looked_up_stays_clean():
    dd = call_op(global_op("collections", "defaultdict"), b"N")
    state = b"(N}" + unicode_op("default_factory") + global_op("builtins", "list") + b"st"
    data = b"\x80\x02" + call_op(global_op("operator", "getitem"), dd + state + b"b" + unicode_op("missing")) + b"."
    assert not high_or_worse(scan(data))


@pytest.mark.parametrize("change", ["handlers", "disabled"])
def test_changing_a_process_wide_logger_is_high(change):
    logger = call_op(global_op("logging", "getLogger"), unicode_op(""))
    handler = call_op(global_op("logging", "StreamHandler"))
    if change == "handlers":  # BUILD updates the root logger's __dict__: every record goes to it
        body = logger + b"}" + unicode_op("handlers") + b"]" + handler + b"a" + b"s" + b"b"
    else:  # slot state: setattr(root, "disabled", True) silences the process's logging
        body = logger + b"(N}" + unicode_op("disabled") + b"\x88" + b"st" + b"b"
    result = scan(b"\x80\x02" + body + b".")
    assert high_or_worse(result), describe(result)
    assert "pickle/mutation" in result.rules()


def test_loggers_as_they_pickle_stay_clean():
    import logging

    for protocol in (2, 4):
        result = scan(pickle.dumps({"log": logging.getLogger("a.b"), "root": logging.getLogger()}, protocol=protocol))
        assert result.worst is None, describe(result)


@pytest.mark.parametrize("attribute,opcode", [("extend", b"N" + b"a"), ("append", b"(N" + b"e")])
def test_planted_method_called_by_the_other_append_opcode(attribute, opcode):
    """The C unpickler's APPEND and APPENDS both call an object's `extend` when it has one and
    fall back on `append`; pickle.py's APPEND calls `append`: either planted method runs."""
    obj = call_op(global_op("argparse", "Namespace"))
    state = b"}" + unicode_op(attribute) + global_op(*UNKNOWN_CLASS[:1], "run_command") + b"s"
    result = scan(b"\x80\x02" + obj + state + b"b" + opcode + b".")
    assert high_or_worse(result), describe(result)


# -- 7. callables inside the containers a trusted constructor is handed --------------------------

def _sgd() -> bytes:
    """An optimizer as the load would rebuild one (NEWOBJ + BUILD): trusted."""
    return global_op("torch.optim.sgd", "SGD") + b")\x81}" + unicode_op("param_groups") + b"]sb"


@pytest.mark.parametrize("container", ["list", "tuple", "dict"])
@pytest.mark.parametrize("callable_", ["function", "partial"])
def test_callables_inside_arguments_of_a_trusted_constructor_are_called(container, callable_):
    """LambdaLR(optimizer, [f]) calls each f while it is constructed (its first step)."""
    func = global_op(*UNKNOWN_CLASS[:1], "run_command")
    if callable_ == "partial":
        func = call_op(global_op("functools", "partial"), func + unicode_op(CMD))
    items = {"list": b"]" + func + b"a", "tuple": b"(" + func + b"t", "dict": b"}" + unicode_op("k") + func + b"s"}
    data = b"\x80\x02" + call_op(global_op("torch.optim.lr_scheduler", "LambdaLR"), _sgd() + items[container]) + b"."
    result = scan(data)
    assert high_or_worse(result), describe(result)


def test_classes_inside_arguments_of_a_trusted_constructor_stay_trusted():
    data = b"\x80\x02" + call_op(global_op("torch.nn.modules.container", "Sequential"),
                                 b"]" + call_op(global_op("torch.nn.modules.activation", "ReLU")) + b"a") + b"."
    assert scan(data).worst is None


def _dist(planted: bytes, filler: int) -> bytes:
    """A scipy distribution rebuilt as the load would (NEWOBJ + BUILD), with `filler` plain
    attributes before the planted one."""
    items = b"".join(unicode_op(f"a{i}") + _args(i) for i in range(filler))
    return (global_op("scipy.stats._continuous_distns", "norm_gen") + b")\x81}(" + items
            + unicode_op("_updated_ctor_param") + planted + b"ub")


PLANTED = {
    "function": global_op(*UNKNOWN_CLASS[:1], "run_command"),
    "partial of an acting constructor": call_op(global_op("functools", "partial"),
                                                global_op("torch.serialization", "_open_file") + _args("w.bin", "wb")),
}


@pytest.mark.parametrize("filler", [0, 40])
@pytest.mark.parametrize("planted", sorted(PLANTED))
def test_method_planted_in_an_argument_object_and_called_by_a_trusted_constructor(planted, filler):
    """scipy's rv_frozen(dist) calls dist._updated_ctor_param(): an instance attribute wins over
    the class's method, wherever the state puts it."""
    data = b"\x80\x02" + call_op(global_op("scipy.stats._distn_infrastructure", "rv_continuous_frozen"),
                                 _dist(PLANTED[planted], filler)) + b"."
    result = scan(data)
    assert high_or_worse(result), describe(result)


def test_objects_with_submodules_handed_to_a_trusted_constructor_stay_clean():
    """Objects in a state (submodules, configs) are not callables the constructor would run."""
    inner = global_op("torch.nn.modules.linear", "Identity") + b")\x81}" + unicode_op("training") + b"\x88sb"
    outer = (global_op("torch.nn.modules.container", "Sequential") + b")\x81}" + unicode_op("_modules")
             + b"}" + unicode_op("0") + inner + b"s" + b"sb")
    data = b"\x80\x02" + call_op(global_op("torch.nn.modules.container", "ModuleList"), b"]" + outer + b"a") + b"."
    assert scan(data).worst is None
