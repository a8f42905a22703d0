"""Habit 1: a name is trusted only when the object it resolves to is trusted.

Families, each generated over many names rather than one sample per name:
- aliases of denied modules reached through another module (`numpy.core._internal.sys`),
  from every module-valued attribute in names.txt;
- re-exports of denied objects (`sklearn.datasets._base.NamedTemporaryFile`), from every
  object alias in names.txt;
- introspection chains through dunder attributes of trusted names (`numpy.__builtins__`,
  `torch._utils._rebuild_tensor_v2.__globals__`);
- dotted chains through modules the table does not cover (called: HIGH);
- functions of allowlisted whole modules (a `module:*` entry trusts classes, not calls);
- and the benign side: enums/namedtuples/struct sequences of denied modules and torch's
  dtypes, layouts, memory formats and qschemes pickled for real stay clean.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest

from modelscan_core.model import Severity
from modelscan_core.scanners.pickle.lists import SAFE_REASONS
from modelscan_core.scanners.pickle.names import CONSTANT, DATA_TYPE, NameTable
from modelscan_core.scanners.pickle.values import CALLED, NEW, REFERENCED

from .pickle_ops import call_op, global_op, proto, stack_global_op, unicode_op
from .policy_util import UNKNOWN_FUNC, high_or_worse, scan, settings, thinned

ROOT = Path(__file__).resolve().parents[2]
POLICY = settings().pickle_policy
TABLE = POLICY.table

#: an attribute of each denied module that does something when called
DANGER = {"os": "system", "posix": "system", "subprocess": "Popen", "sys": "modules", "pickle": "loads",
          "builtins": "eval", "shutil": "rmtree", "socket": "socket", "importlib": "import_module", "runpy": "run_path",
          "marshal": "loads", "ctypes": "CDLL", "tempfile": "mkstemp", "inspect": "getattr_static",
          "types": "FunctionType", "_pickle": "loads", "multiprocessing": "Process", "threading": "Thread",
          "code": "interact", "pdb": "run", "io": "open", "codecs": "open", "zipfile": "ZipFile", "tarfile": "open",
          "urllib.request": "urlopen", "http.client": "HTTPConnection", "gc": "get_objects", "pty": "spawn",
          "glob": "glob", "webbrowser": "open", "asyncio": "create_subprocess_shell", "dill": "loads",
          "cloudpickle": "loads", "torch.serialization": "load", "timeit": "timeit", "pydoc": "pipepager"}


@functools.cache
def _aliases():
    """(aliases of denied modules, re-exports of denied objects) in the table; built on first
    use, not at collection (it judges every entry: seconds)."""
    modules, objects = [], []
    for module in sorted(TABLE._index()):
        for name, what in sorted(TABLE.entries(module).items()):
            if what.startswith("@") and what[1:] in DANGER:
                modules.append((module, f"{name}.{DANGER[what[1:]]}", what[1:]))
            elif what[:1] not in ("@", "!"):
                target_module, _, target_name = what.partition(":")
                verdict = POLICY.judge(target_module, target_name, CALLED)
                if verdict.rule_id == "pickle/unsafe-global":
                    objects.append((module, name, target_module, target_name, verdict.severity))
    return modules, objects


def test_the_table_has_the_aliases_that_matter():
    # a generated table that lost its aliases would make every test below vacuous
    MODULE_ALIASES, OBJECT_ALIASES = _aliases()
    assert len(MODULE_ALIASES) > 1000 and len(OBJECT_ALIASES) > 5000
    assert ("sklearn.datasets._base", "NamedTemporaryFile", "tempfile", "NamedTemporaryFile", Severity.CRITICAL) in OBJECT_ALIASES


@pytest.mark.parametrize("share", thinned(range(4), every=4))
def test_every_alias_of_a_denied_module_is_judged_as_that_module(share):
    missed = [(m, n) for m, n, _ in _aliases()[0][share::4]
              if (POLICY.judge(m, n, CALLED).severity or Severity.LOW) < Severity.HIGH]
    assert not missed, missed[:20]


@pytest.mark.parametrize("share", thinned(range(4), every=4))
def test_every_re_export_of_a_denied_object_is_judged_as_that_object(share):
    missed = [(m, n, tm, tn) for m, n, tm, tn, severity in _aliases()[1][share::4]
              if (POLICY.judge(m, n, CALLED).severity or Severity.LOW) < severity]
    assert not missed, missed[:20]


@functools.cache
def _sample(kind: int) -> list:
    return random.Random(8 + kind).sample(_aliases()[kind], 25)


@pytest.mark.parametrize("index", range(25))
def test_module_alias_chains_in_real_pickles(index):
    module, name, target = _sample(0)[index]
    for data in (proto(stack_global_op(module, name) + unicode_op("x") + b"\x85R"),
                 proto(global_op(module, name) + unicode_op("x") + b"\x85R", 4)):
        result = scan(data)
        assert high_or_worse(result), (module, name, target, result.report.findings())


@pytest.mark.parametrize("index", range(25))
def test_re_exports_in_real_pickles(index):
    module, name, _, _, severity = _sample(1)[index]
    result = scan(proto(global_op(module, name) + unicode_op("x") + b"\x85R", 2))
    assert result.worst is not None and result.worst >= severity, result.report.findings()


# -- introspection: dunder attributes walk to whatever the attacker wants ----------------------

_HEADS = [("numpy", ""), ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
          ("builtins", "object"), ("functools", "partial"), ("sklearn.base", "BaseEstimator"), ("torch", ""),
          ("zoneinfo", "ZoneInfo"), (UNKNOWN_FUNC[0], UNKNOWN_FUNC[1]), ("scipy.sparse", "csr_matrix")]
_WALKS = ["__builtins__", "__globals__", "__dict__", "__class__.__subclasses__", "__init__.__globals__", "__loader__",
          "__spec__.loader", "__getattribute__", "__reduce_ex__", "__class__.__base__.__subclasses__"]


@pytest.mark.parametrize("head,walk", thinned([(h, w) for h in _HEADS for w in _WALKS], every=4))
def test_introspection_chains_are_critical(head, walk):
    module, name = head
    dotted = f"{name}.{walk}" if name else walk
    result = scan(proto(stack_global_op(module, dotted) + unicode_op("k") + b"\x85R"))
    assert result.worst == Severity.CRITICAL, result.report.findings()
    # only imported, never called: still an introspection walk
    assert POLICY.judge(module, dotted, REFERENCED).severity == Severity.CRITICAL


def test_builtins_dict_get_on_a_module_builtins_is_critical():
    # modelscan issue 89: builtins.dict.get(numpy.__builtins__, "exec")(code)
    data = proto(global_op("builtins", "dict.get") + global_op("numpy", "__builtins__") + unicode_op("exec")
                 + b"\x86R" + unicode_op("print(1)") + b"\x85R")
    result = scan(data)
    assert result.worst == Severity.CRITICAL
    assert "pickle/introspection" in result.rules()


# -- chains the table cannot resolve -------------------------------------------------------------

@pytest.mark.parametrize("module,chain", thinned(
    [(m, c) for m in ["someones_tools", "my_project.utils", "acme.ml.io", "vendor._compat", "x"]
     for c in ["_os.system", "helpers.run", "sub.mod.exec_", "Runner.run", "a.b.c.d"]], every=3))
def test_an_unresolvable_chain_that_is_called_is_high(module, chain):
    result = scan(proto(stack_global_op(module, chain) + unicode_op("echo hi") + b"\x85R"))
    assert high_or_worse(result), result.report.findings()


def test_a_submodule_reached_as_an_attribute_is_that_submodule():
    for module, name in [("torch", "serialization.load"), ("numpy", "lib.format.read_array"),
                         ("torch", "jit._serialization.load"), ("os", "path.exists")]:
        assert POLICY.judge(module, name, CALLED).severity == Severity.CRITICAL, (module, name)


def test_os_path_is_posixpath_as_find_class_sees_it():
    r = TABLE.resolve("os.path", "join")
    assert (r.module, r.name) == ("posixpath", "join")


# -- allowlisted whole modules trust classes, not calls of their functions --------------------

def _functions_of_allowlisted_modules():
    out = []
    for entry in sorted(SAFE_REASONS):
        module, _, name = entry.partition(":")
        if name != "*" or not TABLE.covers(module):
            continue
        try:
            mod = importlib.import_module(module)
        except Exception:  # noqa: BLE001 - optional dependencies
            continue
        for attr, obj in sorted(vars(mod).items()):
            if (inspect.isfunction(obj) or inspect.isbuiltin(obj)) and getattr(obj, "__module__", None) == module \
                    and not attr.startswith("_"):
                out.append((module, attr))
    return out


@pytest.mark.parametrize("module,name", [("torch.nn.modules.module", "register_module_forward_hook"),
                                         ("torch.nn.modules.module", "register_module_full_backward_hook"),
                                         ("torch.optim.optimizer", "register_optimizer_step_pre_hook"),
                                         ("torch.nn.functional", "handle_torch_function"),
                                         ("torch.nn.init", "kaiming_uniform_"), ("scipy.sparse", "load_npz"),
                                         ("numpy.random._pickle", "__getattr__"), ("typing", "get_type_hints")])
def test_a_function_of_an_allowlisted_module_is_not_trusted_when_called(module, name):
    result = scan(proto(global_op(module, name) + global_op(*UNKNOWN_FUNC) + b"\x85R", 2))
    assert high_or_worse(result), result.report.findings()


@pytest.mark.slow
def test_functions_of_allowlisted_modules_are_not_trusted_when_called():
    functions = _functions_of_allowlisted_modules()
    assert len(functions) > 100, len(functions)
    trusted = [(m, n) for m, n in functions if POLICY.judge(m, n, CALLED).severity is None]
    assert not trusted, trusted[:20]
    # a reference (an activation function stored in a model) is still fine
    assert POLICY.judge("torch.nn.functional", "relu", REFERENCED).severity is None


def test_classes_of_allowlisted_modules_are_trusted_even_with_lower_case_names():
    import scipy.sparse
    import torch

    for module, name in [("torch.return_types", "max"), ("scipy.sparse._csr", "csr_matrix"),
                         ("torch.nn.modules.linear", "Linear"), ("ml_dtypes", "bfloat16")]:
        assert POLICY.judge(module, name, CALLED | NEW).severity is None, (module, name)
    assert scipy.sparse and torch


def test_every_allowlist_entry_has_a_reason_and_reaches_no_denied_object():
    assert all(reason.strip() for reason in SAFE_REASONS.values())
    for entry in SAFE_REASONS:
        module, _, name = entry.partition(":")
        if name == "*":
            continue
        r = TABLE.resolve(module, name)
        verdict = POLICY.judge(r.module, r.name, CALLED) if not r.is_module else None
        assert verdict is None or verdict.rule_id != "pickle/unsafe-global", (entry, r)


@pytest.mark.parametrize("module,name", [("collections", "namedtuple"), ("builtins", "dict.update"),
                                         ("typing", "get_type_hints"), ("dataclasses", "make_dataclass"),
                                         ("enum", "_make_class_unpicklable"), ("string", "Formatter.vformat")])
def test_audited_names_that_run_attacker_input_are_not_trusted(module, name):
    result = scan(proto(global_op(module, name) + unicode_op("x") + unicode_op("a") + b"\x86R", 2))
    assert high_or_worse(result), result.report.findings()


# -- the benign side: data types of denied modules, torch's constants --------------------------

def _data_types_of_denied_modules():
    out = []
    for module in sorted(TABLE._index()):
        if POLICY._denied_module(module)[0] is None:
            continue
        for name, what in sorted(TABLE.entries(module).items()):
            if what == DATA_TYPE:
                out.append((module, name))
    return out


def test_enums_and_namedtuples_of_denied_modules_are_data():
    found = _data_types_of_denied_modules()
    assert len(found) > 50
    flagged = [(m, n) for m, n in found if POLICY.judge(m, n, CALLED | NEW).severity is not None]
    assert not flagged, flagged[:20]


def _real_values():
    import http
    import os
    import signal
    import socket
    import ssl
    import time

    return {"http.HTTPStatus.OK": http.HTTPStatus.OK, "http.HTTPMethod.GET": http.HTTPMethod.GET,
            "signal.SIGTERM": signal.SIGTERM, "socket.AF_INET": socket.AF_INET, "socket.SOCK_STREAM": socket.SOCK_STREAM,
            "ssl.TLSVersion": ssl.TLSVersion.TLSv1_2, "ssl.VerifyMode": ssl.CERT_REQUIRED,
            "os.stat_result": os.stat(__file__), "time.struct_time": time.gmtime(0),
            "os.terminal_size": os.terminal_size((80, 24))}


@pytest.mark.parametrize("label,protocol", thinned([(v, p) for v in sorted(_real_values()) for p in (0, 2, 4, 5)], 3))
def test_real_enums_and_records_of_denied_modules_are_clean(label, protocol):
    result = scan(pickle.dumps({"value": _real_values()[label]}, protocol=protocol))
    assert result.verdict == "clean", result.report.findings()


def _torch_constants():
    import torch

    kinds = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)
    return {name: obj for name, obj in vars(torch).items() if isinstance(obj, kinds)}


def test_torch_constants_come_from_the_installed_torch():
    """Every dtype, layout, memory format and qscheme of the installed torch is in names.txt
    (run scripts/gen_pickle_names.py after upgrading torch)."""
    constants = _torch_constants()
    assert "float8_e8m0fnu" in constants and "channels_last" in constants
    missing = sorted(name for name in constants if TABLE.kind("torch", name) != CONSTANT)
    assert not missing, f"torch constants missing from names.txt (run scripts/gen_pickle_names.py): {missing}"


def test_every_torch_constant_pickled_for_real_is_clean():
    for protocol in (2, 4):
        picklable = []
        for value in _torch_constants().values():
            try:
                pickle.dumps(value, protocol=protocol)
            except (TypeError, pickle.PicklingError):
                continue  # torch cannot pickle it this way either: no file holds it
            picklable.append(value)
        assert len(picklable) > 50
        result = scan(pickle.dumps(picklable, protocol=protocol))
        assert result.verdict == "clean", result.report.findings()


@pytest.mark.slow
def test_names_table_covers_what_is_installed():
    """names.txt has every alias of the installed standard library and ecosystem packages."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_pickle_names.py"), "--check"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_table_loads_lazily_and_resolves_one_module_at_a_time(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("# test\npkg\t_os=@os\tRunner=elsewhere:Runner\nos\tsystem=posix:system\nelsewhere\n")
    table = NameTable(path)
    assert table._lines is None
    r = table.resolve("pkg", "_os.system")
    assert (r.module, r.name, r.hops[0]) == ("posix", "system", "pkg._os is the module os")
    assert "pkg" in table._parsed and "elsewhere" not in table._parsed
    assert table.resolve("pkg", "Runner.run").qualname == "elsewhere.Runner.run"
    assert not table.resolve("uncovered", "a.b").covered


@pytest.mark.parametrize("module,name,trusted", [
    ("spacy.vocab", "unpickle_vocab", True), ("spacy.tokens.doc", "unpickle_doc", True),
    ("torch._utils", "_rebuild_tensor_v5", True), ("numpy.random._pickle", "__bit_generator_ctor", True),
    ("pandas._libs.tslibs.nattype", "__nat_unpickle", True), ("someones_tools", "unpickle_payload", False),
    ("joblib.numpy_pickle", "_unpickle", False), ("torch.nn.modules.module", "reconstruct_from_config", False)])
def test_pickle_support_helpers_of_the_ecosystem_are_trusted_by_their_names(module, name, trusted):
    assert (POLICY.judge(module, name, CALLED).severity is None) is trusted
