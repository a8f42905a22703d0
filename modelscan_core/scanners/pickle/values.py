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

#: how many items a container keeps for display; items that change what the loader does
#: (a planted method's key, a name computed at load time) are kept past it (vm._set_items)
DISPLAY_ITEMS = 8

# How a loaded object was changed after it was made (`Call.mutated`, `GlobalRef.mutated`).
MUT_BUILD = 1  # BUILD: __setstate__ or attribute updates
MUT_ITEMS = 2  # SETITEM(S): __setitem__
MUT_APPEND = 4  # APPEND(S): append / extend
MUT_ADD = 8  # ADDITEMS: add


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
    observer: object = None  # called with every Call of this global (set by whoever runs the VM)
    mutated: int = 0  # MUT_* bits: the loaded object itself (a class, a function, a module) was changed

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
    mutated: int = 0  # MUT_* bits: what the load did to the returned object afterwards
    planted: object = None  # {attribute: value} a BUILD stored under a name the load calls later


@dataclass(eq=False, slots=True)
class Unknown:
    """A value the VM cannot know statically (a persistent id, an evicted memo entry...)."""

    why: str
    detail: object = None


@dataclass(eq=False, slots=True)
class Blob:
    """A long bytes/str operand left in the file instead of copied: where it is and how long.

    `bytearray`: made by BYTEARRAY8, so APPEND(S) extend it; `grown`: they did, and the bytes
    in the file are no longer all it holds."""

    offset: int
    length: int
    is_text: bool = False
    bytearray: bool = False
    grown: bool = False


class PByteArray(bytes):
    """The bytes of a BYTEARRAY8 operand: a bytearray to the unpickler, so APPEND(S) on it call
    its extend, which takes ints. `grown` once they did: what it holds is then no longer known."""

    grown = False


def grown_bytes(value: object) -> bool:
    """A bytearray APPEND(S) extended: its content cannot be worked out statically."""
    return getattr(value, "grown", False) is True


class PDict(list):
    """A dict under construction: a capped list of (key, value) pairs.

    `lossy` is set (read it with `is_lossy`) when a pair whose key is not plain data (a key
    computed at load time) was dropped by a cap: such a dict cannot be trusted as an object's
    state. It is a slot left unset, so making a PDict costs what making a list costs.
    """

    __slots__ = ("lossy",)


def is_lossy(d: PDict) -> bool:
    return getattr(d, "lossy", False)


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
    # at most DISPLAY_ITEMS items of each container: a wide tuple shared at every level would
    # otherwise make the text (and the time) exponential
    if isinstance(v, PDict):
        inner = ", ".join(f"{_render(k, depth - 1)}: {_render(x, depth - 1)}" for k, x in v[:DISPLAY_ITEMS])
        return "{" + inner + _more(v) + "}"
    if isinstance(v, PSet):
        return "{" + ", ".join(_render(x, depth - 1) for x in v[:DISPLAY_ITEMS]) + _more(v) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_render(x, depth - 1) for x in v[:DISPLAY_ITEMS]) + _more(v) + "]"
    if isinstance(v, tuple):
        inner = ", ".join(_render(x, depth - 1) for x in v[:DISPLAY_ITEMS])
        return "(" + inner + ("," if len(v) == 1 else "") + _more(v) + ")"
    if isinstance(v, (str, bytes)) and len(v) > 120:
        return repr(v[:120]) + "..."
    return repr(v)


def _more(items) -> str:
    return ", ..." if len(items) > DISPLAY_ITEMS else ""


def render_call(call: Call, depth: int = 3) -> str:
    func = _render(call.func, depth - 1)
    args = call.args
    parts: list[str] = []
    if isinstance(args, tuple):
        parts = [_render(a, depth - 1) for a in args[:DISPLAY_ITEMS]] + (["..."] if len(args) > DISPLAY_ITEMS else [])
    elif args is not None:
        parts = ["*" + _render(args, depth - 1)]
    if isinstance(call.kwargs, PDict):
        parts += [f"{k}={_render(x, depth - 1)}" if isinstance(k, str) else f"**{{{_render(k, 0)}: ...}}"
                  for k, x in call.kwargs[:DISPLAY_ITEMS]]
    prefix = f"{func}.__new__" if call.kind in ("newobj", "newobj_ex") else func
    if call.kind in ("newobj", "newobj_ex"):
        parts.insert(0, func)
    return f"{prefix}({', '.join(parts)})"
