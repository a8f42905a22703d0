"""Judge the names a pickle imports: by the object each name reaches, and by how it is used.

A name is resolved the way `Unpickler.find_class` resolves it before it is judged: Python 2
names are mapped as `fix_imports` maps them, and a dotted name is an attribute walk that the
generated table (names.py) follows through modules and re-exports to the object it reaches
(`("pathlib", "os.system")` is `posix.system`, `sklearn.datasets._base.NamedTemporaryFile`
is `tempfile.NamedTemporaryFile`). Trust belongs to that object, never to the spelling.

Order of judgement for one object: an exact denylist entry; an exact allowlist entry; a data
type the generator vouched for (an enum, a namedtuple, a torch dtype); the most specific module
listing (a denied module covers its submodules); then the rules for names on neither list,
which follow how the pickle uses the name (called, instantiated, given state, referenced).
An allowlisted module ("module:*") or an ecosystem package trusts its classes and its
pickle-support helpers, and references to any of its names, never a call of its functions.
"""

from __future__ import annotations

import _compat_pickle
import re
from dataclasses import dataclass
from functools import cached_property

from modelscan_core.model import Severity
from modelscan_core.scanners.pickle import names as names_mod
from modelscan_core.scanners.pickle.names import (
    ACTING,
    CLASS,
    CONSTANT,
    DATA_TYPE,
    FUNCTION,
    INTROSPECTION,
    NameTable,
    Resolved,
)
from modelscan_core.scanners.pickle.values import BUILT, CALLED, NEW

ALL = "*"

#: pickle-support helpers are private: `_rebuild_tensor_v2`, `_unpickle_block`, `__randomstate_ctor`,
#: or say what they are: spaCy's `unpickle_vocab` (a public `reconstruct_from_config` is an API
#: that rebuilds whole models, not a helper)
_HELPER_NAME = re.compile(r"_+(rebuild|unpickle|reconstruct|new_|restore|from_state)|unpickle_|_.*(_ctor|_unpickle|(?<!ufunc)_reconstruct)$")
#: Cython's generated pickle support: it only allocates the class and hands it its state
_CYTHON_UNPICKLE = re.compile(r"__pyx_unpickle_\w+$")


@dataclass(frozen=True)
class Judgement:
    """What the policy concluded about one name; `severity` None means trusted."""

    severity: Severity | None
    rule_id: str
    reason: str
    matched: str = ""  # the list entry (module.name or module.*) that decided it
    resolved: str = ""  # the object the name reaches, when it is not the name as written


@dataclass(frozen=True)
class UnknownSeverities:
    """Severities for names on neither list, by their strongest use, and for what the load
    does beyond importing names (settings key `unknown_globals`)."""

    call: Severity = Severity.HIGH
    class_call: Severity = Severity.MEDIUM
    new: Severity = Severity.LOW
    reference: Severity = Severity.LOW
    unresolved: Severity = Severity.HIGH
    dynamic_call: Severity = Severity.HIGH
    call_before_error: Severity = Severity.MEDIUM
    #: a class constructed with arguments that read as code, a shell command, a path or a URL
    suspicious_args: Severity = Severity.HIGH
    #: BUILD/SETITEM/APPEND on an imported class, function, module or registry
    mutation: Severity = Severity.HIGH
    #: a security-relevant use of a value the scanner did not keep (memo budget, capped keys)
    blind: Severity = Severity.HIGH


@dataclass(frozen=True)
class Name:
    """A name as the policy sees it: as written, and the object it resolves to."""

    module: str
    name: str
    resolved: Resolved

    @property
    def key(self) -> tuple[str, str]:
        return self.resolved.module, self.resolved.name


