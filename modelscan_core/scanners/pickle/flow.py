"""Every call the load makes, whoever makes it: the values that flow into call positions.

The VM records the calls the unpickler makes itself (REDUCE, INST, OBJ, NEWOBJ, BUILD's
`__setstate__`). Objects the load builds call too: `_rebuild_from_type_v2(func, ...)` calls
`func`, `copyreg._reconstructor(cls, base, state)` runs `base.__init__`, a `partial` or a
bound method fetched with getattr is a callable value that something calls later, a
defaultdict runs its factory for a missing key, `dict(obj)` calls a planted `obj.keys`,
`type(name, bases, ns)` builds a class whose dunder methods Python calls by itself.

Two halves: an `Observer` per global sees each of its calls while the VM runs (so nothing is
judged from "the first few calls"), and `analyse` works out, after the stream, which names
are called, instantiated or used, and what the load did that is a finding by itself (a class
built at load time, a global rewritten, a value the scanner could not keep used where it
matters).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

from modelscan_core.model import Severity
from modelscan_core.scanners.pickle import policy as pol
from modelscan_core.scanners.pickle.vm import _CALLED_ATTRIBUTES, STATE, STORED, _state_attributes, _symbolic
from modelscan_core.scanners.pickle.values import (
    BUILT,
    CALLED,
    DISPLAY_ITEMS,
    MUT_BUILD,
    NEW,
    Call,
    GlobalRef,
    PDict,
    PSet,
    Unknown,
    render,
)

#: calls kept per observed global; past this the global's calls are not all judged: fail closed
MAX_OBSERVED = 4096
#: values kept per observed global for a role that aggregates (classes instantiated, callees)
MAX_VALUES = 256
_OBJECT = {("builtins", "object"), ("__builtin__", "object")}


# -- strings that read as code, commands, paths or URLs --------------------------------------

#: programs a shell command starts with (words that also open English text are left out)
_COMMANDS = ("sh", "bash", "zsh", "dash", "cmd", "powershell", "pwsh", "curl", "wget", "ncat", "rm", "chmod", "chown",
             "touch", "echo", "whoami", "python", "python3", "perl", "ruby", "mkfifo", "telnet", "ssh", "scp", "nohup",
             "sudo", "xargs", "pkill")
#: after a separator (`;`, `|`, `&&`) shorter names read as commands too
_PIPED = _COMMANDS + ("id", "env", "cat", "ls", "dd", "mv", "cp", "kill", "nc", "base64")


@lru_cache(maxsize=1)
def _patterns() -> tuple[re.Pattern, ...]:
    """Compiled on first use: most scans never construct a class with string arguments."""
    first, piped = "|".join(_COMMANDS), "|".join(_PIPED)
    code = re.compile(
        r"__import__|__builtins__|__globals__|__subclasses__|__class__|\bimport\s+[A-Za-z_]|\bexec\s*\(|\beval\s*\("
        r"|\bcompile\s*\(|\bos\.(?:system|popen|exec\w*|spawn\w*|remove|unlink)\b|\bsubprocess\b|\bgetattr\s*\("
        r"|\bopen\s*\([^)]*\)\s*\.\s*(?:read|write)|\blambda\b[^:]{0,40}:|^\s*(?:def|class)\s+\w+\s*[(:]|\bsetattr\s*\("
        # modules reached without an import statement, files opened to write, the debugger
        r"|\bsys\s*\.\s*modules\b|__loader__|__spec__|\bbuiltins\s*\.|\bbreakpoint\s*\("
        r"|\bopen\s*\([^)]*,\s*(?:mode\s*=\s*)?[rbf]?['\"][rb+]*[wax]"
    )
    shell = re.compile(
        rf"^\s*(?:{first})(?:\.exe)?\s+\S|\$\(|`[^`]+`|(?:&&|\|\||;|\|)\s*(?:{piped})\b"
        r"|\b(?:sh|bash|cmd|powershell)(?:\.exe)?\s+(?:-c|/c)\b"
    )
    url = re.compile(r"\s*(?:[a-z][a-z0-9+.-]{1,15})://", re.I)
    # a path, or the bare name of a native library or a script: a constructor handed one loads
    # or runs it (relative to the loader's working directory)
    path = re.compile(r"\s*(?:~?/|\.{1,2}/|[A-Za-z]:[\\/]|\\\\|~\\)"
                      r"|[^\s/\\]+\.(?:so(?:\.\d+)*|dylib|dll|pyd|sh|bash|bat|cmd|ps1|exe)\s*$")
    return code, shell, url, path


def suspicious_text(value: object) -> str:
    """Why a string argument reads as something a constructor should not be handed: Python
    code, a shell command, a filesystem path or a URL; "" when it reads as plain data."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return ""
    if not isinstance(value, str) or len(value) < 2:
        return ""
    head = value[:4096]
    if not head.isascii():
        # Python reads identifiers in NFKC form: a fullwidth `ｅｖａｌ` is `eval`
        head = unicodedata.normalize("NFKC", head)
    code, shell, url, path = _patterns()
    if code.search(head):
        return "Python code"
    if shell.search(head):
        return "a shell command"
    if url.match(head):
        return "a URL"
    if path.match(head):
        return "a filesystem path"
    return ""


