"""What a Jinja2 template can reach when a loader renders it, read with Jinja2's own parser.

Chat templates (GGUF `tokenizer.chat_template`, ...) are rendered by the loader. Rendered in
a plain `jinja2.Environment` (llama-cpp-python before 0.2.72, CVE-2024-34359), a template
can walk from any Python object to `os`: `cycler.__init__.__globals__.os.popen(...)`. Every
such escape goes through attribute names Python keeps for its internals (`__globals__`,
`__class__`, `__subclasses__`, ...), through frame attributes (`gi_frame.f_globals`), or
through Jinja's own objects (`self._TemplateReference__context`, `lipsum`, `cycler`,
`joiner`, `namespace`, Flask's `request`/`config`) used as values rather than called.

The template is parsed, never rendered. Attribute names are found wherever the renderer
takes them: `x.name`, `x["name"]` (Jinja falls back to getattr), `|attr(name)`, the
`attribute=` of `map`/`selectattr`/`sort`/..., the fields of a `str.format` string. Names
assembled at render time (`"__cla" ~ "ss__"`, `|join`, `|reverse`, `|replace`, `|format`,
`"%c" % 95`, escapes, dict keys, macro arguments, loop variables, `set` variables) are
computed by a small static evaluator; an attribute name that is assembled from strings but
cannot be computed is reported too. Real templates (loops, `namespace()`,
`raise_exception`, macros, `tojson`) use none of this.
"""

from __future__ import annotations

import itertools
import json
import re
import string
from dataclasses import dataclass
from typing import Any, Iterable

from modelscan_core.model import Severity

#: attribute names that reach interpreter internals without dunders (frames, code, functions)
FRAME_ATTRS = frozenset({
    "gi_frame", "gi_code", "gi_yieldfrom", "ag_frame", "ag_code", "cr_frame", "cr_code", "cr_await",
    "f_globals", "f_locals", "f_builtins", "f_back", "f_code", "tb_frame", "tb_next", "co_consts",
    "func_globals", "func_code", "im_func", "im_self", "mro",
})
#: attributes named like the modules an escape ends in (only reachable after one of the above)
MODULE_ATTRS = frozenset({"os", "sys", "subprocess", "builtins", "importlib", "popen", "import_module", "modules"})
#: globals of a Jinja environment (and of Flask's) whose use as a value reaches Python objects
SPECIAL_GLOBALS = frozenset({
    "cycler", "joiner", "lipsum", "namespace", "range", "dict", "self", "request", "config", "session", "g",
    "url_for", "get_flashed_messages", "raise_exception", "strftime_now",
})
#: names a template can only mean as Python's own (no loader puts them in the context)
PYTHON_NAMES = frozenset({"os", "sys", "subprocess", "builtins", "importlib", "eval", "exec", "open", "getattr",
                          "globals", "locals", "vars", "compile", "__import__", "__builtins__"})
#: filters that look attributes up by a name given as an argument
_ATTRIBUTE_FILTERS = frozenset({"map", "selectattr", "rejectattr", "sort", "groupby", "sum", "unique", "min", "max"})
#: filters that turn values into strings or pick characters out of them
_STRING_FILTERS = frozenset({"join", "reverse", "replace", "format", "string", "lower", "upper", "title", "capitalize",
                             "trim", "first", "last", "list", "center", "urlencode", "pprint", "tojson"})
_MANGLED = re.compile(r"_[A-Za-z0-9]+__\w+\Z")
_DUNDER = re.compile(r"__\w+__\Z")
_MAX_VALUES = 64
_MAX_STR = 4096


@dataclass(frozen=True)
class TemplateIssue:
    severity: Severity
    rule_id: str
    what: str  # the attribute or name, for the report's operator
    description: str


class TemplateUnreadable(ValueError):
    """Jinja2 cannot parse the template (so it cannot render it either)."""


def judge_attribute(name: str) -> Severity | None:
    """How bad it is for a rendered template to look up attribute `name`."""
    if _DUNDER.match(name) or name in FRAME_ATTRS or _MANGLED.match(name):
        return Severity.CRITICAL
    if name in MODULE_ATTRS:
        return Severity.HIGH
    return None


