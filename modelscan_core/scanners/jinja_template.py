"""What a Jinja2 template can reach when a loader renders it, read with Jinja2's own parser.

Chat templates (GGUF `tokenizer.chat_template`, ...) are rendered by the loader. Rendered in
a plain `jinja2.Environment` (llama-cpp-python before 0.2.72, CVE-2024-34359), a template
can walk from any Python object to `os`: `cycler.__init__.__globals__.os.popen(...)`. Every
such escape looks attributes up by names Python keeps for its internals: dunders
(`__globals__`), private names (`_module`, `_TemplateReference__context`, `_func`), frame
attributes (`gi_frame.f_globals`); or uses Jinja's own objects (`self`, `lipsum`, `cycler`,
`joiner`, `namespace`, Flask's `request`/`config`) as values rather than calling them; or
lets `str.format` do the lookups (the sandbox escapes of CVE-2024-56326 and CVE-2025-27516).

The template is parsed, never rendered. Attribute names are found wherever the renderer
takes them: `x.name`, `x["name"]` (Jinja falls back to getattr), `|attr(name)`, the
`attribute=` of `map`/`selectattr`/`sort`/..., `map('attr', name)`, the fields of a
`str.format` string. Each name is judged by where its value comes from, not only by what
it spells:

- spelled out in the template (a literal, possibly through variables, lists and dicts):
  judged by its text;
- taken from the data the application renders (`messages`, `tools`, loop variables over
  them, their keys and items): the template's author cannot choose it, so it is fine;
- anything the template computes (`"__cla" ~ "ss__"`, `|join`, `|format`, `|replace`,
  `%`, slicing a string, characters harvested from `(()|select|string)`, a macro's output,
  `|attr` of a name built at render time), or a special token the model file itself
  defines (`eos_token`, ...): reported whatever it spells, because no chat template
  needs to compute the name of an attribute, and an escape always must. A small static
  evaluator works out what it spells when it can, to say CRITICAL for a dunder.

Real templates (loops, `namespace()`, `raise_exception`, macros, `tojson`, tool schemas)
look attributes up only by literal names or through their data.
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
#: `str` methods that look attributes up by the fields of the string (the sandbox intercepts them)
FORMAT_METHODS = frozenset({"format", "format_map"})
_MANGLED = re.compile(r"_[A-Za-z0-9]+__\w+\Z")
_DUNDER = re.compile(r"__\w+__\Z")
_PRIVATE = re.compile(r"_\w*\Z")
#: names the loader fills from the model file itself (llama-cpp-python: from the GGUF vocabulary;
#: transformers: every special token), so the file's author chooses their text
_TOKEN_NAME = re.compile(r"\w*_tokens?\Z")
_MAX_VALUES = 64
_MAX_ROUNDS = 16
_MAX_STR = 4096

# where a value comes from, besides the static values the evaluator knows
DATA = "data"  # the application's render-time data (messages, tools, ...), navigated
NUMBER = "number"  # a number or a truth value: never an attribute name
BUILT = "built"  # static values the template built with string operations
COMPUTED = "computed"  # a value the template computes at render time, or the file's own tokens
_UNKNOWN = (frozenset(), frozenset({COMPUTED}))
_NOTHING = (frozenset(), frozenset())  # no binding seen yet (the fixpoint's starting point)
_CHOSEN = frozenset({BUILT, COMPUTED})  # kinds that make a looked-up name the template's choice


@dataclass(frozen=True)
class TemplateIssue:
    severity: Severity
    rule_id: str
    what: str  # the attribute or name, for the report's operator
    description: str


class TemplateUnreadable(ValueError):
    """Jinja2 cannot parse the template (so it cannot render it either), or (`too_deep`) its
    parser ran out of Python stack here: a loader whose stack has more room left renders it."""

    @property
    def too_deep(self) -> bool:
        return str(self) == TOO_DEEP


TOO_DEEP = "nested too deeply for the parser"


def judge_attribute(name: str) -> Severity | None:
    """How bad it is for a rendered template to look up attribute `name`."""
    if _DUNDER.match(name) or name in FRAME_ATTRS or _MANGLED.match(name):
        return Severity.CRITICAL
    if name in MODULE_ATTRS or _PRIVATE.match(name):
        return Severity.HIGH  # Jinja's sandbox refuses every attribute that starts with "_"
    return None


def analyse(source: str, *, trust_known: bool = True) -> list[TemplateIssue]:
    """Every way the template reaches past its data; empty for the templates real models ship.

    Results are remembered by the template's sha256 for the life of the process: a model
    cache holds many files (quantizations, shards) that carry the same template. A published
    template known clean (known_chat_templates.txt, scripts/gen_known_templates.py) is not
    parsed at all, so scanning a file that carries one never imports Jinja2.
    """
    import hashlib

    key = hashlib.sha256(source.encode("utf-8", "surrogatepass")).digest()
    if trust_known and key.hex() in _known_clean():
        return []
    known = _RESULTS.get(key)
    if known is None:
        from jinja2 import TemplateSyntaxError

        try:
            known = tuple(_Analysis(_environment().parse(source)).run())
        except TemplateSyntaxError as exc:
            known = f"line {exc.lineno}: {exc.message}"
        except RecursionError:
            known = TOO_DEEP
        if len(_RESULTS) >= _RESULTS_MAX:
            _RESULTS.pop(next(iter(_RESULTS)))
        _RESULTS[key] = known
    if isinstance(known, str):
        raise TemplateUnreadable(known)
    return list(known)


_RESULTS: dict[bytes, tuple[TemplateIssue, ...] | str] = {}
_RESULTS_MAX = 1024
_KNOWN: frozenset[str] | None = None


def _known_clean() -> frozenset[str]:
    global _KNOWN
    if _KNOWN is None:
        import os

        path = os.path.join(os.path.dirname(__file__), "known_chat_templates.txt")
        try:
            with open(path, encoding="ascii") as f:
                _KNOWN = frozenset(line.strip() for line in f if line.strip() and not line.startswith("#"))
        except OSError:
            _KNOWN = frozenset()
    return _KNOWN


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
    """Marker: the evaluator cannot know this value before rendering."""


DYNAMIC = _Dynamic()


class _Dict(tuple):
    """A dict literal's (key, value) pairs, hashable so it can sit in a set of values."""


