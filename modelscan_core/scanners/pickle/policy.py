"""Turn the VM's facts into findings: which names are dangerous, and how dangerous.

Names are resolved the way `Unpickler.find_class` resolves them before they are judged:
Python 2 names are mapped as `fix_imports` maps them, a dotted name is an attribute chain
(`("pathlib", "os.system")` is `os.system`, `("builtins", "eval.__call__")` starts at
`eval`), and a listed module covers its submodules (`asyncio.subprocess`).

Order of judgement for one name: an exact denylist entry, then an exact allowlist entry,
then a denylisted module, then an allowlisted module, then the rules for names on neither
list, which follow how the pickle uses the name (called, instantiated, given state, only
referenced). A dotted name is never allowlisted unless listed whole.
"""

from __future__ import annotations

import _compat_pickle
import re
from dataclasses import dataclass

from modelscan_core.model import Severity
from modelscan_core.scanners.pickle.values import BUILT, CALLED, NEW, Call, GlobalRef, PDict, PSet, Unknown

ALL = "*"

_HELPER_NAME = re.compile(r"_*(rebuild|unpickle|reconstruct|new_|restore|from_state)|.*(_ctor|_unpickle|(?<!ufunc)_reconstruct)$")
#: Cython's generated pickle support: it only allocates the class and hands it its state
_CYTHON_UNPICKLE = re.compile(r"__pyx_unpickle_\w+$")


@dataclass(frozen=True)
class Judgement:
    """What the policy concluded about one name; `severity` None means trusted."""

    severity: Severity | None
    rule_id: str
    reason: str
    matched: str = ""  # the list entry (module.name or module.*) that decided it


@dataclass(frozen=True)
class UnknownSeverities:
    """Severities for names on neither list, by their strongest use."""

    call: Severity = Severity.HIGH
    class_call: Severity = Severity.MEDIUM
    new: Severity = Severity.LOW
    reference: Severity = Severity.LOW
    unresolved: Severity = Severity.HIGH
    dynamic_call: Severity = Severity.HIGH
    call_before_error: Severity = Severity.MEDIUM


class Policy:
    """Looks names up in the deny and allow lists; built once per settings."""

    def __init__(
        self,
        unsafe: dict[str, dict[str, object]],
        safe: dict[str, object],
        ecosystem: tuple[str, ...],
        unknown: UnknownSeverities,
    ):
        self.unknown = unknown
        self.ecosystem = frozenset(ecosystem)
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

    # -- lookup ----------------------------------------------------------------

    def judge(self, module: str, name: str, uses: int) -> Judgement:
        """The verdict for `find_class(module, name)` used as `uses` (a bit set)."""
        candidates = _candidates(module, name)
        exact = [(self._deny_exact[(m, n.split(".", 1)[0])], (m, n)) for m, n in candidates
                 if (m, n.split(".", 1)[0]) in self._deny_exact]
        if exact:
            return _unsafe(*max(exact, key=lambda item: item[0]))
        originals = _compat_names(module, name)
        if any(key in self._safe_exact for key in originals):
            return Judgement(None, "pickle/allowed", "on the allowlist")
        # A listed module covers its submodules; the most specific listing decides, so an
        # allowlisted `torch.distributed.checkpoint.metadata` is not denied by `torch.distributed`.
        safe_depth = max((self._safe_module_depth(m) for m, _ in originals), default=0) if "." not in name else 0
        wild = [(sev, depth, (m, n)) for m, n in candidates for sev, depth in [self._denied_module(m)] if sev is not None]
        own_depth = max((depth for _, depth, key in wild if key in originals), default=0)
        if wild and not (safe_depth > own_depth and all(key in originals for _, _, key in wild)):
            sev, _, key = max(wild, key=lambda item: item[0])
            return _unsafe(sev, key)
        if safe_depth:
            return Judgement(None, "pickle/allowed", "module on the allowlist")
        return self._unknown(module, name, uses)

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

    def _unknown(self, module: str, name: str, uses: int) -> Judgement:
        class_like = _class_like(name)
        helper = "." not in name and bool(_HELPER_NAME.match(name) or _CYTHON_UNPICKLE.match(name))
        package = module.split(".", 1)[0]
        if package in self.ecosystem:
            if _class_like(name, camel=True) or helper:
                return Judgement(None, "pickle/ecosystem", f"{'class' if class_like else 'pickle helper'} of {package}")
            if not uses & (CALLED | NEW | BUILT):
                # imported and stored (an activation function, an enum member by name): an
                # ecosystem import runs no payload; calling it later needs a gadget we flag
                return Judgement(None, "pickle/ecosystem", f"reference into {package}")
        u = self.unknown
        if "." not in name and _CYTHON_UNPICKLE.match(name):
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
    """Every (module, name) that `find_class(module, name)` may really return.

    A dotted name walks attributes: its head may be a re-exported module (`pathlib.os`) or
    a submodule (`torch.serialization`), so each split point is a candidate too.
    """
    out: list[tuple[str, str]] = []
    for mod, nm in _compat_names(module, name):
        out.append((mod, nm))
        parts = nm.split(".")
        for j in range(1, len(parts)):
            head, rest = ".".join(parts[:j]), ".".join(parts[j:])
            out.append((head, rest))  # re-exported module: pathlib.os -> os
            out.append((f"{mod}.{head}", rest))  # submodule reached as an attribute
    return out