def analyse(source: str) -> list[TemplateIssue]:
    """Every way the template reaches past its data; empty for the templates real models ship.

    Results are remembered by the template's sha256 for the life of the process: a model
    cache holds many files (quantizations, shards) that carry the same template.
    """
    import hashlib

    from jinja2 import TemplateSyntaxError

    key = hashlib.sha256(source.encode("utf-8", "surrogatepass")).digest()
    known = _RESULTS.get(key)
    if known is None:
        try:
            known = tuple(_Analysis(_environment().parse(source)).run())
        except TemplateSyntaxError as exc:
            known = f"line {exc.lineno}: {exc.message}"
        if len(_RESULTS) >= _RESULTS_MAX:
            _RESULTS.pop(next(iter(_RESULTS)))
        _RESULTS[key] = known
    if isinstance(known, str):
        raise TemplateUnreadable(known)
    return list(known)


_RESULTS: dict[bytes, tuple[TemplateIssue, ...] | str] = {}
_RESULTS_MAX = 1024


_ENV = None


def _environment():
    """A parser that accepts what loaders accept: loop controls, `do`, and transformers'
    `{% generation %}` block (the content is analysed like any other)."""
    global _ENV
    if _ENV is None:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension

        class Generation(Extension):
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.Scope(body, lineno=lineno)

        _ENV = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do", Generation])
    return _ENV


class _Dynamic:
    """Marker: part of a value is only known at render time."""


DYNAMIC = _Dynamic()


class _Dict(tuple):
    """A dict literal's (key, value) pairs, hashable so it can sit in a set of values."""