Val = tuple  # (frozenset of static values, frozenset of kinds)


class _Analysis:
    def __init__(self, tree):
        from jinja2 import nodes

        self.n = nodes
        self.tree = tree
        self.bindings: dict[str, set] = {}
        self.kinds: dict[str, set] = {}
        self.params: set[str] = set()  # macro and call-block parameters: bound only by calls
        self.widened: set[str] = set()  # names whose values kept growing: only their kind is tracked
        self.local_names: set[str] = set()
        self.macros: dict[str, Any] = {}
        self.issues: dict[tuple[str, str], TemplateIssue] = {}
        self._cache: dict[int, Val] = {}
        self._parent_map: dict[int, Any] | None = None
        self._binding = False  # during `_bind`, a value not known yet is "nothing yet", not "computed"

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
            if isinstance(node, (n.Macro, n.CallBlock)):
                self.params.update(arg.name for arg in node.args)
        self._bind(all_nodes)
        for node in all_nodes:
            self._check(node)
        for node in all_nodes:
            if isinstance(node, n.Expr):
                for value in self.values(node)[0]:
                    self._string_anywhere(value)
            if isinstance(node, n.Keyword):
                self._string_anywhere(node.key)
            if isinstance(node, n.Macro):
                self._string_anywhere(node.name)
        return sorted(self.issues.values(), key=lambda i: (-i.severity, i.rule_id, i.what))

    def _string_anywhere(self, value: Any) -> None:
        if not isinstance(value, str):
            return
        if judge_attribute(value) is Severity.CRITICAL and ("jinja/attribute", value) not in self.issues:
            self._issue(Severity.CRITICAL, "jinja/internal-name", value,
                        f"builds the string {value!r}, the name of a Python internal that template escapes use")
        if "{" in value:
            for field in _format_fields(value):
                if judge_attribute(field) is Severity.CRITICAL:
                    self._issue(Severity.CRITICAL, "jinja/format-string", field,
                                f"holds the format string {_short(value)}, whose field looks up {field!r} when "
                                "`str.format` renders it (a sandbox escape, CVE-2024-56326)")

    def _check(self, node) -> None:
        n = self.n
        if isinstance(node, n.Getattr):
            self._attribute(node.attr, f"`.{node.attr}`")
            if node.attr in FORMAT_METHODS and not self._is_callee(node):
                self._issue(Severity.HIGH, "jinja/format-reference", node.attr,
                            f"takes `.{node.attr}` as a value: calling it later escapes the sandbox's check on "
                            "`str.format` (CVE-2024-56326)")
        elif isinstance(node, n.Getitem):
            if not isinstance(node.arg, n.Slice):
                self._key(node.arg, "`[...]`, which falls back to getattr", node.node)
        elif isinstance(node, n.Filter):
            self._filter(node)
        elif isinstance(node, n.Call):
            self._call(node)
        elif isinstance(node, n.Name) and node.ctx == "load":
            self._name(node)
        elif isinstance(node, (n.Include, n.Import, n.FromImport, n.Extends)):
            self._issue(Severity.HIGH, "jinja/template-load", type(node).__name__.lower(),
                        f"{type(node).__name__.lower()} loads another template through the renderer's loader (a file read)")

    def _key(self, arg, how: str, owner=None) -> None:
        """A name the renderer looks an attribute up by: judged by its text and by its origin.
        `owner`: the expression whose attribute it is, when known."""
        values, kinds = self.values(arg)
        for value in values:
            if isinstance(value, str):
                parts = value.split(".") if "attribute" in how else (value,)
                for part in parts:
                    self._attribute(part, how)
                if owner is not None and FORMAT_METHODS & set(parts) and self._template_string(owner, "|" in how):
                    self._issue(Severity.HIGH, "jinja/format-reference", "format",
                                f"takes `str.format` of a string the template chooses through {how}: calling it later "
                                "escapes the sandbox's check on `str.format` (CVE-2024-56326)")
        if kinds & _CHOSEN and (COMPUTED in kinds or any(isinstance(v, str) for v in values)):
            shown = ", ".join(repr(v) for v in sorted(v for v in values if isinstance(v, str))[:3])
            self._issue(Severity.HIGH, "jinja/computed-attribute", "computed",
                        f"looks up an attribute or key whose name the template computes ({how})"
                        + (f", e.g. {shown}" if shown else "") + ": chat templates look names up literally or "
                        "through their data; computing a name is how escapes hide `__class__` and its kind")

    def _template_string(self, node, items: bool = False) -> bool:
        """`node` (or, with `items`, an item of it) may be a string the template wrote or built,
        not one of its data's: its `format` method formats fields the template chose."""
        values, kinds = self._items(self.values(node)) if items else self.values(node)
        return any(isinstance(v, str) for v in values) or BUILT in kinds

    def _filter(self, node) -> None:
        args = list(node.args)
        kwargs = {kw.key: kw.value for kw in node.kwargs}
        if node.name == "attr":
            if args:
                self._key(args[0], "`|attr(...)`")
                if FORMAT_METHODS & {v for v in self.values(args[0])[0] if isinstance(v, str)}:
                    self._issue(Severity.HIGH, "jinja/format-reference", "attr",
                                "takes `str.format` through `|attr`, out of the sandbox's sight (CVE-2025-27516)")
            return
        attribute = kwargs.get("attribute")
        position = _ATTRIBUTE_POSITION.get(node.name)
        if attribute is None and position is not None and len(args) > position:
            attribute = args[position]
        if attribute is not None and node.name in _ATTRIBUTE_POSITION:
            self._key(attribute, f"`|{node.name}(attribute=...)`", node.node)
        if node.name == "map" and args:
            names, kinds = self.values(args[0])
            if kinds & _CHOSEN and "attribute" not in kwargs:
                self._issue(Severity.HIGH, "jinja/computed-attribute", "map",
                            "`|map(...)` calls a filter whose name the template computes")
            if "attr" in names:
                for arg in args[1:2]:
                    self._key(arg, "`|map('attr', ...)`", node.node)

    def _call(self, node) -> None:
        n = self.n
        callee = node.node
        if isinstance(callee, n.Getattr) and callee.attr in FORMAT_METHODS:
            values, kinds = self.values(callee.node)
            for value in values:
                if isinstance(value, str):
                    for field in _format_fields(value):
                        self._attribute(field, "a `str.format` field")
            if kinds & _CHOSEN:
                self._issue(Severity.HIGH, "jinja/dynamic-format", "format",
                            "calls `.format` on a string the template computes (format fields look attributes up)")

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

    def _is_callee(self, node) -> bool:
        parent = self._parents().get(id(node))
        return isinstance(parent, self.n.Call) and parent.node is node

    # -- variables -----------------------------------------------------------------

    def _bind(self, all_nodes: list) -> None:
        """Values and origins of `set`, `for`, `with`, macro and caller parameters, to a fixpoint."""
        n = self.n
        indirect = {node.name for node in all_nodes if isinstance(node, n.Name) and node.ctx == "load"
                    and node.name in self.macros | {"caller": None} and not self._is_callee(node)}
        for name in indirect:  # a macro passed around as a value is called with arguments we do not see
            targets = [self.macros[name]] if name in self.macros else list(self.tree.find_all(n.CallBlock))
            for target in targets:
                for arg in target.args:
                    self._assign_name(arg.name, _UNKNOWN)
        self._binding = True
        growth: dict[str, int] = {}
        binders = [node for node in all_nodes if isinstance(node, (n.Assign, n.AssignBlock, n.For, n.With))
                   or isinstance(node, n.Call) and isinstance(node.node, n.Name) and node.node.name in self.macros
                   or isinstance(node, n.Call) and isinstance(node.node, n.Name) and node.node.name == "caller"
                   or isinstance(node, n.Getattr) and node.attr in _MUTATORS
                   or isinstance(node, n.Filter) and node.name == "attr"]
        for _round in range(_MAX_ROUNDS):
            before = self._snapshot()
            self._cache.clear()
            for node in binders:
                if isinstance(node, n.Assign):
                    self._assign(node.target, self.values(node.node))
                    self._namespace_fields(node.target, node.node)
                elif isinstance(node, n.AssignBlock):
                    value = self._block_value(node.body)
                    if node.filter is not None:
                        value = (frozenset(), value[1] | {COMPUTED})
                    self._assign(node.target, value)
                elif isinstance(node, n.For):
                    self._assign(node.target, self._items(self.values(node.iter)))
                elif isinstance(node, n.With):
                    for target, value in zip(node.targets, node.values):
                        self._assign(target, self.values(value))
                elif isinstance(node, n.Call) and isinstance(node.node, n.Name):
                    self._bind_call(node)
                if isinstance(node, n.Getattr) and node.attr in _MUTATORS:
                    self._mutation(node.node, node)
                elif isinstance(node, n.Filter) and node.name == "attr" and node.args and node.node is not None \
                        and _MUTATORS & set(self.values(node.args[0])[0]):
                    self._mutation(node.node, None)
            after = self._snapshot()
            if after == before:
                break
            for name, size in after[0].items():
                # a counter (`ns.i = ns.i + 1`) or an accumulator grows every round: widen it
                growth[name] = growth.get(name, 0) + 1 if size > before[0].get(name, 0) else 0
                if growth[name] >= 3:
                    self.widened.add(name)
                    self.kinds[name].add(_kind_of_many(self.bindings[name]))
        else:
            for name in list(self.kinds):  # no fixpoint in sight: whatever is still moving is unknown
                self.kinds[name].add(COMPUTED)
        self._binding = False
        self._cache.clear()

    def _mutation(self, owner, method) -> None:
        """`l.append(v)`, `d.update({...})`, `ns.items.extend(...)`: the container now holds what the
        arguments hold. A mutator taken as a value (`set f = l.append`) may add anything."""
        n = self.n
        root = owner
        while isinstance(root, (n.Getattr, n.Getitem)) and not (isinstance(root, n.Getattr) and isinstance(root.node, n.Name)):
            root = root.node
        if isinstance(root, n.Getattr):
            names = [f"{root.node.name}.{root.attr}", root.node.name]
        elif isinstance(root, n.Name):
            names = [root.name]
        else:
            return
        call = self._parents().get(id(method)) if method is not None else None
        if isinstance(call, n.Call) and call.node is method and call.dyn_args is None and call.dyn_kwargs is None:
            kinds: set = set()
            for arg in list(call.args) + [kw.value for kw in call.kwargs]:
                values, k = self.values(arg)
                kinds |= k | ({BUILT} if values else set())
        else:
            kinds = {COMPUTED}
        for name in names:
            self.kinds.setdefault(name, set()).update(kinds)

    def _snapshot(self):
        return ({k: len(v) for k, v in self.bindings.items()}, {k: frozenset(v) for k, v in self.kinds.items()})

    def _namespace_fields(self, target, value) -> None:
        """`{% set ns = namespace(k=v) %}` binds `ns.k` as `{% set ns.k = v %}` does."""
        n = self.n
        if isinstance(target, n.Name) and isinstance(value, n.Call) and isinstance(value.node, n.Name) \
                and value.node.name in ("namespace", "dict") and value.node.name not in self.local_names:
            for kw in value.kwargs:
                self._assign_name(f"{target.name}.{kw.key}", self.values(kw.value))
            for arg in value.args:
                values, kinds = self.values(arg)
                for d in values:
                    if isinstance(d, _Dict):
                        for k, v in d:
                            if isinstance(k, str):
                                self._assign_name(f"{target.name}.{k}", (frozenset({v}), kinds))
                if kinds or not values:
                    self._mark_fields_unknown(target.name, kinds or frozenset({COMPUTED}))

    def _mark_fields_unknown(self, name: str, kinds) -> None:
        self.kinds.setdefault(f"{name}.*", set()).update(kinds)

    def _bind_call(self, call) -> None:
        n = self.n
        macro = self.macros.get(call.node.name)
        if macro is not None:
            params = [p.name for p in macro.args]
            extra_args = []
            for i, arg in enumerate(call.args):
                if i < len(params):
                    self._assign_name(params[i], self.values(arg))
                else:
                    extra_args.append(self.values(arg))
            extra_kwargs = []
            for kw in call.kwargs:
                if kw.key in params:
                    self._assign_name(kw.key, self.values(kw.value))
                else:
                    extra_kwargs.append((kw.key, self.values(kw.value)))
            for param, default in zip(params[len(params) - len(macro.defaults):], macro.defaults):
                self._assign_name(param, self.values(default))
            self._assign_name("varargs", _combine(extra_args, tuple, navigate=True))
            keys = [k for k, _ in extra_kwargs]
            self._assign_name("kwargs", _combine([v for _, v in extra_kwargs], lambda p: _Dict(zip(keys, p)), navigate=True))
            if call.dyn_args is not None or call.dyn_kwargs is not None:
                for param in params + ["varargs", "kwargs"]:
                    self._assign_name(param, _UNKNOWN)
        elif call.node.name == "caller":
            for block in self.tree.find_all(n.CallBlock):
                for param, arg in zip([p.name for p in block.args], call.args):
                    self._assign_name(param, self.values(arg))

    def _assign(self, target, value: Val) -> None:
        n = self.n
        if isinstance(target, n.Name):
            self._assign_name(target.name, value)
        elif isinstance(target, n.NSRef):
            self._assign_name(f"{target.name}.{target.attr}", value)
        elif isinstance(target, n.Tuple):
            values, kinds = value
            for i, item in enumerate(target.items):
                parts = set()
                extra = set(kinds)
                for v in values:
                    if isinstance(v, (tuple, str)) and not isinstance(v, _Dict) and len(v) > i:
                        parts.add(v[i])
                    else:
                        extra.add(COMPUTED)
                self._assign(item, (frozenset(parts), frozenset(extra)))

    def _assign_name(self, name: str, value: Val) -> None:
        values, kinds = value
        bound = self.bindings.setdefault(name, set())
        if name in self.widened:
            kinds = kinds | {_kind_of_many(values)} if values - bound else kinds
        else:
            for v in values:
                if len(bound) < _MAX_VALUES:
                    bound.add(v)
                else:
                    kinds = kinds | {_kind_of_many(values)}
                    break
        self.kinds.setdefault(name, set()).update(kinds)

    def _block_value(self, body) -> Val:
        n = self.n
        pieces: list[Val] = []
        for stmt in body:
            if not isinstance(stmt, n.Output):
                return _UNKNOWN
            for expr in stmt.nodes:
                pieces.append((frozenset({expr.data}), frozenset()) if isinstance(expr, n.TemplateData) else self.values(expr))
        return _combine(pieces, lambda parts: "".join(map(_to_str, parts)))

    @staticmethod
    def _items(value: Val) -> Val:
        """What a `for` loop over `value` binds to its target."""
        values, kinds = value
        items: set = set()
        extra = set(kinds)
        for v in values:
            if isinstance(v, _Dict):
                items.update(k for k, _ in v)
            elif isinstance(v, tuple):
                items.update(v[:_MAX_VALUES])
            elif isinstance(v, str):
                items.update(v[:_MAX_VALUES])
                extra.add(BUILT)
            else:
                extra.add(COMPUTED)
        return frozenset(items), frozenset(extra)

    # -- static values and their origin --------------------------------------------

    def values(self, node) -> Val:
        """(possible static values, where any other value comes from)."""
        key = id(node)
        cached = self._cache.get(key)
        if cached is None:
            self._cache[key] = _NOTHING if self._binding else _UNKNOWN
            try:
                cached = self._values(node)
            except (TypeError, ValueError, IndexError, KeyError, OverflowError, ZeroDivisionError, RecursionError):
                cached = _UNKNOWN
            if not cached[0] and not cached[1] and not self._binding:
                cached = _UNKNOWN  # bound nowhere we can see: a parameter of a macro never called directly
            self._cache[key] = cached
        return cached

    def _values(self, node) -> Val:
        n = self.n
        if isinstance(node, n.Const):
            return frozenset({node.value}), frozenset()
        if isinstance(node, n.TemplateData):
            return frozenset({node.data}), frozenset()
        if isinstance(node, n.Name):
            return self._name_value(node.name)
        if isinstance(node, n.Getattr):
            return self._getattr_value(node)
        if isinstance(node, (n.List, n.Tuple)):
            return _combine([self.values(i) for i in node.items], tuple, navigate=True)
        if isinstance(node, n.Dict):
            keys = [self.values(p.key) for p in node.items]
            vals = [self.values(p.value) for p in node.items]
            return _combine(keys + vals, lambda parts: _Dict(zip(parts[: len(keys)], parts[len(keys):])), navigate=True)
        if isinstance(node, n.Concat):
            return _combine([self.values(x) for x in node.nodes], lambda parts: _cap("".join(map(_to_str, parts))))
        if isinstance(node, (n.Add, n.Mul, n.Mod)):
            return self._arithmetic(node)
        if isinstance(node, (n.Sub, n.Div, n.FloorDiv, n.Pow, n.Neg, n.Pos, n.Not, n.Compare, n.Test)):
            return frozenset(), frozenset({NUMBER})
        if isinstance(node, (n.And, n.Or)):
            return _union(self.values(node.left), self.values(node.right))
        if isinstance(node, n.CondExpr):
            return _union(self.values(node.expr1), self.values(node.expr2) if node.expr2 is not None else (frozenset({None}), frozenset()))
        if isinstance(node, n.Getitem):
            return self._getitem_value(node)
        if isinstance(node, n.Filter):
            return self._filter_value(node)
        if isinstance(node, n.Call):
            return self._call_value(node)
        return _UNKNOWN

    def _arithmetic(self, node) -> Val:
        """`+`, `*` and `%`: arithmetic when a side is a number, string building otherwise."""
        n = self.n
        left, right = self.values(node.left), self.values(node.right)
        op = {n.Add: _add, n.Mul: _mul, n.Mod: _mod}[type(node)]
        values, kinds = _combine([left, right], lambda p: op(p[0], p[1]))
        numbers = [_is_number(left), _is_number(right)]
        lists = [isinstance(side, (n.List, n.Tuple)) or any(isinstance(v, tuple) for v in val[0])
                 for side, val in ((node.left, left), (node.right, right))]
        if isinstance(node, n.Add) and any(lists):
            return _combine([left, right], lambda p: op(p[0], p[1]), navigate=True)  # lists joined: their items
        if isinstance(node, n.Add) and any(numbers):
            return values, frozenset({NUMBER})  # `x + 1` is a number or an error
        if isinstance(node, n.Mod) and numbers[0]:
            return values, frozenset({NUMBER})
        if isinstance(node, n.Mul) and any(numbers) or isinstance(node, n.Mod) and numbers[1]:
            other = right if numbers[0] else left
            if not other[0]:
                return values, other[1] | {NUMBER}  # data repeated (or reduced) stays data
        return values, kinds

    def _name_value(self, name: str) -> Val:
        if name in self.local_names:
            values = frozenset(self.bindings.get(name, ()))
            kinds = set(self.kinds.get(name, ()))
            if name not in self.params and name not in self.macros:
                kinds.add(DATA)  # before (or without) its `set`, the name is the context's
            if name in self.macros:
                return frozenset(), frozenset({COMPUTED})
            return values, frozenset(kinds)
        if name in ("varargs", "kwargs"):
            return frozenset(self.bindings.get(name, ())), frozenset(self.kinds.get(name, ()))
        if name in SPECIAL_GLOBALS or _TOKEN_NAME.match(name) or name == "caller":
            return _UNKNOWN
        # the application's data, `loop`, or undefined (and whatever the template added to it)
        return frozenset(), frozenset({DATA}) | frozenset(self.kinds.get(name, ()))

    def _getattr_value(self, node) -> Val:
        n = self.n
        if isinstance(node.node, n.Name):
            owner_name = node.node.name
            ref = f"{owner_name}.{node.attr}"
            if ref in self.bindings or ref in self.kinds or f"{owner_name}.*" in self.kinds:
                # a namespace field: what `set ns.k = ...` and `namespace(k=...)` put there
                kinds = set(self.kinds.get(ref, ())) | set(self.kinds.get(f"{owner_name}.*", ()))
                return frozenset(self.bindings.get(ref, ())), frozenset(kinds)
            if owner_name == "loop" and owner_name not in self.local_names and node.attr in _LOOP_NUMBERS:
                return frozenset(), frozenset({NUMBER})
        owner = self.values(node.node)
        if node.attr in FORMAT_METHODS or node.attr in _METHODS:
            return frozenset(), owner[1] | (frozenset({COMPUTED}) if owner[0] else frozenset())  # a bound method
        # Jinja's getattr falls back to item lookup: `d.k` of a dict is `d['k']`
        return _combine([self.values(node.node), (frozenset({node.attr}), frozenset())],
                        lambda p: _index(p[0], p[1]), navigate=True)

    def _getitem_value(self, node) -> Val:
        n = self.n
        container = self.values(node.node)
        strings = any(isinstance(v, str) for v in container[0])
        if isinstance(node.arg, n.Slice):
            parts = [container] + [self.values(x) if x is not None else (frozenset({None}), frozenset())
                                   for x in (node.arg.start, node.arg.stop, node.arg.step)]
            values, kinds = _combine(parts, lambda p: _cap(p[0][slice(p[1], p[2], p[3])]), navigate=True)
        else:
            key = self.values(node.arg)
            if not key[0] and container[0]:
                # an index only known at render time: any element
                values, kinds = self._items(container)
                kinds = kinds | (key[1] & {COMPUTED})
            else:
                values, kinds = _combine([container, key], lambda p: _index(p[0], p[1]), navigate=True)
        if strings:
            kinds = kinds | {BUILT}  # characters picked out of a string
        return values, kinds

    def _filter_value(self, node) -> Val:
        if node.node is None:
            return _UNKNOWN
        subject = self.values(node.node)
        name = node.name
        args = [self.values(a) for a in node.args]
        kwargs = [(kw.key, self.values(kw.value)) for kw in node.kwargs]
        if name in _NUMERIC_FILTERS:
            return frozenset(), frozenset({NUMBER})
        if name in ("default", "d"):
            return _union(subject, *args[:1])
        if name == "attr":
            return frozenset(), subject[1] | (frozenset({COMPUTED}) if subject[0] else frozenset())
        if name in ("map", "selectattr", "rejectattr", "select", "reject", "groupby", "batch", "slice", "items",
                    "dictsort", "sort", "unique", "reverse", "list", "first", "last", "min", "max", "random"):
            navigate = True
        elif name in ("string", "safe", "e", "escape", "forceescape", "lower", "upper", "title", "capitalize", "trim",
                      "striptags") or name in ("wordwrap", "truncate", "indent", "center") and not node.args and not node.kwargs:
            navigate = not subject[0]  # data stays data; a literal transformed is built
        else:
            navigate = False
        func = _FILTERS.get(name)
        if func is None or name in ("map", "select", "reject", "selectattr", "rejectattr", "groupby", "batch", "slice"):
            if navigate:
                return frozenset(), subject[1] | (frozenset({COMPUTED}) if subject[0] else frozenset())
            return _UNKNOWN
        names = [k for k, _ in kwargs]
        values, kinds = _combine([subject] + args + [v for _, v in kwargs],
                                 lambda p: _cap(func(*p[: 1 + len(args)], **dict(zip(names, p[1 + len(args):])))),
                                 navigate=navigate)
        if navigate and any(isinstance(v, str) for v in subject[0]) and name not in ("safe", "e", "escape", "string"):
            kinds = kinds | {BUILT}  # characters of a string
        return values, kinds

    def _call_value(self, node) -> Val:
        n = self.n
        callee = node.node
        args = [self.values(a) for a in node.args]
        kwargs = [(kw.key, self.values(kw.value)) for kw in node.kwargs]
        names = [k for k, _ in kwargs]
        if node.dyn_args is not None or node.dyn_kwargs is not None:
            return _UNKNOWN  # `f(*a, **k)`: arguments we do not see
        if isinstance(callee, n.Name) and callee.name not in self.local_names:
            if callee.name in ("dict", "namespace") and not node.args:
                return _combine([v for _, v in kwargs], lambda p: _Dict(zip(names, p)), navigate=True)
            if callee.name == "range":
                return frozenset(), frozenset({NUMBER})
            return _UNKNOWN
        if isinstance(callee, n.Getattr):
            method = callee.attr
            owner = self.values(callee.node)
            if method == "cycle":  # loop.cycle(a, b) returns one of its arguments
                return _union(*args) if args else _UNKNOWN
            if method in _PREDICATES:
                return frozenset(), frozenset({NUMBER})
            if method in ("items", "keys", "values", "copy", "get", "pop", "split", "rsplit", "splitlines",
                          "strip", "lstrip", "rstrip", "lower", "upper", "title", "capitalize", "swapcase"):
                if not owner[0]:
                    extra = [a for a in (args[1:2] if method == "get" else [])]
                    return _union((frozenset(), owner[1]), *extra)
                if method == "pop":
                    values, kinds = self._items(owner)
                    return values, kinds
            func = _METHODS.get(method)
            if func is None:
                return _UNKNOWN
            navigate = method in ("items", "keys", "values", "get", "copy")
            values, kinds = _combine([owner] + args + [v for _, v in kwargs],
                                     lambda p: _cap(func(p[0], *p[1: 1 + len(args)], **dict(zip(names, p[1 + len(args):])))),
                                     navigate=navigate)
            return values, kinds
        return _UNKNOWN


