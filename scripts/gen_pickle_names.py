"""Generate modelscan_core/scanners/pickle/names.txt: what each module-level name really is.

`find_class(module, "a.b.c")` imports `module` and walks attributes. A module's namespace
holds everything it imports, so `sklearn.datasets._base.NamedTemporaryFile` *is*
`tempfile.NamedTemporaryFile` and `numpy.core._internal.sys` *is* the `sys` module. The
scanner never imports anything, so it cannot see this at scan time; this script, run by a
developer in a throwaway process, imports the standard library and the ML ecosystem's
packages once and writes, for every module it could import, one line:

    <module>\t<name>=<what>\t<name>=<what>...

where <what> is
    @<module>           the name is a module (other than the submodule of that name)
    <module>:<qualname> a callable or class defined elsewhere (its own __module__/__qualname__)
    !c                  a class defined here whose name does not read as a class (csr_matrix)
    !f                  a callable defined here that is not a class but reads as one (DeleteRecursively)
    !e                  a data type defined here: an Enum without a custom _missing_, a namedtuple
                        or a C struct sequence (constructing one stores values and runs nothing)
    !k                  a data constant of torch: a dtype, layout, memory format or qscheme
    !x                  a class defined here whose construction acts on the world: its __new__,
                        __init__ or __post_init__ (or a method of its own they call) opens a file by
                        name, deletes or moves one, starts a process, loads a native library, runs
                        code from text, imports a module by name or unpickles (acting_constructor)

A name a module line does not mention is the module's own object (or does not exist); a
module with no line is not covered, and a dotted chain through it cannot be resolved.

    python3 scripts/gen_pickle_names.py            # merge what is installed into names.txt
    python3 scripts/gen_pickle_names.py --replace  # write only what is installed
    python3 scripts/gen_pickle_names.py --check    # exit 1 if names.txt misses or contradicts it

Merging keeps entries of other versions (another Python, an older torch): a name that moved
keeps every meaning it had, which only makes the policy stricter.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import enum
import importlib
import inspect
import io
import os
import pkgutil
import sys
import textwrap
import types
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "modelscan_core" / "scanners" / "pickle" / "names.txt"

#: third-party packages whose modules real pickles name (the policy's ecosystem, plus the
#: serialisers and hubs around it); TensorFlow is left out: it is denied as a whole
PACKAGES = (
    "torch", "torchvision", "torchaudio", "torchtext", "numpy", "scipy", "sklearn", "pandas", "xgboost", "lightgbm",
    "catboost", "ml_dtypes", "pytz", "dateutil", "transformers", "tokenizers", "accelerate", "peft", "trl", "diffusers",
    "sentence_transformers", "timm", "datasets", "safetensors", "keras", "tf_keras", "jax", "jaxlib", "flax", "optax",
    "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "einops", "spacy", "thinc", "gensim",
    "statsmodels", "imblearn", "category_encoders", "optuna", "omegaconf", "hydra", "ultralytics", "mmcv", "mmengine",
    "detectron2", "fairseq", "sentencepiece", "open_clip", "onnx", "skops", "prophet", "sktime", "fastai", "fastcore",
    "nltk", "networkx", "PIL", "shap", "umap", "hdbscan", "pynndescent", "numba", "llvmlite", "joblib", "dill",
    "cloudpickle", "huggingface_hub", "yaml", "typing_extensions",
)
#: standard-library modules not imported: they act on import (a browser, a banner, a GUI), or
#: what they are depends on what was imported first (setuptools replaces distutils); all of
#: them are denied as a whole, so no alias through them matters
SKIP_STDLIB = {"antigravity", "this", "__main__", "idlelib", "tkinter", "turtle", "turtledemo", "test", "_tkinter",
               "lib2to3", "pydoc_data", "ensurepip", "venv", "distutils"}
#: submodules never walked: test suites, and numpy.distutils, which (like the standard library's
#: distutils) is whatever the installed setuptools makes it and is denied as a whole
SKIP_PARTS = {"tests", "test", "testing", "_testing", "conftest", "benchmarks", "__main__", "distutils"}


def _quiet_import(name: str):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return importlib.import_module(name)


def walk(package: str):
    """The package and every submodule that imports (optional dependencies may be missing)."""
    try:
        root = _quiet_import(package)
    except BaseException:  # noqa: BLE001 - anything may happen importing third-party code
        return
    yield root
    path = getattr(root, "__path__", None) or []
    for info in pkgutil.walk_packages(path, prefix=f"{package}.", onerror=lambda name: None):
        if SKIP_PARTS & set(info.name.split(".")):
            continue
        try:
            yield _quiet_import(info.name)
        except BaseException:  # noqa: BLE001
            continue


def class_like(name: str) -> bool:
    core = name.split(".")[-1].lstrip("_")
    return bool(core) and core[0].isupper()


def identity(obj) -> tuple[str, str] | None:
    """(module, qualname) an object reports, the way pickle would name it; None if it has none."""
    try:
        module = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    except Exception:  # noqa: BLE001 - lazy objects raise from __getattr__
        return None
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    return module, qualname


def is_data_type(obj) -> bool:
    """A class whose construction stores values and runs nothing of its own."""
    if not isinstance(obj, type):
        return False
    try:
        if issubclass(obj, enum.Enum):
            missing = getattr(obj, "_missing_", None)
            owner = getattr(missing, "__qualname__", "").split(".")[0]
            return getattr(missing, "__module__", "enum") == "enum" and owner in ("Enum", "Flag", "IntFlag", "ReprEnum")
        if issubclass(obj, tuple) and hasattr(obj, "n_fields") and hasattr(obj, "n_sequence_fields"):
            return True  # a C struct sequence: os.stat_result, time.struct_time
        if issubclass(obj, tuple) and hasattr(obj, "_fields") and hasattr(obj, "_make"):
            # a namedtuple class itself, not a subclass that adds its own construction or state
            new = getattr(obj.__new__, "__qualname__", "")
            own = set(vars(obj))
            return new.startswith("namedtuple_") and not own & {"__init__", "__setstate__", "__getattr__", "__del__"}
    except Exception:  # noqa: BLE001
        return False
    return False


#: calls that act on the world, by the name they are called through: a builtin or an imported
#: name (`open(...)`, `CDLL(...)`), or a module's function (`os.remove`, `subprocess.run`; None
#: for every function of that module)
_ACTING_NAMES = frozenset({"open", "exec", "eval", "compile", "__import__", "execfile", "Popen", "CDLL", "PyDLL",
                           "LoadLibrary", "dlopen", "import_module", "urlopen", "FileIO", "check_output", "check_call",
                           "system", "popen", "run_path", "run_module"})
_ACTING_MODULES: dict[str, frozenset | None] = {
    "os": frozenset({"open", "system", "popen", "remove", "unlink", "rename", "replace", "makedirs", "mkdir", "rmdir",
                     "removedirs", "symlink", "link", "chmod", "chown", "truncate", "fork", "kill", "startfile",
                     "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "spawnv", "spawnve",
                     "spawnl", "spawnvp", "posix_spawn", "posix_spawnp", "putenv"}),
    "io": frozenset({"open", "FileIO", "open_code"}), "codecs": frozenset({"open"}),
    "shutil": frozenset({"copy", "copy2", "copyfile", "copytree", "move", "rmtree", "chown", "make_archive",
                         "unpack_archive", "copymode", "copystat"}),
    "tempfile": frozenset({"mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile", "TemporaryDirectory",
                           "SpooledTemporaryFile"}),
    "gzip": frozenset({"open", "GzipFile"}), "bz2": frozenset({"open", "BZ2File"}),
    "lzma": frozenset({"open", "LZMAFile"}), "zipfile": frozenset({"ZipFile"}), "tarfile": frozenset({"open", "TarFile"}),
    "sqlite3": frozenset({"connect"}), "mmap": frozenset({"mmap"}),
    "pickle": frozenset({"load", "loads", "Unpickler"}), "marshal": frozenset({"load", "loads"}),
    "dill": frozenset({"load", "loads"}), "cloudpickle": frozenset({"load", "loads"}), "joblib": frozenset({"load"}),
    "torch": frozenset({"load"}), "np": frozenset({"load", "memmap", "fromfile"}),
    "numpy": frozenset({"load", "memmap", "fromfile"}),
    "subprocess": None, "ctypes": None, "socket": None, "importlib": None, "runpy": None, "shelve": None, "dbm": None,
    "webbrowser": None,
}


def _dotted(node) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def acting_call(tree: ast.AST) -> str:
    """The first call in a function's syntax tree that acts on the world, as written; "" for none."""
    for node in ast.walk(tree):
        chain = _dotted(node.func) if isinstance(node, ast.Call) else None
        if not chain:
            continue
        if len(chain) == 1 and chain[0] in _ACTING_NAMES:
            return chain[0]
        if len(chain) >= 2 and chain[0] in _ACTING_MODULES:
            names = _ACTING_MODULES[chain[0]]
            if names is None or chain[-1] in names:
                return ".".join(chain)
    return ""