class _Analysis:
    def __init__(self, tree):
        from jinja2 import nodes

        self.n = nodes
        self.tree = tree
        self.bindings: dict[str, set] = {}
        self.dynamic_names: set[str] = set()
        self.local_names: set[str] = set()
        self.macros: dict[str, Any] = {}
        self.issues: dict[tuple[str, str], TemplateIssue] = {}
        self._cache: dict[int, tuple[frozenset, bool]] = {}

    # -- results -------------------------------------------------------------------

    def _issue(self, severity: Severity, rule: str, what: str, description: str) -> None:
        key = (rule, what)
        old = self.issues.get(key)
        if old is None or old.severity < severity:
            self.issues[key] = TemplateIssue(severity, rule, what, description)

    def _attribute(self, name: str, how: str) -> None:
        severity = judge_attribute(name)
        if severity is not None:
            self._issue(severity, "jinja/attribute", name, f"looks up attribute {name!r} ({how}): a path from template "
                        "objects to Python internals (CVE-2024-34359)")

    # -- the walk ------------------------------------------------------------------

    def run(self) -> list[TemplateIssue]:
        n = self.n
        all_nodes = list(self.tree.find_all(n.Node))
        for node in all_nodes:
            if isinstance(node, n.Name) and node.ctx in ("store", "param"):
                self.local_names.add(node.name)
            elif isinstance(node, n.Macro):
                self.macros[node.name] = node
                self.local_names.add(node.name)
        self._bind(all_nodes)
        for node in all_nodes:
            self._check(node)
        for node in all_nodes:
            if isinstance(node, n.Expr):
                for value in self.values(node)[0]:
                    self._string_anywhere(value)
            if isinstance(node, n.Keyword):
                self._string_anywhere(node.key)
        return sorted(self.issues.values(), key=lambda i: (-i.severity, i.rule_id, i.what))

    def _string_anywhere(self, value: Any) -> None:
        if isinstance(value, str) and judge_attribute(value) is Severity.CRITICAL and ("jinja/attribute", value) not in self.issues:
            self._issue(Severity.CRITICAL, "jinja/internal-name", value,
                        f"builds the string {value!r}, the name of a Python internal that template escapes use")

    def _check(self, node) -> None:
        n = self.n
        if isinstance(node, n.Getattr):
            self._attribute(node.attr, f"`.{node.attr}`")
        elif isinstance(node, n.Getitem):
            self._key(node.arg, "`[...]`, which falls back to getattr")
        elif isinstance(node, n.Filter):
            self._filter(node)
        elif isinstance(node, n.Call):
            self._call(node)
        elif isinstance(node, n.Name) and node.ctx == "load":
            self._name(node)
        elif isinstance(node, (n.Include, n.Import, n.FromImport, n.Extends)):
            self._issue(Severity.HIGH, "jinja/template-load", type(node).__name__.lower(),
                        f"{type(node).__name__.lower()} loads another template through the renderer's loader (a file read)")

    def _key(self, arg, how: str) -> None:
        values, dynamic = self.values(arg)
        for value in values:
            if isinstance(value, str):
                self._attribute(value, how)
        if dynamic and self._assembled(arg):
            self._issue(Severity.HIGH, "jinja/computed-attribute", "computed",
                        f"looks up an attribute or key assembled from strings at render time ({how}): the name cannot be "
                        "known before rendering")

    def _filter(self, node) -> None:
        if node.name == "attr":
            if node.args:
                values, dynamic = self.values(node.args[0])
                for value in values:
                    if isinstance(value, str):
                        self._attribute(value, "`|attr(...)`")
                if dynamic:
                    self._issue(Severity.HIGH, "jinja/computed-attribute", "attr",
                                "`|attr(...)` with an attribute name computed at render time")
            return
        if node.name in _ATTRIBUTE_FILTERS:
            args = list(node.args) + [kw.value for kw in node.kwargs]
            if node.name == "map" and node.args:
                # map('attr', name) applies the attr filter to every item
                names, _ = self.values(node.args[0])
                if "attr" in names:
                    for arg in node.args[1:]:
                        self._key(arg, "`|map('attr', ...)`")
            for arg in args:
                values, _ = self.values(arg)
                for value in values:
                    if isinstance(value, str):
                        for part in value.split("."):
                            self._attribute(part, f"`|{node.name}(attribute=...)`")

    def _call(self, node) -> None:
        n = self.n
        callee = node.node
        if isinstance(callee, n.Getattr) and callee.attr in ("format", "format_map"):
            values, dynamic = self.values(callee.node)
            for value in values:
                if isinstance(value, str):
                    for field in _format_fields(value):
                        self._attribute(field, "a `str.format` field")
            if dynamic:
                self._issue(Severity.HIGH, "jinja/dynamic-format", "format",
                            "calls `.format` on a string known only at render time (format fields look attributes up)")

    def _name(self, node) -> None:
        name = node.name
        if name in self.local_names:
            return
        parent = self._parents().get(id(node))
        n = self.n
        if name in SPECIAL_GLOBALS:
            called = isinstance(parent, n.Call) and parent.node is node
            tested = isinstance(parent, n.Test) and parent.node is node and parent.name in ("defined", "undefined")
            if name == "self" or not (called or tested):
                self._issue(Severity.CRITICAL, "jinja/global-internals", name,
                            f"uses the renderer's global `{name}` as a value rather than calling it: its attributes lead "
                            "to Python internals (`.__init__.__globals__`, `_TemplateReference__context`)")
        elif name in PYTHON_NAMES or _DUNDER.match(name):
            severity = Severity.CRITICAL if _DUNDER.match(name) else Severity.HIGH
            self._issue(severity, "jinja/python-name", name, f"names Python's `{name}`, which no chat renderer provides "
                        "to a template")

    _parent_map: dict[int, Any] | None = None

    def _parents(self) -> dict[int, Any]:
        if self._parent_map is None:
            self._parent_map = {}
            stack = [self.tree]
            while stack:
                node = stack.pop()
                for child in node.iter_child_nodes():
                    self._parent_map[id(child)] = node
                    stack.append(child)
        return self._parent_map

    def _assembled(self, node) -> bool:
        """The expression builds a string from parts rather than naming a value: `~`, a string
        filter or method, or `+`/`*`/`%` with a string literal (`messages[i - 1]` is not)."""
        n = self.n
        subs = list(itertools.chain([node], node.find_all(n.Expr)))
        for sub in subs:
            if isinstance(sub, n.Concat) or (isinstance(sub, n.Filter) and sub.name in _STRING_FILTERS):
                return True
            if isinstance(sub, n.Call) and isinstance(sub.node, n.Getattr) and sub.node.attr in _METHODS:
                return True
        operators = any(isinstance(sub, (n.Add, n.Mul, n.Mod)) for sub in subs)
        return operators and any(isinstance(sub, n.Const) and isinstance(sub.value, str) for sub in subs)

    # -- variables -----------------------------------------------------------------

    def _bind(self, all_nodes: list) -> None:
        """Static values of `set`, `for`, `with`, macro and caller parameters, to a fixpoint."""
        n = self.n
        for _round in range(6):
            before = {k: len(v) for k, v in self.bindings.items()}
            before_dyn = len(self.dynamic_names)
            self._cache.clear()
            for node in all_nodes:
                if isinstance(node, n.Assign):
                    self._assign(node.target, self.values(node.node))
                elif isinstance(node, n.AssignBlock):
                    self._assign(node.target, self._block_value(node.body))
                elif isinstance(node, n.For):
                    values, dynamic = self.values(node.iter)
                    items: set = set()
                    for value in values:
                        if isinstance(value, _Dict):
                            items.update(k for k, _ in value)
                        elif isinstance(value, (tuple, str)):
                            items.update(value[:_MAX_VALUES])
                        else:
                            dynamic = True
                    self._assign(node.target, (frozenset(items), dynamic))
                elif isinstance(node, n.With):
                    for target, value in zip(node.targets, node.values):
                        self._assign(target, self.values(value))
                elif isinstance(node, n.Call) and isinstance(node.node, n.Name):
                    self._bind_call(node)
            after = {k: len(v) for k, v in self.bindings.items()}
            if after == before and len(self.dynamic_names) == before_dyn:
                break
        self._cache.clear()

    def _bind_call(self, call) -> None:
        n = self.n
        macro = self.macros.get(call.node.name)
        if macro is not None:
            params = [p.name for p in macro.args]
            for param, arg in zip(params, call.args):
                self._assign_name(param, self.values(arg))
            for kw in call.kwargs:
                if kw.key in params:
                    self._assign_name(kw.key, self.values(kw.value))
            for param, default in zip(params[len(params) - len(macro.defaults):], macro.defaults):
                self._assign_name(param, self.values(default))
        elif call.node.name == "caller":
            for block in self.tree.find_all(n.CallBlock):
                for param, arg in zip([p.name for p in block.args], call.args):
                    self._assign_name(param, self.values(arg))

    def _assign(self, target, value: tuple[frozenset, bool]) -> None:
        n = self.n
        if isinstance(target, n.Name):
            self._assign_name(target.name, value)
        elif isinstance(target, n.NSRef):
            self._assign_name(f"{target.name}.{target.attr}", value)
        elif isinstance(target, n.Tuple):
            values, dynamic = value
            for i, item in enumerate(target.items):
                parts = {v[i] for v in values if isinstance(v, tuple) and not isinstance(v, _Dict) and len(v) > i}
                self._assign(item, (frozenset(parts), dynamic or len(parts) < len(values)))

    def _assign_name(self, name: str, value: tuple[frozenset, bool]) -> None:
        values, dynamic = value
        bound = self.bindings.setdefault(name, set())
        for v in values:
            if len(bound) < _MAX_VALUES:
                bound.add(v)
        if dynamic:
            self.dynamic_names.add(name)

    def _block_value(self, body) -> tuple[frozenset, bool]:
        n = self.n
        pieces: list[tuple[frozenset, bool]] = []
        for stmt in body:
            if not isinstance(stmt, n.Output):
                return frozenset(), True
            for expr in stmt.nodes:
                pieces.append((frozenset({expr.data}), False) if isinstance(expr, n.TemplateData) else self.values(expr))
        return _combine(pieces, lambda parts: "".join(map(_to_str, parts)))

    # -- static values -------------------------------------------------------------

    def values(self, node) -> tuple[frozenset, bool]:
        """(possible static values, whether a render-time value may also flow in)."""
        key = id(node)
        cached = self._cache.get(key)
        if cached is None:
            self._cache[key] = (frozenset(), True)  # cycles read as dynamic
            try:
                cached = self._values(node)
            except (TypeError, ValueError, IndexError, KeyError, OverflowError, ZeroDivisionError, RecursionError):
                cached = (frozenset(), True)
            self._cache[key] = cached
        return cached

    def _values(self, node) -> tuple[frozenset, bool]:
        n = self.n
        if isinstance(node, n.Const):
            return frozenset({node.value}), False
        if isinstance(node, n.TemplateData):
            return frozenset({node.data}), False
        if isinstance(node, n.Name):
            bound = self.bindings.get(node.name)
            if bound is None:
                return frozenset(), True
            return frozenset(bound), node.name in self.dynamic_names
        if isinstance(node, n.Getattr) and isinstance(node.node, n.Name):
            ref = f"{node.node.name}.{node.attr}"
            if ref in self.bindings:
                return frozenset(self.bindings[ref]), ref in self.dynamic_names
            return frozenset(), True
        if isinstance(node, (n.List, n.Tuple)):
            return _combine([self.values(i) for i in node.items], tuple)
        if isinstance(node, n.Dict):
            keys = [self.values(p.key) for p in node.items]
            vals = [self.values(p.value) for p in node.items]
            return _combine(keys + vals, lambda parts: _Dict(zip(parts[: len(keys)], parts[len(keys):])))
        if isinstance(node, n.Concat):
            return _combine([self.values(x) for x in node.nodes], lambda parts: _cap("".join(map(_to_str, parts))))
        if isinstance(node, (n.Add, n.Mul, n.Mod)):
            op = {n.Add: _add, n.Mul: _mul, n.Mod: _mod}[type(node)]
            return _combine([self.values(node.left), self.values(node.right)], lambda p: op(p[0], p[1]))
        if isinstance(node, n.CondExpr):
            a, b = self.values(node.expr1), self.values(node.expr2) if node.expr2 is not None else (frozenset(), False)
            return a[0] | b[0], a[1] or b[1]
        if isinstance(node, n.Getitem):
            if isinstance(node.arg, n.Slice):
                parts = [self.values(node.node)] + [self.values(x) if x is not None else (frozenset({None}), False)
                                                    for x in (node.arg.start, node.arg.stop, node.arg.step)]
                return _combine(parts, lambda p: _cap(p[0][slice(p[1], p[2], p[3])]))
            return _combine([self.values(node.node), self.values(node.arg)], lambda p: _index(p[0], p[1]))
        if isinstance(node, n.Filter):
            return self._filter_value(node)
        if isinstance(node, n.Call):
            return self._call_value(node)
        return frozenset(), True

    def _filter_value(self, node) -> tuple[frozenset, bool]:
        func = _FILTERS.get(node.name)
        if func is None or node.node is None:
            return frozenset(), True
        args = [self.values(node.node)] + [self.values(a) for a in node.args]
        kwargs = [(kw.key, self.values(kw.value)) for kw in node.kwargs]
        names = [k for k, _ in kwargs]
        return _combine(args + [v for _, v in kwargs],
                        lambda p: _cap(func(*p[: len(args)], **dict(zip(names, p[len(args):])))))

    def _call_value(self, node) -> tuple[frozenset, bool]:
        n = self.n
        callee = node.node
        args = [self.values(a) for a in node.args]
        kwargs = [(kw.key, self.values(kw.value)) for kw in node.kwargs]
        names = [k for k, _ in kwargs]
        if isinstance(callee, n.Name) and callee.name == "dict" and not node.args and "dict" not in self.local_names:
            return _combine([v for _, v in kwargs], lambda p: _Dict(zip(names, p)))
        if isinstance(callee, n.Getattr):
            method = callee.attr
            if method not in _METHODS:
                return frozenset(), True
            owner = self.values(callee.node)
            return _combine([owner] + args + [v for _, v in kwargs],
                            lambda p: _cap(_METHODS[method](p[0], *p[1: 1 + len(args)], **dict(zip(names, p[1 + len(args):])))))
        return frozenset(), True