#: values looked at per call for suspicious strings (a wide argument costs no more than this)
_ARG_BUDGET = 64


def _suspicious_args(call: Call, depth: int = 2) -> str:
    """The first argument of a call (or an item in it) that reads as code, a command or a path."""
    stack = [(call.args, depth)]
    if isinstance(call.kwargs, PDict):
        stack.append(([v for _, v in call.kwargs], depth))
    budget = _ARG_BUDGET
    while stack and budget > 0:
        budget -= 1
        value, d = stack.pop()
        why = suspicious_text(value)
        if why:
            return f"{why}: {render(value, 80)}"
        if d > 0 and isinstance(value, PDict):  # before list: a PDict is a list of pairs
            stack.extend((v, d - 1) for pair in value for v in pair)
        elif d > 0 and isinstance(value, (tuple, list, PSet)):
            stack.extend((v, d - 1) for v in value)
    return ""


# -- observers: each call of a global, while the VM runs ---------------------------------------

class Observer:
    """Called by the VM with every Call of one global. What it keeps depends on the global's
    role; every list is bounded, and what it had to drop is counted (the analysis then fails
    closed for that global)."""

    __slots__ = ("ref", "role", "trusted", "check_args", "state_index", "calls", "values", "suspicious", "dropped",
                 "blind", "class_builds")

    def __init__(self, ref: GlobalRef, role: str, trusted: bool, check_args: bool, state_index: int | None = None):
        self.ref = ref
        self.role = role
        self.state_index = state_index  # the argument it sets its result's attributes from
        self.trusted = trusted  # the policy trusts calling it: the names it is handed may be called
        self.check_args = check_args  # a class not on the exact allowlist: arguments are judged
        self.calls: list[Call] = []
        self.values: list = []  # callables handed to it (trusted), or what its role collects
        self.suspicious: list[tuple[Call, str]] = []
        self.dropped = 0
        self.blind: list[tuple[int, str]] = []
        #: calls shaped like type(name, bases, namespace); for copyreg's reconstructor, the
        #: planted methods base.__init__ calls on the state
        self.class_builds: list = []

    def __call__(self, call: Call) -> None:
        role = self.role
        args = call.args if type(call.args) is tuple else None
        if role in _KEEP_CALLS:
            if role != pol.BUILD_CLASS or (args is not None and len(args) >= 2) or args is None:
                self._keep_call(call)
        elif role == pol.STATE:
            self._state(call, args)
        elif role == pol.MAPPING:
            for arg in args or ():
                for method in _mapping_methods(arg):
                    self._keep_value(method)
        elif role == pol.LOOKUP:
            container = args[0] if args else None
            if type(container) is Call and type(container.func) is GlobalRef and container.func.name == "defaultdict":
                factory = container.args[0] if type(container.args) is tuple and container.args else None
                if factory is not None:
                    self._keep_value(factory)
                planted = (container.planted or {}).get("default_factory")
                if planted is not None:  # BUILD's slot state set the factory after construction
                    self._keep_value(planted)
        elif role == pol.CALL_FIRST:
            if args:
                self._keep_value(args[0])
            elif args is None:
                self._keep_value(call.args)
        elif role == pol.INSTANTIATE:
            self._keep_call(call) if len(self.calls) < MAX_VALUES else self._instantiate(args)
            if args is not None and len(args) > 2:
                # copyreg._reconstructor(cls, base, state) runs base.__init__(obj, state): a dict
                # base calls the state's keys() (items() for OrderedDict), as dict(state) would
                for method in _mapping_methods(args[2]):
                    self._keep_class_build(method)
        elif self.trusted and role != pol.STORE and args:
            for arg in args:  # a callable value handed to a trusted callable is assumed called
                if type(arg) is Call and _callable_value(arg):
                    self._keep_value(arg)
                elif type(arg) is Call and arg.planted and STORED in arg.planted:
                    # an object whose state stored callables: trusted code handed it may call its
                    # methods, and an instance attribute wins over the class's own
                    for _, value in arg.planted[STORED]:
                        if type(value) is GlobalRef or (type(value) is Call and _callable_value(value)):
                            self._keep_value(value)
                elif type(arg) in _CONTAINERS:
                    # ...inside a list, tuple or dict too: LambdaLR(optimizer, [f]) calls f itself
                    for item in arg[:DISPLAY_ITEMS] if type(arg) is not PDict else [v for _, v in arg[:DISPLAY_ITEMS]]:
                        if type(item) is GlobalRef or (type(item) is Call and _callable_value(item)):
                            self._keep_value(item)
        if self.state_index is not None and args is not None and len(args) > self.state_index:
            self._plant(call, call, args[self.state_index])
        if self.check_args and args is not None and not role and _metaclass_shaped(args):
            self._keep_class_build(call)
        if self.check_args and len(self.suspicious) < 8:
            why = _suspicious_args(call)
            if why:
                self.suspicious.append((call, why))

    def _keep_call(self, call: Call) -> None:
        if len(self.calls) < MAX_OBSERVED:
            self.calls.append(call)
        else:
            self.dropped += 1

    def _keep_class_build(self, call: Call) -> None:
        if len(self.class_builds) < MAX_VALUES:
            self.class_builds.append(call)
        else:
            self.dropped += 1

    def _keep_value(self, value: object) -> None:
        if any(v is value for v in self.values):
            return
        if len(self.values) < MAX_VALUES:
            self.values.append(value)
        else:
            self.dropped += 1

    def _instantiate(self, args: tuple | None) -> None:
        """Past MAX_VALUES calls, copyreg's reconstructor keeps only the classes it was given."""
        for value in (args or ())[:2]:
            if isinstance(value, GlobalRef):
                if value not in self.values:
                    self._keep_value(value)
            elif isinstance(value, (Call, Unknown)):
                self._keep_value(value)

    def _state(self, call: Call, args: tuple | None) -> None:
        """torch's `_set_obj_state(obj, state)` does what BUILD does with a dict state."""
        if args and len(args) >= 2:
            self._plant(call, args[0], args[1])

    def _plant(self, call: Call, target: object, state: object) -> None:
        """Attributes set on `target` from `state`, as BUILD sets them: a method the load calls
        later is kept on the object (the VM calls it then); one under a computed key is called."""
        attributes, blind = _state_attributes(state)
        if blind:
            self.blind.append((call.offset, f"{self.ref.module}.{self.ref.name} sets attributes from {blind}"))
        for key, value in attributes:
            if key == "__class__" and type(value) is GlobalRef:
                value.uses |= BUILT  # the object's class is replaced: that class's methods run on it
            elif type(key) is not str or (key in _CALLED_ATTRIBUTES and _symbolic(value)):
                if type(key) is not str and not _symbolic(value):
                    continue
                if type(target) is Call and type(key) is str:
                    target.planted = dict(target.planted or {}, **{key: value})
                else:
                    self._keep_value(value)