class Policy:
    """Looks names up in the deny and allow lists; built once per settings."""

    def __init__(
        self,
        unsafe: dict[str, dict[str, object]],
        safe: dict[str, object],
        ecosystem: tuple[str, ...],
        unknown: UnknownSeverities,
        table: NameTable | None = None,
        reasons: dict[str, str] | None = None,
    ):
        self.unknown = unknown
        self.ecosystem = frozenset(ecosystem)
        self.table = table if table is not None else names_mod.default_table()
        self.reasons = reasons or {}
        self._deny_exact: dict[tuple[str, str], Severity] = {}
        self._deny_module: dict[str, Severity] = {}
        for level in ("LOW", "MEDIUM", "HIGH", "CRITICAL"):  # later (higher) levels win
            for module, names in (unsafe.get(level) or {}).items():
                severity = Severity[level]
                if names == ALL or (isinstance(names, list) and ALL in names):
                    self._deny_module[module] = max(severity, self._deny_module.get(module, severity))
                else:
                    for name in names or ():
                        key = (module, name)
                        self._deny_exact[key] = max(severity, self._deny_exact.get(key, severity))
        self._safe_exact: set[tuple[str, str]] = set()
        self._safe_module: set[str] = set()
        for module, names in safe.items():
            if names == ALL or (isinstance(names, list) and ALL in names):
                self._safe_module.add(module)
            else:
                self._safe_exact.update((module, name) for name in names)

    # -- the lists, resolved to objects (lazily: only names off the exact allowlist need it) ----

    @cached_property
    def _safe_objects(self) -> dict[tuple[str, str], tuple[str, str]]:
        """object identity -> the allowlist entry that names it."""
        out = {}
        for module, name in self._safe_exact:
            r = self.table.resolve(module, name)
            if not r.is_module and not r.dunder:
                out.setdefault((r.module, r.name), (module, name))
        return out

    @cached_property
    def _deny_objects(self) -> dict[tuple[str, str], tuple[Severity, tuple[str, str]]]:
        """object identity -> (severity, the denylist entry that names it)."""
        out: dict[tuple[str, str], tuple[Severity, tuple[str, str]]] = {}
        for (module, name), severity in self._deny_exact.items():
            r = self.table.resolve(module, name)
            key = (r.module, r.name)
            if key not in out or out[key][0] < severity:
                out[key] = (severity, (module, name))
        return out

    @cached_property
    def _covered_by_top(self) -> dict[str, list[str]]:
        """The table's modules, by top-level package."""
        out: dict[str, list[str]] = {}
        for module in self.table._index():
            out.setdefault(module.split(".", 1)[0], []).append(module)
        return out

    def _deny_reexported(self, r: Resolved) -> tuple[Severity, tuple[str, str]] | None:
        """The native half of a denied API: `torch.distributed.FileStore` is the class
        `torch._C._distributed_c10d.FileStore`, from an extension module the generator could not
        list. Such an object is known only through its re-exports, so a denied module of its own
        package that re-exports it decides for it too. Objects of listed modules (what
        `torch._dynamo` imports from `torch.serialization`) and of other packages
        (`inspect.OrderedDict`) keep their own judgement."""
        if r.covered or r.is_module or not r.name:
            return None
        top = r.module.split(".", 1)[0]
        found = self._reexports_cache.get(top)
        if found is None:
            found = self._reexports_cache[top] = self._denied_reexports_of(top)
        return found.get((r.module, r.name.split(".", 1)[0]))

    @cached_property
    def _reexports_cache(self) -> dict[str, dict]:
        return {}

    def _denied_reexports_of(self, top: str) -> dict[tuple[str, str], tuple[Severity, tuple[str, str]]]:
        """object identity -> (severity, the denied spelling) for one package's denied modules'
        re-exports from its modules the table does not list (computed on first need, per package)."""
        out: dict[tuple[str, str], tuple[Severity, tuple[str, str]]] = {}
        for module in self._covered_by_top.get(top, ()):
            sev, _ = self._denied_module(module)
            if sev is None:
                continue
            for name, what in (self.table.entries(module) or {}).items():
                if what[:1] in ("!", "@", "") or ":" not in what:
                    continue
                target_module, _, target_name = what.partition(":")
                if target_module.split(".", 1)[0] != top or self.table.covers(target_module) \
                        or self._denied_module(target_module)[0] is not None \
                        or self._safe_module_depth(target_module) or (target_module, target_name) in self._safe_objects:
                    continue
                key = (target_module, target_name)
                if key not in out or out[key][0] < sev:
                    out[key] = (sev, (module, name))
        return out

    def resolve(self, module: str, name: str) -> Resolved:
        return self.table.resolve(module, name)

    def is_exactly_allowed(self, module: str, name: str) -> bool:
        """On the exact allowlist, as written or as the object it resolves to."""
        if (module, name) in self._safe_exact and (module, name) not in self._deny_exact:
            return True
        r = self.table.resolve(module, name)
        return not r.dunder and (r.module, r.name) in self._safe_objects and self._exact_deny(module, name, r) is None

    def reason(self, module: str, name: str) -> str:
        return self.reasons.get(f"{module}:{name}") or self.reasons.get(f"{module}:*") or "on the allowlist"

    # -- judging ---------------------------------------------------------------------------------

    def judge(self, module: str, name: str, uses: int) -> Judgement:
        """The verdict for `find_class(module, name)` used as `uses` (a bit set): the worst of
        the name as written and as Python 3's `fix_imports` maps it."""
        names = _compat_names(module, name)
        verdicts = [self._judge_one(m, n, uses) for m, n in names]
        if len(names) > 1 and not self.table.covers(module) and verdicts[0].rule_id != "pickle/unsafe-global":
            verdicts = verdicts[1:]  # a Python 2 name Python 3 lacks: only its mapping can be imported
        flagged = [v for v in verdicts if v.severity is not None]
        if not flagged:
            return verdicts[0]
        return max(flagged, key=lambda v: v.severity)

    def _judge_one(self, module: str, name: str, uses: int) -> Judgement:
        key = (module, name)
        if key in self._deny_exact:
            return _unsafe(self._deny_exact[key], key)
        if "__main__" in module.split(".")[1:]:
            # find_class imports the module: a package's __main__ runs its command-line program
            # (flask, IPython, torch.utils.model_dump run unguarded), whatever name is then read
            return Judgement(self.unknown.call, "pickle/entry-point",
                             f"importing {module} runs the command-line program of its package")
        if key in self._safe_exact:
            return Judgement(None, "pickle/allowed", self.reason(module, name), f"{module}.{name}")
        r = self.table.resolve(module, name)
        via = r.qualname if r.aliased else ""
        denied = self._exact_deny(module, name, r) or self._deny_reexported(r)
        if denied is not None:
            return _with(_unsafe(*denied), via)
        if r.dunder and (r.dunder in INTROSPECTION or "." in name):
            if r.dunder in INTROSPECTION:
                return Judgement(Severity.CRITICAL, "pickle/introspection",
                                 f"walks to the interpreter's internals through {r.dunder}", resolved=via)
            if uses & (CALLED | NEW | BUILT):
                return Judgement(self.unknown.unresolved, "pickle/unresolved-attribute",
                                 f"a dunder attribute ({r.dunder}) the scanner cannot resolve is used", resolved=via)
        obj = (r.module, r.name)
        entry = self._safe_objects.get(obj) if not r.dunder else None
        if entry is not None:
            return Judgement(None, "pickle/allowed", self.reason(*entry), f"{entry[0]}.{entry[1]}", via)
        if r.kind in (DATA_TYPE, CONSTANT):
            return Judgement(None, "pickle/data-type", "an enum, a namedtuple or a dtype: constructing one runs nothing",
                             resolved=via)
        if "." in r.name and not uses & (CALLED | NEW | BUILT) and not r.dunder \
                and self.table.kind(r.module, r.name.split(".")[0]) == DATA_TYPE:
            return Judgement(None, "pickle/data-type", "a member of an enum (how Python 3.12 pickles one)", resolved=via)
        # module listings: the most specific decides, so an allowlisted
        # `torch.distributed.checkpoint.metadata` is not denied by `torch.distributed`
        deny_sev, deny_depth, deny_key = self._module_deny(module, name, r)
        safe_depth = self._safe_module_depth(r.module) if not r.is_module else 0
        if deny_sev is not None and not (safe_depth > deny_depth and deny_key[0] == r.module):
            return _with(_unsafe(deny_sev, deny_key), via)
        if r.kind == ACTING and uses & CALLED and f"{r.module}:{r.name}" not in self.reasons:
            # an ecosystem class is trusted because constructing one stores values; this one's
            # constructor opens, deletes or moves files by name, starts a process, loads a native
            # library or runs text as code, with the arguments the pickle hands it (unless the
            # allowlist names it with a reason, beside a "module:*" entry that cannot list it)
            return Judgement(self.unknown.call, "pickle/acting-constructor",
                             "a class whose constructor acts on the world (files by name, processes, native "
                             "libraries, code from text) is constructed with arguments", resolved=via)
        if r.is_module:
            if uses & (CALLED | NEW):
                return Judgement(self.unknown.unresolved, "pickle/unresolved-attribute",
                                 f"a module object ({r.module}) is called", resolved=via)
            return Judgement(self.unknown.reference, "pickle/unknown-reference",
                             f"a module object ({r.module}) is imported", resolved=via)
        if safe_depth:
            return _with(self._lenient(r, uses, "module on the allowlist", "pickle/allowed"), via)
        return _with(self._unknown(r, uses), via)

    def _exact_deny(self, module: str, name: str, r: Resolved) -> tuple[Severity, tuple[str, str]] | None:
        found = []
        for m, n in _candidates(module, name):
            sev = self._deny_exact.get((m, n.split(".", 1)[0]))
            if sev is not None:
                found.append((sev, (m, n)))
        # the object itself, and any prefix of its qualified name (`Popen.communicate` is Popen's)
        parts = r.name.split(".") if r.name else []
        for i in range(len(parts), 0, -1):
            hit = self._deny_objects.get((r.module, ".".join(parts[:i])))
            if hit is not None:
                found.append(hit)
                break
        return max(found, key=lambda item: item[0]) if found else None

    def _module_deny(self, module: str, name: str, r: Resolved) -> tuple[Severity | None, int, tuple[str, str]]:
        best: tuple[Severity | None, int, tuple[str, str]] = (None, 0, ("", ""))
        for m, n in [(r.module, r.name), *_candidates(module, name)]:
            sev, depth = self._denied_module(m)
            if sev is not None and (best[0] is None or sev > best[0]):
                best = (sev, depth, (m, n))
        return best

    def _denied_module(self, module: str) -> tuple[Severity | None, int]:
        """The severity of the most specific denylisted module covering `module`, and its depth."""
        parts = module.split(".")
        for i in range(len(parts), 0, -1):
            sev = self._deny_module.get(".".join(parts[:i]))
            if sev is not None:
                return sev, i
        return None, 0

    def _safe_module_depth(self, module: str) -> int:
        parts = module.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in self._safe_module:
                return i
        return 0

    def is_class(self, r: Resolved) -> bool:
        """A class, as the generated table knows it, else as its name reads."""
        if r.kind in (CLASS, DATA_TYPE, ACTING):
            return True
        if r.kind == FUNCTION or "." in r.name:
            return False
        return _class_like(r.name)

    def is_helper(self, r: Resolved) -> bool:
        return "." not in r.name and bool(_HELPER_NAME.match(r.name) or _CYTHON_UNPICKLE.match(r.name))

    def _lenient(self, r: Resolved, uses: int, what: str, rule: str) -> Judgement:
        """An allowlisted module or an ecosystem package: classes, helpers and references pass."""
        if self.is_class(r) or self.is_helper(r):
            return Judgement(None, rule, f"{'class' if self.is_class(r) else 'pickle helper'} of a {what}")
        if not uses & (CALLED | NEW | BUILT):
            # imported and stored (an activation function, an enum member by name): an import
            # runs no payload, and calling it later is judged where it is called
            return Judgement(None, rule, f"reference into a {what}")
        return self._unknown(r, uses, lenient=False)

    def in_ecosystem(self, r: Resolved) -> bool:
        return r.module.split(".", 1)[0] in self.ecosystem

    def _unknown(self, r: Resolved, uses: int, lenient: bool = True) -> Judgement:
        if lenient and self.in_ecosystem(r):
            return self._lenient(r, uses, f"package of the ecosystem ({r.module.split('.', 1)[0]})", "pickle/ecosystem")
        u = self.unknown
        class_like = self.is_class(r)
        if "." not in r.name and _CYTHON_UNPICKLE.match(r.name):
            return Judgement(u.new, "pickle/unknown-instance", "a Cython class is rebuilt (its module is imported)")
        if uses & CALLED:
            if class_like:
                return Judgement(u.class_call, "pickle/unknown-class-call", "an unknown class is constructed with arguments")
            return Judgement(u.call, "pickle/unknown-call", "an unknown callable is invoked")
        if uses & NEW:
            return Judgement(u.new, "pickle/unknown-instance", "an unknown class is instantiated (its module is imported)")
        if uses & BUILT:
            return Judgement(u.new, "pickle/unknown-instance", "an unknown object is given state")
        return Judgement(u.reference, "pickle/unknown-reference", "an unknown name is imported but not called")

    # -- roles: what some trusted callables do with their arguments --------------------------

    @cached_property
    def _roles(self) -> dict[tuple[str, str], str]:
        """object identity -> role, for the callables listed in ROLES (resolved like the lists)."""
        out = {}
        for (module, name), role in ROLES.items():
            r = self.table.resolve(module, name)
            out[(r.module, r.name)] = role
            out[(module, name)] = role
        return out

    @cached_property
    def _result_states(self) -> dict[tuple[str, str], int]:
        out = {}
        for (module, name), index in RESULT_STATE.items():
            r = self.table.resolve(module, name)
            out[(r.module, r.name)] = out[(module, name)] = index
        return out

    def result_state(self, module: str, name: str) -> int | None:
        """The position of an argument a callable sets its result's attributes from (as BUILD does)."""
        index = RESULT_STATE.get((module, name))
        if index is None:
            r = self.table.resolve(module, name)
            index = self._result_states.get((r.module, r.name))
        return index

    def role(self, module: str, name: str) -> str:
        """What a callable does with its arguments (see ROLES), "" for nothing special."""
        role = ROLES.get((module, name))
        if role is not None:
            return role
        r = self.table.resolve(module, name)
        return self._roles.get((r.module, r.name), "")