# -- the evaluator's operations (mirroring what Jinja2 does at render time) ------------


def _combine(parts: list[tuple[frozenset, bool]], build) -> tuple[frozenset, bool]:
    dynamic = any(d for _, d in parts)
    if any(not values for values, _ in parts):
        return frozenset(), True
    out = set()
    for combo in itertools.islice(itertools.product(*[sorted(v, key=repr) for v, _ in parts]), _MAX_VALUES):
        try:
            value = build(list(combo))
        except (TypeError, ValueError, IndexError, KeyError, OverflowError, ZeroDivisionError, AttributeError):
            dynamic = True
            continue
        if value is DYNAMIC:
            dynamic = True
        else:
            out.add(value)
    return frozenset(out), dynamic


def _cap(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _MAX_STR:
        return DYNAMIC
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, (str, int, float, bool, tuple, type(None))):
        return value
    return DYNAMIC


def _to_str(value: Any) -> str:
    if isinstance(value, _Dict):
        return str(dict(value))
    if isinstance(value, tuple):
        return str(list(value))
    return "" if value is None else str(value)


def _add(a, b):
    if isinstance(a, str) and isinstance(b, str) or isinstance(a, tuple) and isinstance(b, tuple):
        return _cap(a + b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    return DYNAMIC


def _mul(a, b):
    if isinstance(a, (str, tuple)) and isinstance(b, int) and 0 <= len(a) * b <= _MAX_STR:
        return a * b
    if isinstance(b, (str, tuple)) and isinstance(a, int) and 0 <= len(b) * a <= _MAX_STR:
        return b * a
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a) < 2**32 and abs(b) < 2**32:
        return a * b
    return DYNAMIC


