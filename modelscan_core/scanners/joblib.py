"""joblib's framing inside a pickle stream, followed the way `joblib.load` follows it.

`joblib.dump` pickles a `NumpyArrayWrapper` for each array and writes the array's raw bytes
straight into the stream right after the wrapper's BUILD opcode (after a one-byte padding
length and that many padding bytes, when the state names `numpy_array_alignment_bytes`).
`NumpyUnpickler.load_build` reads exactly those bytes and goes on unpickling after them.
A plain opcode walk would read the array bytes as opcodes: it stops early (missing what
follows) or is steered by bytes an attacker chose. This hook is called by the VM after
every BUILD; for a joblib wrapper it computes the byte count from the state (shape, dtype,
order) and skips exactly that many bytes. An object array is not raw bytes but a pickle
of its own, read with a fresh unpickler: it is run through a fresh VM and judged too.

joblib.load's unpickler is the pure-Python `pickle._Unpickler`, and `read_array` reads from
the file object, not through the unpickler's frame: the bytes come from where the file is
(past the whole current frame, when a BUILD sits inside one), through `vm.file_read` /
`vm.file_skip`. What plain `pickle.load` does with the same bytes (the arrays as opcodes) is
another reading, which scanner.py runs when a hook took bytes.

Whatever the hook cannot work out (a shape that is not a tuple of ints, a dtype it cannot
size, a state too large to have been kept whole) stops the stream with an *incomplete*
error: guessing a byte count would let the walk be steered.

The older `NDArrayWrapper`/`ZNDArrayWrapper` (joblib <= 0.9) consume no stream bytes: they
name a separate file that joblib loads with `np.load(..., allow_pickle=True)`. A name that
leaves the directory is reported; a sibling is scanned when the directory is.
"""

from __future__ import annotations

import math
import re
from typing import BinaryIO

from modelscan_core.model import Severity
from modelscan_core.scanners.interface import ScanContext
from modelscan_core.scanners.pickle.values import DISPLAY_ITEMS, Call, GlobalRef, PDict
from modelscan_core.scanners.pickle.vm import PickleError, PickleVM

_MODULES = ("joblib.numpy_pickle", "sklearn.externals.joblib.numpy_pickle", "joblib.numpy_pickle_compat",
            "sklearn.externals.joblib.numpy_pickle_compat")
_RECONSTRUCTORS = {("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor"), ("copyreg", "__newobj__"),
                   ("copy_reg", "__newobj__")}
_DTYPE = {("numpy", "dtype"), ("numpy.core.multiarray", "dtype"), ("numpy._core.multiarray", "dtype")}
_DESCR = re.compile(r"[<>=|]?([a-zA-Z?])(\d*)")
_KIND_SIZE = {"?": 1, "b": 1, "B": 1, "h": 2, "H": 2, "i": 4, "I": 4, "l": 8, "L": 8, "q": 8, "Q": 8, "e": 2, "f": 4,
              "d": 8, "g": 16, "F": 8, "D": 16, "G": 32, "O": 8, "M": 8, "m": 8, "p": 8, "P": 8}
#: the largest array the hook will believe (bytes); beyond, the file is not plausibly joblib
MAX_ARRAY = 1 << 50


def _wrapper_class(target: object) -> str | None:
    """'NumpyArrayWrapper', 'NDArrayWrapper', 'ZNDArrayWrapper' when target is one, else None."""
    if not isinstance(target, Call):
        return None
    cls = target.func
    if isinstance(cls, GlobalRef) and (cls.module, cls.name) in _RECONSTRUCTORS:
        args = target.args if isinstance(target.args, tuple) else ()
        cls = args[0] if args else None
    if isinstance(cls, GlobalRef):
        # find_class("joblib", "numpy_pickle.NumpyArrayWrapper") is the same class: compare full paths
        module, _, name = f"{cls.module}.{cls.name}".rpartition(".")
        if module in _MODULES and name in ("NumpyArrayWrapper", "NDArrayWrapper", "ZNDArrayWrapper"):
            return name
    return None