def _with(j: Judgement, via: str) -> Judgement:
    if not via or j.resolved:
        return j
    return Judgement(j.severity, j.rule_id, j.reason, j.matched, via)


def _unsafe(severity: Severity, key: tuple[str, str]) -> Judgement:
    return Judgement(severity, "pickle/unsafe-global", "on the denylist", f"{key[0]}.{key[1]}")


def _compat_names(module: str, name: str) -> list[tuple[str, str]]:
    """The name as written and as Python 3's `fix_imports` maps it (protocols 0-2)."""
    out = [(module, name)]
    mapped = _compat_pickle.NAME_MAPPING.get((module, name))
    if mapped is None and module in _compat_pickle.IMPORT_MAPPING:
        mapped = (_compat_pickle.IMPORT_MAPPING[module], name)
    if mapped is not None and mapped not in out:
        out.append(mapped)
    return out


def _candidates(module: str, name: str) -> list[tuple[str, str]]:
    """Every (module, name) that `find_class(module, name)` may really return, for modules the
    table does not cover: a dotted name's head may be a re-exported module (`pathlib.os`) or a
    submodule (`torch.serialization`), so each split point is a candidate too."""
    out: list[tuple[str, str]] = [(module, name)]
    parts = name.split(".")
    for j in range(1, len(parts)):
        head, rest = ".".join(parts[:j]), ".".join(parts[j:])
        out.append((head, rest))  # re-exported module: pathlib.os -> os
        out.append((f"{module}.{head}", rest))  # submodule reached as an attribute
    return out