def _mod(a, b):
    if isinstance(a, str):
        return _cap(a % (tuple(b) if isinstance(b, tuple) and not isinstance(b, _Dict) else b))
    if isinstance(a, int) and isinstance(b, int):
        return a % b
    return DYNAMIC


def _index(container, key):
    if isinstance(container, _Dict):
        return dict(container)[key]
    if isinstance(container, (str, tuple)) and isinstance(key, int):
        return container[key]
    return DYNAMIC


def _seq(value) -> tuple:
    if isinstance(value, _Dict):
        return tuple(k for k, _ in value)
    if isinstance(value, (tuple, str)):
        return tuple(value)
    raise TypeError


def _join(value, d="", attribute=None):
    if attribute is not None:
        return DYNAMIC
    return d.join(_to_str(x) for x in _seq(value))


def _reverse(value):
    return value[::-1] if isinstance(value, str) else tuple(reversed(_seq(value)))


def _replace(value, old, new, count=None):
    return str(value).replace(old, new, -1 if count is None else count)


def _format_filter(value, *args, **kwargs):
    return str(value) % (kwargs or args)


def _tojson(value, indent=None):
    plain = dict(value) if isinstance(value, _Dict) else list(value) if isinstance(value, tuple) else value
    return json.dumps(plain, indent=indent)