_CONTAINERS = (list, tuple, PDict, PSet)


def _mapping_methods(arg: object) -> list:
    """The planted methods a dict builder calls on a non-dict argument: dict(), UserDict() and
    Counter() call keys(); OrderedDict() calls items() when there is no keys()."""
    if type(arg) is not Call or not arg.planted:
        return []
    out = [arg.planted["keys"]] if "keys" in arg.planted else []
    out.extend(value for key, value in arg.planted.get(STORED, ()) if key == "items")
    return out


def _metaclass_shaped(args: tuple) -> bool:
    """(name, bases, namespace) as a metaclass takes them: a class called so builds a class, as
    type() does (typing's NamedTupleMeta copies the namespace's __del__ onto the class it makes).
    Bases are classes; with none, the namespace must hold a dunder for the shape to count."""
    if len(args) != 3 or type(args[0]) is not str or type(args[1]) is not tuple or type(args[2]) is not PDict:
        return False
    if args[1]:
        return all(type(base) is GlobalRef for base in args[1])
    return any(type(key) is str and key[:2] == "__" == key[-2:] and len(key) > 4 for key, _ in args[2])
_KEEP_CALLS = frozenset({pol.IMPORT, pol.GETATTR, pol.NESTED, pol.BUILD_CLASS, pol.SHARED})