class JoblibHook:
    """A BUILD hook for one scan: remembers dtype states, skips array bytes, scans object arrays."""

    def __init__(self, stream: BinaryIO, size: int | None, ctx: ScanContext, scanner: str):
        self.stream, self.size, self.ctx, self.scanner = stream, size, ctx, scanner
        self.dtype_states: dict[int, tuple[Call, object]] = {}
        self.arrays: list[tuple[int, int]] = []  # (offset, length) of the bytes joblib.load skipped

    def __call__(self, vm: PickleVM, target: object, state: object, offset: int) -> object:
        if isinstance(target, Call) and isinstance(target.func, GlobalRef) and (target.func.module, target.func.name) in _DTYPE:
            self.dtype_states[id(target)] = (target, state)  # keep the Call alive: ids stay unique
            return None
        kind = _wrapper_class(target)
        if kind is None:
            return None
        fields = _state_dict(state, offset)
        if kind == "NumpyArrayWrapper":
            self._array(vm, fields, offset)
        else:
            self._external(fields, kind, offset)
        return None

    def _array(self, vm: PickleVM, fields: dict, offset: int) -> None:
        shape, dtype = fields.get("shape"), fields.get("dtype")
        if not isinstance(shape, (tuple, list)) or not all(type(n) is int for n in shape):
            raise PickleError(f"joblib array at offset {offset} has a shape the scanner cannot read: {shape!r}", offset,
                              incomplete=True)
        if any(n < 0 for n in shape):
            raise PickleError(f"joblib array at offset {offset} has a negative dimension", offset)
        itemsize, hasobject = self._dtype(dtype, offset)
        if hasobject:
            self._object_array(vm, offset)
            return
        nbytes = math.prod(shape) * itemsize
        if nbytes > MAX_ARRAY:
            raise PickleError(f"joblib array at offset {offset} claims {nbytes} bytes", offset)
        # joblib reads from the file itself (past the current frame, for its pure-Python unpickler)
        start = vm.file_tell()
        if fields.get("numpy_array_alignment_bytes") is not None:
            padding = vm.file_read(1)[0]
            vm.file_skip(padding)
        vm.file_skip(nbytes)
        # plain pickle.load reads these bytes as opcodes: the scanner's other readings look at them
        self.arrays.append((start, vm.file_tell() - start))

    def _dtype(self, dtype: object, offset: int) -> tuple[int, bool]:
        if not (isinstance(dtype, Call) and isinstance(dtype.func, GlobalRef) and (dtype.func.module, dtype.func.name) in _DTYPE
                and isinstance(dtype.args, tuple) and dtype.args):
            raise PickleError(f"joblib array at offset {offset} has a dtype the scanner cannot size", offset, incomplete=True)
        descr = dtype.args[0]
        if isinstance(descr, str):
            m = _DESCR.fullmatch(descr)
            if m is None:
                raise PickleError(f"joblib array at offset {offset} has dtype {descr!r} the scanner cannot size", offset,
                                  incomplete=True)
            kind, digits = m.group(1), m.group(2)
            hasobject = kind == "O"
            itemsize = int(digits) * (4 if kind == "U" else 1) if digits else _KIND_SIZE.get(kind, 0)
        else:
            # a dtype built from a scalar type (ml_dtypes.bfloat16, ...): its state says the size
            hasobject, itemsize = False, 0
        kept = self.dtype_states.get(id(dtype))
        if kept is not None and kept[0] is dtype:
            st = kept[1]
            if isinstance(st, tuple) and len(st) >= 8:
                if type(st[5]) is int and st[5] > 0:
                    itemsize = st[5]
                if type(st[7]) is int and st[7] & 1:  # NPY_ITEM_REFCOUNT: holds Python objects
                    hasobject = True
            elif st is not None:
                raise PickleError(f"dtype state at offset {offset} is not one the scanner can read", offset, incomplete=True)
        if itemsize <= 0 and not hasobject:
            raise PickleError(f"joblib array at offset {offset} has dtype {descr!r} of unknown size", offset, incomplete=True)
        return itemsize, hasobject

    def _object_array(self, vm: PickleVM, offset: int) -> None:
        """joblib reads an object array with a fresh Unpickler from the same file: scan that pickle."""
        from modelscan_core.scanners.pickle.scanner import new_vm, report_facts
        from modelscan_core.sources.window import Window

        stream = self.stream
        try:
            saved = stream.tell()
            seekable = stream.seekable()
        except (OSError, ValueError, AttributeError):
            seekable = False
        if not seekable or self.size is None:
            raise PickleError("object array inside a joblib stream that cannot be re-read", offset, incomplete=True)
        start = vm.file_tell()
        view = Window(stream, 0, self.size)
        view.seek(start)
        # a fresh pure-Python unpickler on the same file: a frame it reads whole is consumed whole
        inner = new_vm(view, self.size, self.ctx, reader="python")
        facts = inner.run()
        stream.seek(saved)
        report_facts(facts, self.ctx, scanner=self.scanner, stream=stream)
        if not facts.stopped:
            raise PickleError(f"object array pickle at offset {start} is broken; joblib.load stops here", facts.error_offset or start)
        vm.file_skip(facts.next_start - start)
        self.arrays.append((start, facts.next_start - start))

    def _external(self, fields: dict, kind: str, offset: int) -> None:
        filename = fields.get("filename")
        if not isinstance(filename, str):
            return
        from modelscan_core.scanners.paths import escapes

        if escapes(filename):
            self.ctx.report(
                "joblib/external-array-file",
                Severity.HIGH,
                f"joblib {kind} makes joblib.load read '{filename}' outside the model's directory with "
                "np.load(allow_pickle=True): that file is unpickled",
                module="joblib.numpy_pickle",
                operator=kind,
                offset=offset,
            )
        else:
            self.ctx.report(
                "joblib/sibling-array-file",
                Severity.LOW,
                f"joblib {kind} makes joblib.load read '{filename}' next to this file with np.load(allow_pickle=True); "
                "scan that file too",
                module="joblib.numpy_pickle",
                operator=kind,
                offset=offset,
            )


def _state_dict(state: object, offset: int) -> dict:
    if not isinstance(state, PDict):
        raise PickleError(f"joblib wrapper at offset {offset} gets a state the scanner cannot read", offset, incomplete=True)
    if len(state) >= DISPLAY_ITEMS:
        # the VM keeps only the first items of a dict: a later key could override what we see
        raise PickleError(f"joblib wrapper at offset {offset} has too many state entries to follow safely", offset,
                          incomplete=True)
    return {k: v for k, v in state if isinstance(k, str)}


def joblib_hook(stream: BinaryIO, size: int | None, ctx: ScanContext, scanner: str) -> JoblibHook:
    """The BUILD hook for one pickle scan (fresh state per stream)."""
    return JoblibHook(stream, size, ctx, scanner)
