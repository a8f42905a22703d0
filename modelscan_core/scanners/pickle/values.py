"""The symbolic values the pickle VM pushes instead of real objects.

Plain data (ints, short strings, bytes) is kept as the Python value it would be. What a
loader would *do* is kept as nodes: a `GlobalRef` for every name it would import, a `Call`
for every callable it would invoke. Containers keep only their first few items: they are
for showing arguments to a person, never for reconstructing data, which keeps memory flat
on op-dense files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Uses of a global, strongest last. A bit set, so one record can carry several.
REFERENCED = 1
BUILT = 2  # received state through BUILD (__setstate__ or __dict__ update)
NEW = 4  # cls.__new__(cls, ...) via NEWOBJ / NEWOBJ_EX / copyreg reconstructors
CALLED = 8  # called with arguments: REDUCE, INST, OBJ

#: how many items a container keeps for display
DISPLAY_ITEMS = 8


@dataclass(eq=False, slots=True)
class GlobalRef:
    """One imported name, shared by every site that names it in one pickle stream."""

    module: str
    name: str
    offset: int  # first site
    opcode: str
    uses: int = REFERENCED
    calls: list = field(default_factory=list)  # first few `Call`s of this global
    ncalls: int = 0  # all calls, kept or not
    arg_refs: list = field(default_factory=list)  # every distinct GlobalRef passed to it as an argument

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False, slots=True)
class Call:
    """The value a call returns: what was called, how, with which arguments."""

    func: object
    args: object
    kind: str  # "reduce", "inst", "obj", "newobj", "newobj_ex", "build"
    offset: int
    kwargs: object = None


@dataclass(eq=False, slots=True)
class Unknown:
    """A value the VM cannot know statically (a persistent id, an evicted memo entry...)."""

    why: str
    detail: object = None


@dataclass(eq=False, slots=True)
class Blob:
    """A long bytes/str operand left in the file instead of copied: where it is and how long."""

    offset: int
    length: int
    is_text: bool = False


class PDict(list):
    """A dict under construction: a capped list of (key, value) pairs."""

    __slots__ = ()


class PSet(list):
    """A set or frozenset: a capped list of items."""

    __slots__ = ()


def render(value: object, budget: int = 200) -> str:
    """Show a value as Python-like source, bounded in length, for a report."""
    text = _render(value, 3)
    if len(text) > budget:
        text = text[: budget - 3] + "..."
    return text


def _render(v: object, depth: int) -> str:
    if depth < 0:
        return "..."
    if isinstance(v, GlobalRef):
        return v.qualname
    if isinstance(v, Call):
        return render_call(v, depth)
    if isinstance(v, Unknown):
        return f"<{v.why}>"
    if isinstance(v, Blob):
        kind = "str" if v.is_text else "bytes"
        return f"<{kind} of {v.length} bytes at offset {v.offset}>"
    if isinstance(v, PDict):
        inner = ", ".join(f"{_render(k, depth - 1)}: {_render(x, depth - 1)}" for k, x in v)
        return "{" + inner + "}"
    if isinstance(v, PSet):
        return "{" + ", ".join(_render(x, depth - 1) for x in v) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_render(x, depth - 1) for x in v) + "]"
    if isinstance(v, tuple):
        inner = ", ".join(_render(x, depth - 1) for x in v)
        return "(" + inner + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, (str, bytes)) and len(v) > 120:
        return repr(v[:120]) + "..."
    return repr(v)


def render_call(call: Call, depth: int = 3) -> str:
    func = _render(call.func, depth - 1)
    args = call.args
    parts: list[str] = []
    if isinstance(args, tuple):
        parts = [_render(a, depth - 1) for a in args]
    elif args is not None:
        parts = ["*" + _render(args, depth - 1)]
    if isinstance(call.kwargs, PDict):
        parts += [f"{k}={_render(x, depth - 1)}" if isinstance(k, str) else f"**{{{_render(k, 0)}: ...}}" for k, x in call.kwargs]
    prefix = f"{func}.__new__" if call.kind in ("newobj", "newobj_ex") else func
    if call.kind in ("newobj", "newobj_ex"):
        parts.insert(0, func)
    return f"{prefix}({', '.join(parts)})"
