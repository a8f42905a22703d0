"""CPython's own C unpickler over untrusted bytes, with nothing real behind any name.

Run as a subprocess (`python inert.py`) by `harness.py`; never imported into the test process.
It reads inputs from stdin (4-byte length, then the bytes), runs each through the real
`_pickle.Unpickler` the way each loader reads it, and writes one JSON line per input saying
which globals the unpickler resolved and how it used them.

Why running the real unpickler is safe here: every name goes through `find_class`, which
returns a freshly made *stub class* and never imports; `persistent_load` returns a stub;
the copyreg extension registry is emptied, so EXT opcodes fail (and are recorded) instead of
resolving a real name. The only callables the unpickler can ever reach are stubs, which
record that they were called and return another stub. Data opcodes build real lists, dicts
and strings, which run no code of their own. Limits (address space, CPU) are set by
`main()` before anything is read.

Readings (one per loader's way of handing bytes to the unpickler):
- `bytes`: as `pickle.loads(data)`: the whole input is one buffer. `pickle.loads` cannot be
  given a `find_class`, so the same C code path is reached through a file object whose
  `peek` returns everything left (the unpickler then buffers it all, exactly as for bytes).
- `file`: `Unpickler(io.BytesIO(data))` as torch.load reads `data.pkl`: no `peek`, so a FRAME
  is read into a buffer of its own and a read that runs past it starts afresh at its end.
- `peek<N>`: `Unpickler(open(path))` as pickle.load / np.load / legacy torch.load read a
  file: a BufferedReader (buffer size N) the unpickler peeks into.
- `python`: the pure-Python `pickle._Unpickler` (joblib.load's) over a BytesIO: strict frames.
File readings call `load()` again while bytes remain, as loaders of several pickles do.

Uses are the VM's bit set: 1 referenced, 2 given state (BUILD, or data through the
object's own append/extend/__setitem__/add), 4 instantiated (NEWOBJ), 8 called.
"""

from __future__ import annotations

import copyreg
import gc
import io
import json
import pickle
import re
import struct
import sys

REFERENCED, BUILT, NEW, CALLED = 1, 2, 4, 8
MAX_LOADS = 8


class Recorder:
    """What one reading did: globals and their uses, calls of computed values, EXT, PERSID."""

    def __init__(self):
        self.uses: dict[tuple[str, str], int] = {}
        self.order: list[tuple[str, str]] = []
        self.dynamic = 0  # calls of values that are not a global (a stub's result, a persistent object)
        self.dynamic_from: set[tuple[str, str]] = set()  # the globals whose results were called
        self.ext: list[int] = []
        self.persid = 0
        self.persid_uses = 0
        self.methods: set[tuple[str, str, str]] = set()
        self.classes: dict[tuple[str, str], type] = {}

    def use(self, key: tuple[str, str], bit: int) -> None:
        if key == Persistent._key:  # not a name: the VM knows it as a persistent object
            self.persid_uses |= bit
            return
        if key not in self.uses:
            self.uses[key] = 0
            self.order.append(key)
        self.uses[key] |= bit

    def as_json(self) -> dict:
        return {
            "globals": [[m, n, self.uses[(m, n)]] for m, n in self.order],
            "dynamic": self.dynamic,
            "dynamic_from": sorted(self.dynamic_from),
            "ext": self.ext,
            "persid": self.persid,
            "persid_uses": self.persid_uses,
            "methods": sorted(self.methods),
        }


REC = Recorder()


#: callables that unpickle their first argument: a stub for one of them unpickles it too (inert)
NESTED_LOADERS = {("pickle", "loads"), ("_pickle", "loads"), ("cPickle", "loads"), ("dill", "loads"),
                  ("dill._dill", "loads"), ("cloudpickle", "loads"), ("numpy", "loads"), ("pickle", "_loads")}
_NESTING = [0]


class StubMeta(type):
    """The type of every stub class: calling one records a call and returns a stub instance."""

    def __call__(cls, *args, **kwargs):
        REC.use(cls._key, CALLED)
        if cls._key in NESTED_LOADERS and args and isinstance(args[0], (bytes, bytearray)) and _NESTING[0] < 4:
            _NESTING[0] += 1
            try:
                InertUnpickler(WholePeek(bytes(args[0]))).load()
            except Exception:
                pass  # the nested load breaks where it breaks: what it did is recorded
            finally:
                _NESTING[0] -= 1
        return object.__new__(cls)


class _SetState:
    """`__setstate__` for stubs and their instances (a non-data descriptor, so a value BUILD
    planted in an instance's dict under that name shadows it, as it would a real method).

    Records that the object received state, then does what CPython's default BUILD does for a
    class without `__setstate__`: the dict part updates `__dict__`, the slot part is setattr.
    """

    def __get__(self, obj, owner):
        target = owner if obj is None else obj

        def setstate(state):
            REC.use(owner._key, BUILT)
            slotstate = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slotstate = state
            if isinstance(state, dict) and obj is not None:
                obj.__dict__.update(state)
            if isinstance(slotstate, dict):
                for key, value in slotstate.items():
                    if isinstance(key, str):
                        setattr(target, key, value)

        return setstate