def _callable_value(call: Call) -> bool:
    """A call whose result may be a callable: a partial, an attribute or an import fetched at load
    time, or the result of something the scanner does not know (a computed callee)."""
    func = call.func
    if type(func) is not GlobalRef:
        return True
    observer = func.observer
    if observer is not None and observer.role in (pol.GETATTR, pol.IMPORT, pol.TYPE_BY_NAME):
        return True
    return func.name in ("partial", "partialmethod") and func.module in ("functools", "_functools")


def observer_factory(policy: pol.Policy):
    """observe(ref) for PickleVM: an Observer for the globals whose calls matter one by one."""
    cache: dict[tuple[str, str], tuple | None] = {}

    def observe(ref: GlobalRef) -> Observer | None:
        key = (ref.module, ref.name)
        plan = cache.get(key, False)
        if plan is False:
            plan = cache[key] = _plan(policy, ref.module, ref.name)
        if plan is None:
            return None
        return Observer(ref, *plan)

    return observe


def _plan(policy: pol.Policy, module: str, name: str) -> tuple | None:
    role = policy.role(module, name)
    state_index = policy.result_state(module, name)
    verdict = policy.judge(module, name, CALLED)
    trusted = verdict.severity is None
    exact = trusted and verdict.rule_id == "pickle/allowed" and policy.is_exactly_allowed(module, name)
    r = policy.resolve(module, name)
    check_args = not exact and not role and policy.is_class(r) and verdict.rule_id != "pickle/unsafe-global"
    if not role and not trusted and not check_args and state_index is None:
        return None
    if not role and trusted and not check_args and exact and _data_only(module, name):
        return None
    return role, trusted, check_args, state_index