# -- the evaluator's operations (mirroring what Jinja2 does at render time) ------------


def _combine(parts: list[Val], build, navigate: bool = False) -> Val:
    """Apply `build` to every combination of the parts' static values.

    `navigate`: the result is a part of its inputs (an item, a key, a container of them), so
    it keeps their origin; otherwise it is a new value: built from static values, computed
    from anything else (numbers stay numbers).
    """
    if any(not v and not k for v, k in parts):
        return _NOTHING  # an input not bound yet: wait for the next round
    kinds: set = set()
    for _, k in parts:
        kinds |= k
    known = all(values for values, _ in parts)
    out = set()
    if known:
        for combo in itertools.islice(itertools.product(*[sorted(v, key=repr) for v, _ in parts]), _MAX_VALUES):
            try:
                value = build(list(combo))
            except (TypeError, ValueError, IndexError, KeyError, OverflowError, ZeroDivisionError, AttributeError):
                kinds.add(COMPUTED)
                continue
            if value is DYNAMIC:
                kinds.add(COMPUTED)
            else:
                out.add(value)
    if navigate:
        return frozenset(out), frozenset(kinds)
    numeric = all(all(isinstance(v, (int, float)) for v in values) and not (k - {NUMBER}) for values, k in parts)
    if numeric:
        return frozenset(out), frozenset({NUMBER})
    if out and not (kinds - {BUILT}):
        return frozenset(out), frozenset({BUILT})
    return frozenset(out), frozenset({BUILT, COMPUTED}) if out else frozenset({COMPUTED})