_FILTERS = {
    "join": _join,
    "reverse": _reverse,
    "replace": _replace,
    "format": _format_filter,
    "lower": lambda v: str(v).lower(),
    "upper": lambda v: str(v).upper(),
    "title": lambda v: str(v).title(),
    "capitalize": lambda v: str(v).capitalize(),
    "trim": lambda v, chars=None: str(v).strip(chars),
    "string": _to_str,
    "safe": lambda v: v,
    "e": lambda v: v,
    "escape": lambda v: v,
    "list": lambda v: _seq(v),
    "first": lambda v: _seq(v)[0],
    "last": lambda v: _seq(v)[-1],
    "sort": lambda v, reverse=False, case_sensitive=False, attribute=None: (
        DYNAMIC if attribute is not None else tuple(sorted(_seq(v), reverse=reverse))),
    "unique": lambda v, case_sensitive=False, attribute=None: DYNAMIC if attribute is not None else tuple(dict.fromkeys(_seq(v))),
    "length": lambda v: len(_seq(v)),
    "count": lambda v: len(_seq(v)),
    "int": lambda v, default=0, base=10: int(v, base) if isinstance(v, str) else int(v),
    "items": lambda v: tuple(v) if isinstance(v, _Dict) else DYNAMIC,
    "dictsort": lambda v, *a, **k: tuple(sorted(v)) if isinstance(v, _Dict) else DYNAMIC,
    "tojson": _tojson,
    "center": lambda v, width=80: str(v).center(width),
    "default": lambda v, *a, **k: v,
    "d": lambda v, *a, **k: v,
}

_METHODS = {
    "format": lambda s, *a, **k: s.format(*a, **k) if isinstance(s, str) and _plain_format(s) else DYNAMIC,
    "join": lambda s, seq: s.join(_to_str(x) for x in _seq(seq)),
    "replace": lambda s, old, new, count=-1: s.replace(old, new, count),
    "lower": lambda s: s.lower(),
    "upper": lambda s: s.upper(),
    "title": lambda s: s.title(),
    "capitalize": lambda s: s.capitalize(),
    "swapcase": lambda s: s.swapcase(),
    "strip": lambda s, chars=None: s.strip(chars),
    "lstrip": lambda s, chars=None: s.lstrip(chars),
    "rstrip": lambda s, chars=None: s.rstrip(chars),
    "split": lambda s, sep=None, maxsplit=-1: tuple(s.split(sep, maxsplit)),
    "items": lambda d: tuple(d) if isinstance(d, _Dict) else DYNAMIC,
    "keys": lambda d: tuple(k for k, _ in d) if isinstance(d, _Dict) else DYNAMIC,
    "values": lambda d: tuple(v for _, v in d) if isinstance(d, _Dict) else DYNAMIC,
    "get": lambda d, k, default=None: dict(d).get(k, default) if isinstance(d, _Dict) else DYNAMIC,
}


def _plain_format(s: str) -> bool:
    """A format string whose fields are plain positions or names (no attribute lookups)."""
    return all(judge_attribute(f) is None for f in _format_fields(s))


def _format_fields(s: str) -> Iterable[str]:
    """Attribute and item names a `str.format` string looks up (`{0.__class__}`, `{x[__y__]}`)."""
    try:
        parsed = list(string.Formatter().parse(s))
    except ValueError:
        return []
    out: list[str] = []
    for _text, field, spec, _conv in parsed:
        for text in (field, spec):
            if text:
                out.extend(part for part in re.split(r"[.\[\]{}]", text) if part)
    return out