#: exact-allowlisted callables that are handed only data in real pickles by the thousand:
#: not observed, so the VM pays nothing for them (their GlobalRef arguments are still seen)
_DATA_ONLY = frozenset({
    ("_codecs", "encode"), ("codecs", "encode"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"), ("builtins", "bytearray"), ("builtins", "bytes"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "complex"), ("builtins", "str"), ("builtins", "slice"),
    ("builtins", "range"), ("datetime", "datetime"), ("datetime", "date"), ("datetime", "time"),
    ("datetime", "timedelta"), ("decimal", "Decimal"), ("uuid", "UUID"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_parameter"), ("numpy.core.multiarray", "_reconstruct"),
})


def _data_only(module: str, name: str) -> bool:
    return (module, name) in _DATA_ONLY


# -- after the stream: who is called -----------------------------------------------------------

@dataclass
class Issue:
    """A finding about what the load does beyond the names it imports."""

    rule_id: str
    severity: Severity
    message: str
    offset: int | None
    module: str = ""
    operator: str = ""
    call: Call | None = None


@dataclass
class Analysis:
    globals: list[GlobalRef]  # the stream's globals plus names reached through importers and getattr
    suppressed: set[int]  # ids of getattr refs fully explained by the names they resolve to
    dynamic_calls: list[Call]  # calls of computed values that could not be explained
    issues: list[Issue] = field(default_factory=list)
    suspicious: dict[int, tuple[Call, str]] = field(default_factory=dict)  # id(ref) -> a call with such arguments


def analyse(facts, policy: pol.Policy) -> Analysis:
    """Mark names used indirectly, the way the loader would use them, and list what the load
    does that is a finding by itself."""
    u = policy.unknown
    out = list(facts.globals)
    produced: dict[int, GlobalRef] = {}  # id(Call) -> the global that call returns
    suppressed: set[int] = set()
    issues: list[Issue] = []
    result = Analysis(out, suppressed, [], issues)

    def observer_of(ref: GlobalRef) -> Observer | None:
        obs = ref.observer
        return obs if isinstance(obs, Observer) else None

    def calls_of(ref: GlobalRef) -> list[Call]:
        obs = observer_of(ref)
        return obs.calls if obs is not None else ref.calls

    def dropped(ref: GlobalRef) -> int:
        obs = observer_of(ref)
        return obs.dropped if obs is not None else max(0, ref.ncalls - len(ref.calls))

    # names produced by importers and getattr, judged like globals of their own
    for ref in facts.globals:
        role = policy.role(ref.module, ref.name)
        if role == pol.IMPORT:
            for call in calls_of(ref):
                args = call.args if isinstance(call.args, tuple) else ()
                if len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                    target = GlobalRef(args[0], args[1], call.offset, f"{ref.name}()")
                    out.append(target)
                    produced[id(call)] = target
                else:
                    issues.append(Issue("pickle/unresolved-global", u.unresolved,
                                        f"'{ref.module}.{ref.name}' imports a name the scanner cannot work out",
                                        call.offset, ref.module, ref.name, call))
        elif role == pol.GETATTR:
            resolved = 0
            for call in calls_of(ref):
                target = _attribute_global(call, policy)
                if target is not None:
                    out.append(target)
                    produced[id(call)] = target
                    resolved += 1
            if calls_of(ref) and resolved == ref.ncalls:
                suppressed.add(id(ref))
        if role in (pol.IMPORT, pol.GETATTR) and dropped(ref):
            issues.append(Issue("pickle/blind", u.blind,
                                f"'{ref.module}.{ref.name}' is called {ref.ncalls} times; the names it fetches past "
                                f"the first {MAX_OBSERVED} are not judged", ref.offset, ref.module, ref.name))
        for call in calls_of(ref) if role in (pol.IMPORT, pol.GETATTR) else ():
            target = produced.get(id(call))
            if target is not None and call.mutated:
                issues.append(_mutation_issue(policy, target, call.mutated, call.offset))

    def callees(value: object, depth: int = 0) -> list[GlobalRef] | None:
        """The globals that run when `value` is called; None when the scanner cannot tell."""
        if depth > 8:
            return None
        if type(value) is GlobalRef:
            return [value]
        if type(value) is Call:
            func = value.func
            if type(func) is not GlobalRef:
                # the result of calling a computed callable (`getattr(ZoneInfo, "_unpickle")(key)`):
                # an object trusted code made when every callable that ran is trusted
                target = produced.get(id(func))
                inner = [target] if target is not None else callees(func, depth + 1)
                # (none ran at all: a plain type dill fetched by name, `_load_type('slice')(0, 1, 1)`)
                if inner is not None and all(policy.judge(r.module, r.name, CALLED).severity is None for r in inner):
                    return []
                return None
            target = produced.get(id(value))
            if target is not None:
                return [target]
            role = policy.role(func.module, func.name)
            if role in (pol.IMPORT, pol.GETATTR):
                return None  # fetched a name the scanner could not work out
            if role == pol.TYPE_BY_NAME:
                args = value.args if type(value.args) is tuple else ()
                return [] if args and pol.type_by_name_is_plain(args[0]) else None
            if func.name in ("partial", "partialmethod") and func.module in ("functools", "_functools"):
                args = value.args if type(value.args) is tuple else ()
                found = callees(args[0], depth + 1) if args else None
                state = (value.planted or {}).get(STATE)
                if state:  # BUILD gave the partial another func (protocol 2+ pickles do so)
                    replaced = callees(state[0], depth + 1)
                    found = None if found is None or replaced is None else found + replaced
                return found
            if role == pol.BUILD_CLASS:
                return [func]  # a class built at load time: reported on its own
            verdict = policy.judge(func.module, func.name, CALLED)
            if verdict.severity is None:
                return []  # an object a trusted callable made: calling it runs that object's own class code
            return None
        if isinstance(value, Unknown):
            return None
        return []  # plain data: calling it raises, and runs nothing

    def called(value: object, offset: int, why: str) -> None:
        """`value` is called by the load: judge what runs; fail closed when unknown."""
        found = callees(value)
        if found is None:
            for ref in reachable_globals(value):
                if (ref.module, ref.name) not in _OBJECT:
                    ref.uses |= CALLED
            result.dynamic_calls.append(Call(value, Unknown(why), "indirect", offset))
            return
        for ref in found:
            if (ref.module, ref.name) not in _OBJECT:
                ref.uses |= CALLED

    for ref in facts.globals:
        role = policy.role(ref.module, ref.name)
        obs = observer_of(ref)
        if role == pol.INSTANTIATE:
            first: set[int] = set()
            for call in calls_of(ref):
                args = call.args if isinstance(call.args, tuple) else ()
                if args and isinstance(args[0], GlobalRef):
                    args[0].uses |= NEW
                    first.add(id(args[0]))
                if len(args) > 1 and isinstance(args[1], GlobalRef) and (args[1].module, args[1].name) not in _OBJECT:
                    args[1].uses |= CALLED  # copyreg._reconstructor runs base.__init__(obj, state)
                    base = args[1]
                    if len(args) > 2 and id(base) not in result.suspicious \
                            and not policy.is_exactly_allowed(base.module, base.name):
                        why = _suspicious_args(Call(base, args[2:], "reduce", call.offset))
                        if why:
                            result.suspicious[id(base)] = (call, why)
            for value in obs.values if obs is not None else ():
                if isinstance(value, GlobalRef) and id(value) not in first:
                    value.uses |= NEW | CALLED  # past the kept calls: assume the worst use
            if obs is None and ref.ncalls > len(ref.calls):
                for arg in ref.arg_refs:
                    if (arg.module, arg.name) not in _OBJECT:
                        arg.uses |= NEW | CALLED
        elif role == pol.BUILD_CLASS:
            for call in calls_of(ref):
                _class_built(ref, call, policy, issues, called)
        elif role == pol.SHARED:
            # a Logger pickles as getLogger(name) and nothing more: state, items or appends given
            # to what it returns rewrite the process's logging (handlers, filters, disabled)
            for call in calls_of(ref):
                if call.mutated:
                    issues.append(Issue("pickle/mutation", u.mutation,
                                        f"The pickle changes the process-wide object '{ref.module}.{ref.name}' returns "
                                        "(its handlers, filters or state), which a model never needs", call.offset,
                                        ref.module, ref.name, call))
        elif role in (pol.CALL_FIRST, pol.MAPPING, pol.LOOKUP, pol.STATE):
            for value in obs.values if obs is not None else ref.arg_refs:
                called(value, ref.offset, f"called by {ref.module}.{ref.name}")
            if obs is not None and obs.dropped:
                issues.append(Issue("pickle/blind", u.blind, f"'{ref.module}.{ref.name}' is handed more callables "
                                    "than the scanner keeps", ref.offset, ref.module, ref.name))
        elif ref.arg_refs and role not in (pol.STORE, pol.GETATTR, pol.IMPORT, pol.NESTED):
            if policy.judge(ref.module, ref.name, CALLED).severity is None:
                # a trusted callable is assumed to call the names it is handed
                for arg in ref.arg_refs:
                    if (arg.module, arg.name) not in _OBJECT:
                        arg.uses |= CALLED
        if obs is not None:
            if obs.trusted and not role:
                for value in obs.values:
                    called(value, ref.offset, f"handed to {ref.module}.{ref.name}")
            for offset, why in obs.blind:
                issues.append(Issue("pickle/blind", u.blind, why, offset, ref.module, ref.name))
            if obs.suspicious:
                result.suspicious[id(ref)] = obs.suspicious[0]
            for item in obs.class_builds:
                if role == pol.INSTANTIATE:  # a planted method base.__init__ calls
                    called(item, ref.offset, f"state handed by {ref.module}.{ref.name} to a base class initialiser")
                else:
                    _class_built(ref, item, policy, issues, called)

    # calls of values computed at load time (REDUCE on a call result, a planted method)
    for call in facts.dynamic_calls:
        target = produced.get(id(call.func))
        if target is not None:
            target.uses |= CALLED
            continue
        found = callees(call.func)
        if found is None:
            result.dynamic_calls.append(call)
            for ref in reachable_globals(call.func):
                if (ref.module, ref.name) not in _OBJECT:
                    ref.uses |= CALLED
            continue
        for ref in found:
            if (ref.module, ref.name) not in _OBJECT:
                ref.uses |= CALLED
            if policy.judge(ref.module, ref.name, CALLED).severity is not None:
                result.dynamic_calls.append(call)
        if type(call.func) is Call:
            # an object trusted code made is called (its class's __call__): like any trusted
            # callable it may call what it is handed (joblib's Parallel()([(f, args, {})]) does)
            for ref in reachable_globals(call.args, 3):
                if (ref.module, ref.name) not in _OBJECT:
                    ref.uses |= CALLED
    if facts.dropped_events:
        issues.append(Issue("pickle/blind", u.blind, f"{facts.dropped_events} dynamic calls, rewrites or blind uses "
                            "past the ones the scanner keeps were not judged", None))

    # the load rewrote an imported object (a class, a function, a module, the unpickler's tables)
    for offset, target, bit, detail in facts.mutations:
        issue = _mutation_issue(policy, target, bit, offset, detail)
        issues.append(issue)
    for offset, why in facts.blind:
        issues.append(Issue("pickle/blind", u.blind, f"Security-relevant use of a value the scanner did not keep: {why}",
                            offset))
    return result


#: modules whose objects are the interpreter's or the unpickler's own machinery
_MACHINERY = ("builtins", "__builtin__", "sys", "copyreg", "copy_reg", "_compat_pickle", "pickle", "_pickle",
              "importlib", "_frozen_importlib", "_frozen_importlib_external", "types", "gc", "os", "posix")


def _mutation_issue(policy: pol.Policy, target: GlobalRef, bit: int, offset: int, detail: object = None) -> Issue:
    r = policy.resolve(target.module, target.name)
    what = {MUT_BUILD: "gives state to (BUILD)", 2: "sets items of (SETITEM)", 4: "appends to", 8: "adds to"}.get(
        bit & -bit, "changes")
    severity = policy.unknown.mutation
    machinery = r.module.split(".")[0] in _MACHINERY or target.module.split(".")[0] in _MACHINERY
    plants = bit & MUT_BUILD and _plants_callable(detail, _symbolic)
    if machinery or plants:
        severity = Severity.CRITICAL
    kind = "a module" if r.is_module else "a class" if policy.is_class(r) else "an imported object"
    return Issue("pickle/mutation", severity,
                 f"The pickle {what} {kind} it imported ({target.module}.{target.name}): loading rewrites code or "
                 "the unpickler's tables, which a model never needs", offset, target.module, target.name)


def _plants_callable(state: object, symbolic) -> bool:
    attributes, blind = _state_attributes(state)
    return bool(blind) or any(symbolic(value) for _, value in attributes)


def _class_built(ref: GlobalRef, call: Call, policy: pol.Policy, issues: list, called) -> None:
    """type(name, bases, namespace): Python calls the namespace's dunders by itself, and the bases'
    __init_subclass__ and the values' __set_name__ while the class is made."""
    args = call.args if isinstance(call.args, tuple) else None
    if args is not None and len(args) < 3:
        return
    bases = args[1] if args is not None else None
    namespace = args[2] if args is not None else None
    issues.append(Issue("pickle/class-built", Severity.HIGH,
                        f"'{ref.module}.{ref.name}' builds a class at load time", call.offset, ref.module, ref.name, call))
    for base in bases if isinstance(bases, (tuple, list)) else (bases,) if bases is not None else ():
        if isinstance(base, GlobalRef):
            base.uses |= CALLED | BUILT
    if isinstance(namespace, PDict):
        for key, value in namespace:
            if isinstance(value, (GlobalRef, Call, Unknown)):
                called(value, call.offset, f"method {key!s} of a class built at load time")
    elif namespace is not None:
        issues.append(Issue("pickle/blind", policy.unknown.blind,
                            "a class is built from a namespace the scanner cannot read", call.offset, ref.module, ref.name))


def _attribute_global(call: Call, policy: pol.Policy) -> GlobalRef | None:
    """getattr(owner, "attr") as the global `owner.attr`, when both are static."""
    args = call.args if isinstance(call.args, tuple) else ()
    if len(args) != 2 or not isinstance(args[1], str) or not args[1].isidentifier():
        return None
    if args[1].startswith("__") and args[1].endswith("__"):
        return None  # an introspection walk: getattr stays judged as itself
    owner = _owner_class(args[0], policy)
    if owner is None:
        return None
    name = f"{owner.name}.{args[1]}" if owner.name else args[1]
    return GlobalRef(owner.module, name, call.offset, "getattr()")


def _owner_class(value: object, policy: pol.Policy) -> GlobalRef | None:
    """The class (or module-level name) whose attribute getattr reads: a global itself, or the
    class of an object the pickle built from one."""
    if isinstance(value, GlobalRef):
        return value
    if isinstance(value, Call) and isinstance(value.func, GlobalRef):
        func = value.func
        args = value.args if isinstance(value.args, tuple) else ()
        if policy.role(func.module, func.name) == pol.INSTANTIATE:
            return args[0] if args and isinstance(args[0], GlobalRef) else None
        if value.kind in ("newobj", "newobj_ex") or (
                value.kind in ("reduce", "inst", "obj") and policy.is_class(policy.resolve(func.module, func.name))):
            return func
    return None


#: values a walk for the names inside a value looks at (each shared value once)
_WALK_BUDGET = 100_000


def reachable_globals(value: object, depth: int = 6) -> list[GlobalRef]:
    """GlobalRefs inside a value (for callables built at load time); each shared value is
    walked once, and at most _WALK_BUDGET values (a DUP bomb costs no more)."""
    out: list[GlobalRef] = []
    stack = [(value, depth)]
    seen: dict[int, int] = {}  # id -> the most depth left it was walked with
    while stack and len(seen) < _WALK_BUDGET:
        v, d = stack.pop()
        if d < 0 or seen.get(id(v), -1) >= d:
            continue
        if isinstance(v, (GlobalRef, Call, PDict, tuple, list, PSet, Unknown)):
            seen[id(v)] = d
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