class _Method:
    """A method the unpickler calls on the objects it builds (`append`, `add`, `__setitem__`):
    the class that owns it receives data. Works through an instance and, as CPython's APPEND
    does with a class on the stack, through the class itself."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, owner):
        def method(*args):
            REC.use(owner._key, BUILT)
            REC.methods.add((*owner._key, self.name))

        return method


class StubBase(metaclass=StubMeta):
    _key = ("", "")
    __setstate__ = _SetState()
    # APPEND(S) on an object without `extend` calls `append`; ADDITEMS calls `add`; SETITEM(S)
    # calls `__setitem__`. No `extend` here, so a planted `append` or `extend` is reached.
    append = _Method("append")
    add = _Method("add")
    __setitem__ = _Method("__setitem__")

    def __new__(cls, *args, **kwargs):  # NEWOBJ / NEWOBJ_EX: cls.__new__(cls, *args, **kwargs)
        REC.use(cls._key, NEW)
        return object.__new__(cls)

    def __call__(self, *args, **kwargs):  # a value the load built, called
        REC.dynamic += 1
        REC.dynamic_from.add(type(self)._key)
        return object.__new__(Persistent)


class Persistent(StubBase):
    """What `persistent_load` returns: an object the loader made from an id."""

    _key = ("<persistent>", "<persistent>")


_SAFE_NAME = re.compile(r"[^A-Za-z0-9_]")


def stub_class(module: str, name: str) -> type:
    key = (module, name)
    cls = REC.classes.get(key)
    if cls is None:
        cls = StubMeta(_SAFE_NAME.sub("_", name)[:64] or "_", (StubBase,), {"_key": key})
        REC.classes[key] = cls
    return cls


class InertUnpickler(pickle.Unpickler):  # the C implementation (_pickle.Unpickler)
    def find_class(self, module, name):
        REC.use((module, name), REFERENCED)
        return stub_class(module, name)

    def persistent_load(self, pid):
        REC.persid += 1
        return object.__new__(Persistent)


class InertPyUnpickler(pickle._Unpickler):  # the pure-Python unpickler joblib.load uses
    find_class = InertUnpickler.find_class
    persistent_load = InertUnpickler.persistent_load


class WholePeek(io.BytesIO):
    """A file whose `peek` returns everything left: the unpickler buffers it all at once,
    which is exactly how it reads `pickle.loads(bytes)`."""

    def peek(self, n=0):
        return self.getvalue()[self.tell():]


_EXT = re.compile(r"unregistered extension code (-?\d+)")


def _audit(event: str, args: tuple) -> None:
    # the `loads` reading runs plain pickle.loads: any attempt to resolve a name stops it here,
    # before the default find_class imports anything (InertUnpickler's own never gets here)
    if event == "pickle.find_class":
        raise pickle.UnpicklingError(f"inert: find_class{args!r} refused")


def loads_reading(data: bytes) -> dict:
    """`pickle.loads` itself, for data-only pickles (a name stops it): checks that the `bytes`
    reading above reads exactly as it does."""
    try:
        value = pickle.loads(data)
    except Exception as exc:
        return {"reading": "loads", "error": f"{type(exc).__name__}", "result": None}
    return {"reading": "loads", "error": None, "result": _shape(value)}


def _shape(value: object) -> str:
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 4, 60, 60
    return r.repr(value)


def read(data: bytes, reading: str) -> dict:
    """One reading of `data`: what the unpickler resolved and called, and why it stopped."""
    global REC
    if reading == "loads":
        return loads_reading(data)
    REC = Recorder()
    unpickler = InertPyUnpickler if reading == "python" else InertUnpickler
    if reading == "bytes":
        f = WholePeek(data)
    elif reading in ("file", "python"):
        f = io.BytesIO(data)
    else:
        f = io.BufferedReader(io.BytesIO(data), buffer_size=int(reading[4:]))
    error = result = None
    loads = 0
    try:
        while True:
            value = unpickler(f).load()
            if not loads:
                result = _shape(value) if not REC.order and not REC.persid else None
            loads += 1
            if reading == "bytes" or loads >= MAX_LOADS or not _more(f, reading, len(data)):
                break
    except Exception as exc:  # the unpickler's verdict on these bytes: where and why it stopped
        error = f"{type(exc).__name__}: {exc}"[:300]
        m = _EXT.search(str(exc))
        if m:
            REC.ext.append(int(m.group(1)))
    gc.collect()  # a __del__ planted on a stub class runs here, as it would in the loader
    out = REC.as_json()
    out.update(reading=reading, loads=loads, error=error, result=result)
    return out


def _more(f, reading: str, size: int) -> bool:
    return f.tell() < size if reading in ("file", "python") else bool(f.peek(1))


def main() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (600, 600))
    copyreg._extension_registry.clear()
    copyreg._inverted_registry.clear()
    copyreg._extension_cache.clear()
    sys.addaudithook(_audit)
    sys.setrecursionlimit(10_000)
    stdin, stdout = sys.stdin.buffer, sys.stdout
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        (n,) = struct.unpack("<I", head)
        readings = stdin.readline().decode().split()
        data = stdin.read(n)
        results = [read(data, r) for r in readings]
        stdout.write(json.dumps(results) + "\n")
        stdout.flush()


if __name__ == "__main__":
    main()