# -- reading calls the way the loader runs them ---------------------------------

#: allowlisted callables that construct their first argument (it is instantiated, not just named)
INSTANTIATORS = {("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor"), ("copyreg", "__newobj__"),
                 ("copy_reg", "__newobj__"), ("copyreg", "__newobj_ex__"), ("numpy.core.multiarray", "_reconstruct"),
                 ("numpy._core.multiarray", "_reconstruct"), ("sklearn.neighbors._kd_tree", "newObj"),
                 ("sklearn.neighbors._ball_tree", "newObj"), ("sklearn.neighbors._binary_tree", "newObj"),
                 ("sklearn.metrics._dist_metrics", "newObj")}

#: callables that import `module.name` given as string arguments (positions of the two):
#: what they return is judged like a GLOBAL of those names
IMPORTERS = {("numpy.core", "_ufunc_reconstruct"): (0, 1), ("numpy._core", "_ufunc_reconstruct"): (0, 1),
             ("numpy.core.multiarray", "_ufunc_reconstruct"): (0, 1),
             ("scipy._lib._uarray._backend", "unpickle_function"): (0, 1)}

#: getattr(owner, "name"): with a static owner and a plain name, it is the global owner.name
ATTRIBUTE_GETTERS = {("builtins", "getattr"), ("__builtin__", "getattr")}

#: trusted callables that store the callables they are given without calling them; any other
#: trusted callable is assumed to call the names passed to it (torch's _rebuild_from_type_v2
#: calls its first argument, numpy's RNG constructors call theirs)
NON_CALLING = {("functools", "partial"), ("functools", "partialmethod"), ("collections", "defaultdict"),
               ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "list"), ("builtins", "tuple"),
               ("builtins", "dict"), ("__builtin__", "set"), ("__builtin__", "frozenset"), ("__builtin__", "list"),
               ("__builtin__", "tuple"), ("__builtin__", "dict"), ("operator", "getitem"), ("_operator", "getitem"),
               ("numpy", "dtype"), ("numpy.core.multiarray", "dtype"), ("numpy._core.multiarray", "dtype")}

#: callables whose first argument is a pickle the loader unpickles in turn
NESTED_LOADERS = {("pickle", "loads"), ("_pickle", "loads"), ("cPickle", "loads"), ("dill", "loads"),
                  ("dill._dill", "loads"), ("torch.storage", "_load_from_bytes"), ("numpy", "loads"),
                  ("numpy.core.numeric", "loads"), ("joblib.numpy_pickle", "loads"), ("cloudpickle", "loads"),
                  ("joblib.numpy_pickle", "_unpickle"), ("joblib.externals.loky.cloudpickle_wrapper", "_reconstruct_wrapper")}

_OBJECT = {("builtins", "object"), ("__builtin__", "object")}


@dataclass
class Indirect:
    """What the calls in a stream do beyond their own names (see `resolve_indirect`)."""

    globals: list[GlobalRef]  # the stream's globals plus names reached through importers and getattr
    suppressed: set[int]  # ids of getattr refs fully explained by the names they resolve to
    dynamic_calls: list[Call]  # calls of computed values that could not be explained