def _syntax(fn) -> ast.AST | None:
    fn = getattr(fn, "__func__", fn)
    if not isinstance(fn, types.FunctionType):
        return None
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None


def acting_constructor(cls: type) -> str:
    """What constructing `cls` does to the world: the acting call in its __new__, __init__ or
    __post_init__, or in a method of the class they call as `self.name(...)` / `cls.name(...)`
    (one level down); "" when construction only stores values."""
    seen: set[str] = set()
    queue = [attr for attr in ("__new__", "__init__", "__post_init__")
             if getattr(cls, attr, None) is not getattr(object, attr, None)]
    depth = {attr: 0 for attr in queue}
    while queue:
        attr = queue.pop(0)
        if attr in seen:
            continue
        seen.add(attr)
        try:
            tree = _syntax(inspect.getattr_static(cls, attr))
        except AttributeError:
            continue
        if tree is None:
            continue
        found = acting_call(tree)
        if found:
            return found
        if depth[attr] >= 1:
            continue
        for node in ast.walk(tree):
            chain = _dotted(node.func) if isinstance(node, ast.Call) else None
            if chain and len(chain) == 2 and chain[0] in ("self", "cls") and chain[1] not in depth:
                depth[chain[1]] = depth[attr] + 1
                queue.append(chain[1])
    return ""