def _kind_of_many(values) -> str:
    """The kind that stands for values too many to list: numbers stay numbers."""
    return NUMBER if all(isinstance(v, (int, float)) for v in values) else COMPUTED


def _is_number(value: Val) -> bool:
    values, kinds = value
    if kinds - {NUMBER} or not values and not kinds:
        return False
    return all(isinstance(v, (int, float)) for v in values)


def _union(*parts: Val) -> Val:
    values: set = set()
    kinds: set = set()
    for v, k in parts:
        values |= v
        kinds |= k
    return frozenset(values), frozenset(kinds)


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


def _short(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:57] + "...")


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


#: methods that put their arguments into the container they are called on
_MUTATORS = frozenset({"append", "extend", "insert", "update", "setdefault", "add", "__setitem__", "__iadd__", "__ior__"})
#: attributes of `loop` that are numbers or truth values
_LOOP_NUMBERS = frozenset({"index", "index0", "revindex", "revindex0", "length", "depth", "depth0", "first", "last"})
#: filters whose result is a number or a truth value
_NUMERIC_FILTERS = frozenset({"length", "count", "int", "float", "abs", "round", "sum", "wordcount", "bool"})
#: filters that look attributes up by a name, and the position of that name among positional arguments
_ATTRIBUTE_POSITION = {"map": None, "selectattr": 0, "rejectattr": 0, "sort": 2, "groupby": 0, "sum": 0, "unique": 1,
                       "min": 1, "max": 1, "join": 1}
_PREDICATES = frozenset({"startswith", "endswith", "isdigit", "isalpha", "isalnum", "isspace", "islower", "isupper",
                         "istitle", "isnumeric", "isdecimal", "isidentifier", "count", "find", "rfind", "index",
                         "rindex", "__contains__"})

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
    "items": lambda v: tuple(v) if isinstance(v, _Dict) else DYNAMIC,
    "dictsort": lambda v, *a, **k: tuple(sorted(v)) if isinstance(v, _Dict) else DYNAMIC,
    "tojson": _tojson,
    "center": lambda v, width=80: str(v).center(width),
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
    "copy": lambda d: d,
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