def _class_like(name: str) -> bool:
    """A name that reads as a class: no dots, and an upper-case first letter after any leading
    underscores (`Linear`, `_BinMapper`). camelCase is not enough: `execWrapper` is a function."""
    core = name.lstrip("_")
    return "." not in name and bool(core) and core[0].isupper()


# -- what trusted callables do with their arguments ------------------------------------------

INSTANTIATE = "instantiate"  # makes an instance of its first argument (copyreg, numpy _reconstruct)
IMPORT = "import"  # returns module.name given as two strings
GETATTR = "getattr"  # getattr(owner, "name")
NESTED = "nested"  # unpickles its first argument
CALL_FIRST = "call-first"  # calls its first argument
BUILD_CLASS = "build-class"  # type(name, bases, namespace)
STATE = "state"  # sets its first argument's attributes from its second, as BUILD does
MAPPING = "mapping"  # builds a dict from its argument: calls a non-dict argument's keys()
LOOKUP = "lookup"  # getitem(container, key): a defaultdict's factory runs for a missing key
STORE = "store"  # keeps the callables it is given without calling them
TYPE_BY_NAME = "type-by-name"  # returns a built-in type named by its argument (dill's _load_type)
SHARED = "shared"  # returns a process-wide object (a logger): changing it changes the process