def torch_constants(module) -> set[str]:
    """Names of torch's dtype/layout/memory_format/qscheme objects in `module`."""
    torch = sys.modules.get("torch")
    if torch is None:
        return set()
    kinds = tuple(k for k in (getattr(torch, "dtype", None), getattr(torch, "layout", None),
                              getattr(torch, "memory_format", None), getattr(torch, "qscheme", None)) if isinstance(k, type))
    return {name for name, obj in list(vars(module).items()) if isinstance(obj, kinds)}


def loop_targets(module) -> set[str]:
    """Names a module binds only as the target of a top-level `for` loop: whatever its last
    iteration left, which can change from one run to the next (scipy.sparse._data loops over a
    set of ufuncs). The table leaves them out: a pickle naming one is judged unresolved."""
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return set()
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return set()
    out: set[str] = set()
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.For, ast.AsyncFor)):
            out.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for attr in ("body", "orelse", "finalbody", "handlers"):
            pending.extend(getattr(node, attr, None) or ())
    return out


def describe(module) -> dict[str, str]:
    """name -> what, for one module (see the module docstring)."""
    out: dict[str, str] = {}
    own_name = module.__name__
    names = dict(vars(module))
    for name in loop_targets(module):
        names.pop(name, None)
    for name in getattr(module, "__all__", None) or ():
        if isinstance(name, str) and name not in names:
            try:  # a lazy attribute (module-level __getattr__)
                names[name] = getattr(module, name)
            except BaseException:  # noqa: BLE001
                continue
    constants = torch_constants(module) if own_name.split(".")[0] == "torch" else set()
    for name, obj in names.items():
        if not isinstance(name, str) or (name.startswith("__") and name.endswith("__")):
            continue  # a dunder attribute is judged as introspection, whatever it holds
        if name in constants:
            out[name] = "!k"
            continue
        if isinstance(obj, types.ModuleType):
            if obj.__name__ != f"{own_name}.{name}":
                out[name] = "@" + obj.__name__
            continue
        if not callable(obj):
            continue
        found = identity(obj)
        if found is None:
            continue
        if found != (own_name, name):
            out[name] = f"{found[0]}:{found[1]}"
        elif is_data_type(obj):
            out[name] = "!e"
        elif isinstance(obj, type) and acting_constructor(obj):
            out[name] = "!x"
        elif isinstance(obj, type) and not class_like(name):
            out[name] = "!c"
        elif not isinstance(obj, type) and class_like(name):
            out[name] = "!f"
        if isinstance(obj, type) and found == (own_name, name):
            out.update(_class_aliases(obj, name))
    return out