def resolve_indirect(globals_: list[GlobalRef], dynamic_calls: list[Call], policy: "Policy") -> Indirect:
    """Mark names used indirectly, the way the loader would use them:

    - a class handed to copyreg (or numpy's _reconstruct) is instantiated;
    - a name handed to any other trusted callable is called (call laundering through
      `_rebuild_from_type_v2(func, ...)` or an RNG constructor is still a call);
    - `module.name` imported by an importer helper, or `owner.attr` fetched with getattr, is a
      global of its own, judged like one; getattr then needs no finding of its own;
    - a name inside a value computed at load time and then called is called.
    """
    out = list(globals_)
    produced: dict[int, GlobalRef] = {}  # id(Call) -> the global that call returns
    suppressed: set[int] = set()
    for ref in globals_:
        key = (ref.module, ref.name)
        if key in IMPORTERS:
            mod_i, name_i = IMPORTERS[key]
            for call in ref.calls:
                args = call.args if isinstance(call.args, tuple) else ()
                if len(args) > max(mod_i, name_i) and isinstance(args[mod_i], str) and isinstance(args[name_i], str):
                    target = GlobalRef(args[mod_i], args[name_i], call.offset, f"{ref.name}()")
                    out.append(target)
                    produced[id(call)] = target
        elif key in ATTRIBUTE_GETTERS:
            resolved = 0
            for call in ref.calls:
                target = _attribute_global(call)
                if target is not None:
                    out.append(target)
                    produced[id(call)] = target
                    resolved += 1
            if ref.calls and resolved == ref.ncalls:
                suppressed.add(id(ref))
    for ref in globals_:
        key = (ref.module, ref.name)
        if key in INSTANTIATORS:
            for call in ref.calls:
                args = call.args if isinstance(call.args, tuple) else ()
                if args and isinstance(args[0], GlobalRef):
                    args[0].uses |= NEW
                if len(args) > 1 and isinstance(args[1], GlobalRef) and (args[1].module, args[1].name) not in _OBJECT:
                    args[1].uses |= CALLED
            first_args = {id(c.args[0]) for c in ref.calls if isinstance(c.args, tuple) and c.args}
            if ref.ncalls > len(ref.calls):
                first_args = set()  # not every call was kept: assume any name passed is called
            for arg in ref.arg_refs:
                if id(arg) not in first_args and (arg.module, arg.name) not in _OBJECT:
                    arg.uses |= CALLED
        elif ref.arg_refs and key not in NON_CALLING and key not in ATTRIBUTE_GETTERS and key not in IMPORTERS:
            if policy.judge(ref.module, ref.name, CALLED).severity is None:
                for arg in ref.arg_refs:
                    if (arg.module, arg.name) not in _OBJECT:
                        arg.uses |= CALLED
    unexplained: list[Call] = []
    for call in dynamic_calls:
        target = produced.get(id(call.func))
        if target is not None:
            target.uses |= CALLED
            continue
        unexplained.append(call)
        for ref in reachable_globals(call.func):
            ref.uses |= CALLED
    return Indirect(out, suppressed, unexplained)


def _attribute_global(call: Call) -> GlobalRef | None:
    """getattr(owner, "attr") as the global `owner.attr`, when both are static and attr is no dunder."""
    args = call.args if isinstance(call.args, tuple) else ()
    if len(args) != 2 or not isinstance(args[1], str) or not args[1].isidentifier() or args[1].startswith("__"):
        return None
    owner = _owner_class(args[0])
    if owner is None:
        return None
    return GlobalRef(owner.module, f"{owner.name}.{args[1]}", call.offset, "getattr()")


def _owner_class(value: object) -> GlobalRef | None:
    """The class (or module-level name) whose attribute getattr reads: a global itself, or the
    class of an object the pickle built from one."""
    if isinstance(value, GlobalRef):
        return value
    if isinstance(value, Call) and isinstance(value.func, GlobalRef):
        func = value.func
        args = value.args if isinstance(value.args, tuple) else ()
        if (func.module, func.name) in INSTANTIATORS:
            return args[0] if args and isinstance(args[0], GlobalRef) else None
        if value.kind in ("newobj", "newobj_ex") or (value.kind in ("reduce", "inst", "obj") and _class_like(func.name)):
            return func
    return None


def _class_like(name: str, camel: bool = False) -> bool:
    """A name that reads as a class: no dots, and an upper-case first letter after any leading
    underscores (`Linear`, `_BinMapper`); with `camel`, any upper-case letter (`dStatespace`)."""
    core = name.lstrip("_")
    if "." in name or not core:
        return False
    return core[0].isupper() or (camel and any(c.isupper() for c in core))


def reachable_globals(value: object, depth: int = 6) -> list[GlobalRef]:
    """GlobalRefs inside a value (for callables built at load time)."""
    out: list[GlobalRef] = []
    stack = [(value, depth)]
    while stack:
        v, d = stack.pop()
        if d < 0:
            continue
        if isinstance(v, GlobalRef):
            out.append(v)
        elif isinstance(v, Call):
            stack.append((v.func, d - 1))
            stack.append((v.args, d - 1))
        elif isinstance(v, PDict):
            stack.extend((x, d - 1) for pair in v for x in pair)
        elif isinstance(v, (tuple, list, PSet)):
            stack.extend((x, d - 1) for x in v)
        elif isinstance(v, Unknown) and v.detail is not None:
            stack.append((v.detail, d - 1))
    return out