ROLES: dict[tuple[str, str], str] = {
    **{key: INSTANTIATE for key in [
        ("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor"), ("copyreg", "__newobj__"),
        ("copy_reg", "__newobj__"), ("copyreg", "__newobj_ex__"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"), ("sklearn.neighbors._kd_tree", "newObj"),
        ("sklearn.neighbors._ball_tree", "newObj"), ("sklearn.neighbors._binary_tree", "newObj"),
        ("sklearn.metrics._dist_metrics", "newObj")]},
    **{key: IMPORT for key in [
        ("numpy.core", "_ufunc_reconstruct"), ("numpy._core", "_ufunc_reconstruct"),
        ("numpy.core.multiarray", "_ufunc_reconstruct"), ("scipy._lib._uarray._backend", "unpickle_function")]},
    ("builtins", "getattr"): GETATTR, ("__builtin__", "getattr"): GETATTR,
    **{key: NESTED for key in [
        ("pickle", "loads"), ("_pickle", "loads"), ("cPickle", "loads"), ("dill", "loads"), ("dill._dill", "loads"),
        ("torch.storage", "_load_from_bytes"), ("numpy", "loads"), ("numpy.core.numeric", "loads"),
        ("joblib.numpy_pickle", "loads"), ("cloudpickle", "loads"), ("joblib.numpy_pickle", "_unpickle"),
        ("joblib.externals.loky.cloudpickle_wrapper", "_reconstruct_wrapper")]},
    ("torch._tensor", "_rebuild_from_type"): CALL_FIRST, ("torch._tensor", "_rebuild_from_type_v2"): CALL_FIRST,
    ("builtins", "type"): BUILD_CLASS, ("__builtin__", "type"): BUILD_CLASS, ("abc", "ABCMeta"): BUILD_CLASS,
    ("enum", "EnumMeta"): BUILD_CLASS, ("enum", "EnumType"): BUILD_CLASS,
    ("torch._utils", "_set_obj_state"): STATE,
    ("dill._dill", "_load_type"): TYPE_BY_NAME, ("dill.dill", "_load_type"): TYPE_BY_NAME,
    ("logging", "getLogger"): SHARED,
    **{key: MAPPING for key in [
        ("builtins", "dict"), ("__builtin__", "dict"), ("collections", "OrderedDict"), ("collections", "Counter"),
        ("collections", "UserDict"), ("collections", "ChainMap"), ("types", "SimpleNamespace")]},
    ("operator", "getitem"): LOOKUP, ("_operator", "getitem"): LOOKUP,
    **{key: STORE for key in [
        ("functools", "partial"), ("functools", "partialmethod"), ("collections", "defaultdict"), ("builtins", "set"),
        ("builtins", "frozenset"), ("builtins", "list"), ("builtins", "tuple"), ("__builtin__", "set"),
        ("__builtin__", "frozenset"), ("__builtin__", "list"), ("__builtin__", "tuple"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "dtype"), ("numpy._core.multiarray", "dtype"), ("collections", "deque")]},
}

#: callables that set their result's attributes from one argument, as BUILD does (torch calls
#: _set_obj_state(result, state) inside them): position of that argument
RESULT_STATE: dict[tuple[str, str], int] = {
    ("torch._utils", "_rebuild_parameter_with_state"): 3, ("torch._tensor", "_rebuild_from_type_v2"): 3,
}

#: types dill's `_load_type` returns whose call only makes a value: the builtin value types, the
#: constants' types and exceptions; any other (FunctionType, CodeType, FileType, MethodType,
#: AttrGetterType, the io wrappers...) makes code, opens files or reaches attributes
_PLAIN_TYPE_NAMES = frozenset({
    "bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list", "object", "range",
    "set", "slice", "str", "tuple", "NoneType", "EllipsisType", "NotImplementedType", "PartialType",
})


def type_by_name_is_plain(name: object) -> bool:
    """Calling what `_load_type(name)` returns only makes a value."""
    return isinstance(name, str) and (name in _PLAIN_TYPE_NAMES or name.endswith(("Error", "Exception", "Warning")))


#: kept for callers that read the nested loaders directly
NESTED_LOADERS = frozenset(key for key, role in ROLES.items() if role == NESTED)


def resolve_indirect(globals_: list, dynamic_calls: list, policy: Policy):
    """The uses of a stream's names once indirect calls are counted (flow.analyse on the
    globals and dynamic calls alone), for callers that hold no StreamFacts."""
    from types import SimpleNamespace

    from modelscan_core.scanners.pickle import flow

    facts = SimpleNamespace(globals=globals_, dynamic_calls=dynamic_calls, mutations=[], blind=[], dropped_events=0)
    return flow.analyse(facts, policy)