def _class_aliases(cls: type, name: str) -> dict[str, str]:
    """Attributes of a class that are callables defined elsewhere (`load = staticmethod(pickle.load)`)."""
    out = {}
    for attr, value in list(vars(cls).items()):
        if attr.startswith("__") or not isinstance(attr, str):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, types.ModuleType):
            out[f"{name}.{attr}"] = "@" + value.__name__
            continue
        if not callable(value):
            continue
        found = identity(value)
        if found is None or found[1] == f"{name}.{attr}" or found[1].startswith(f"{name}."):
            continue
        if found[1].split(".")[-1] == attr and found[0] == cls.__module__:
            continue  # inherited helper of the same module under its own name
        out[f"{name}.{attr}"] = f"{found[0]}:{found[1]}"
    return out


def installed(packages: tuple[str, ...] = PACKAGES) -> tuple[dict[str, dict[str, str]], list[str]]:
    """module -> {name: what} for the standard library and the installed packages."""
    warnings.simplefilter("ignore")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    table: dict[str, dict[str, str]] = {}
    versions = [f"Python {sys.version.split()[0]}"]
    stdlib = sorted(n for n in sys.stdlib_module_names if n not in SKIP_STDLIB)
    for top in [*stdlib, *packages]:
        for module in walk(top):
            name = getattr(module, "__name__", None)
            if isinstance(name, str) and name not in table:
                table[name] = describe(module)
        if top in packages and top in sys.modules:
            version = getattr(sys.modules[top], "__version__", None)
            if isinstance(version, str):
                versions.append(f"{top} {version}")
    return table, versions


def read(path: Path = TARGET) -> dict[str, dict[str, str]]:
    table: dict[str, dict[str, str]] = {}
    if not path.exists():
        return table
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        module, *entries = line.split("\t")
        table[module] = dict(entry.split("=", 1) for entry in entries if entry)
    return table


def write(table: dict[str, dict[str, str]], versions: list[str], path: Path = TARGET) -> None:
    lines = ["# generated by scripts/gen_pickle_names.py (see it for the format) from " + ", ".join(versions)]
    for module in sorted(table):
        entries = table[module]
        lines.append("\t".join([module, *(f"{k}={entries[k]}" for k in sorted(entries))]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def covered(what: str) -> bool:
    """Whether an entry points into the standard library or a package the table covers.

    An alias of a package outside that set (scipy's optional ``platformdirs``) is there or not
    depending on what else is installed; a table without it is still safe, since a chain the
    table cannot resolve is judged unresolved, so the check does not ask for it.
    """
    target = what.lstrip("@").split(":", 1)[0]
    if what.startswith("!") or not target:
        return True
    top = target.split(".", 1)[0]
    return top in sys.stdlib_module_names or top in PACKAGES


def differences(shipped: dict[str, dict[str, str]], found: dict[str, dict[str, str]]) -> list[str]:
    """What the installed packages have that the shipped table lacks or says otherwise."""
    out = []
    for module, entries in sorted(found.items()):
        have = shipped.get(module)
        if have is None:
            out.append(f"module {module} is not covered")
            continue
        for name, what in sorted(entries.items()):
            if have.get(name) is None and not covered(what):
                continue
            if have.get(name) != what:
                out.append(f"{module}.{name}: installed {what}, shipped {have.get(name)}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description="Generate the pickle policy's name table.")
    parser.add_argument("--check", action="store_true", help="exit 1 when names.txt misses what is installed")
    parser.add_argument("--replace", action="store_true", help="drop entries of other versions")
    args = parser.parse_args()
    found, versions = installed()
    if args.check:
        missing = differences(read(), found)
        for line in missing[:50]:
            print(line)
        print(f"{len(missing)} difference(s) between names.txt and {', '.join(versions)}", file=sys.stderr)
        return 1 if missing else 0
    table = {} if args.replace else read()
    for module, entries in found.items():
        table.setdefault(module, {}).update(entries)
    write(table, versions)
    print(f"wrote {len(table)} modules, {sum(map(len, table.values()))} names to {TARGET}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
