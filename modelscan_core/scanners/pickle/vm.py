"""A pickle virtual machine that never unpickles and never imports.

It executes the opcode stream the way CPython's C unpickler (`_pickle.c`) does, byte for
byte, but its values are symbols: names the loader would import (`GlobalRef`), calls it
would make (`Call`), and plain data kept only as far as a person needs to read a call's
arguments. It reports facts (this name, used this way, with these arguments, at this
offset) and knows nothing about which names are dangerous; that is `policy.py`'s job.

Where CPython and `pickletools` disagree, this follows CPython: INT/LONG lines are parsed
with `int(x, 0)`, MARK sets a fence that pops may not cross, POP removes a bare MARK, MEMOIZE
uses the count of memo entries, and several pickles may follow one another in a file.

FRAME is where loaders disagree with each other, so the VM reads the way a given loader's
unpickler does (`reader`):

- "bytes", `pickle.loads(data)`: the whole input is one buffer; a FRAME changes nothing.
- "file", the C unpickler over a file object without `peek` (torch.load reads `data.pkl`
  from a BytesIO): a FRAME's bytes are read into a buffer of their own; a read that runs
  past its end drops what is left of it and starts afresh at its end, and the next pickle in
  the file starts at the end of the frame that held the previous STOP.
- with `peek` (pickle.load, np.load, legacy torch.load on an open file) each FRAME is either
  peeked (read as "bytes") or read into its own buffer (as "file"), depending on buffer
  sizes the scanner cannot know: `frame_choices` fixes that choice FRAME by FRAME, and the
  VM records in `mattered` the FRAMEs where the other choice would change what follows, so
  the scanner can follow every reading a loader could make (scanner.py).
- "python", the pure-Python `pickle._Unpickler` that joblib.load uses: a read past the end of a
  frame, or a FRAME before the current one ends, is an error; and what a BUILD hook reads
  (joblib's array bytes) comes from the file, which is at the end of the current frame.

Writers never end a frame inside an operand; each place where a reading differs from
"bytes" is recorded in `divergences`, for the scanner to report.

The stream is read in chunks and never held whole: long byte strings are skipped with a
seek and remembered as a `Blob` (offset, length), containers keep only their first items,
and the memo stores plain data only up to a budget, after which entries become `Unknown`
(so a name fed from an evicted entry is reported as unresolved: failing closed).
"""

from __future__ import annotations

import codecs
import io
import re
import struct
import sys
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from modelscan_core.scanners.pickle.values import (
    BUILT,
    CALLED,
    DISPLAY_ITEMS,
    MUT_ADD,
    MUT_APPEND,
    MUT_BUILD,
    MUT_ITEMS,
    NEW,
    Blob,
    Call,
    GlobalRef,
    PByteArray,
    PDict,
    PSet,
    Unknown,
    is_lossy,
)

CHUNK = 1 << 20
#: bytes/str operands longer than this are left in the file (a `Blob`)
INLINE_LIMIT = 4096
#: a protocol-0 line longer than this cannot be a real model's; stop as incomplete
MAX_LINE = 64 << 20
HIGHEST_PROTOCOL = 5
#: calls remembered per global (for showing arguments), and unresolved events kept
KEEP_CALLS = 4
KEEP_EVENTS = 64
#: past these the scan stops as incomplete: a hostile stream must not cost unbounded memory
MAX_STACK = 5_000_000
MAX_MEMO = 20_000_000
MAX_GLOBALS = 200_000

#: a walk over a loaded value (repr, copy, json, a hash) meeting more values than this, shared
#: parts counted each time, is a billion-laughs payload; nesting deeper than this crashes any
#: recursive walk (no writer nests that deep: pickle.dumps itself recurses); hashing a key of
#: more values than MAX_HASHED keeps the unpickler busy for seconds to forever
MAX_EXPANSION = 1 << 32
MAX_NESTING = 10_000
MAX_HASHED = 1 << 24
#: containers this big or deep are remembered with their size; the rest are tiny and walked
_HEAVY_WEIGHT = 16
_HEAVY_DEPTH = 4
#: the C accelerator asks the table about an id only when its bit, (id >> 4) % _HEAVY_BITS,
#: is set (HEAVY_BITS in _fastvm.c): every entry put in the table sets its bit
_HEAVY_BITS = 1 << 16
_WALK_BUDGET = 64
#: a frame end the C accelerator can take (a FRAME length read from the stream can be any 64-bit number)
_SSIZE_MAX = sys.maxsize

#: how each reader reads FRAMEs (see the module docstring)
READERS = ("bytes", "file", "python")
#: FRAMEs open at once (nested ones fit inside each other); more is no writer's pickle
MAX_SHADOWS = 64
_FAR = 1 << 62

#: the fixed-size operand (or length prefix) right after each opcode that has one
_OPERAND_WIDTH = {
    0x4B: 1, 0x4D: 2, 0x4A: 4, 0x47: 8, 0x71: 1, 0x72: 4, 0x68: 1, 0x6A: 4, 0x8C: 1, 0x95: 8, 0x80: 1,
    0x82: 1, 0x83: 2, 0x84: 4, 0x8A: 1, 0x8B: 4, 0x58: 4, 0x8D: 8, 0x43: 1, 0x42: 4, 0x8E: 8, 0x96: 8,
    0x55: 1, 0x54: 4,
}

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,255}\Z")

_unpack_i = struct.Struct("<i").unpack_from
_unpack_I = struct.Struct("<I").unpack_from
_unpack_Q = struct.Struct("<Q").unpack_from
_unpack_H = struct.Struct("<H").unpack_from
_unpack_d = struct.Struct(">d").unpack_from

_EVICTED = Unknown("memo entry not kept")
#: besides names and ints, what the memo keeps once its budget is spent
_KEEP_PAST_BUDGET = (GlobalRef, Unknown)


class PickleError(Exception):
    """The unpickler would raise here: the stream ends at `offset`."""

    def __init__(self, message: str, offset: int, incomplete: bool = False):
        super().__init__(message)
        self.offset = offset
        self.incomplete = incomplete


class PickleTruncated(PickleError):
    """The bytes ran out before the pickle did (a cut-off file, or a probe's window)."""


class PickleLoadError(PickleError):
    """A well-formed opcode the unpickler refuses as it runs it (a list as a dict key): the
    bytes are a pickle, one that breaks when loaded."""


class PickleHashBomb(PickleLoadError):
    """A key whose hash walks so many values the load never finishes: nothing after it runs."""

    def __init__(self, weight: int, offset: int):
        super().__init__(f"the unpickler hashes a key of more than {weight:,} values here: loading does not finish",
                         offset)
        self.weight = weight


@dataclass
class StreamFacts:
    """What one pickle stream (PROTO ... STOP) would make a loader do."""

    start: int
    end: int = 0
    protocol: int = 0
    stopped: bool = False
    error: str | None = None
    error_offset: int | None = None
    error_incomplete: bool = False
    error_truncated: bool = False
    error_at_load: bool = False  # the stream is well-formed; the unpickler refuses a value in it
    globals: list[GlobalRef] = field(default_factory=list)
    dynamic_calls: list[Call] = field(default_factory=list)  # calls of a non-name callable
    unresolved: list[tuple[int, str]] = field(default_factory=list)  # names not known statically
    calls: int = 0  # calls of any kind made before the end
    ops: int = 0
    next_start: int = 0  # where the loader's next load() begins (the end of a frame read whole)
    #: (offset, size) of resource bombs: a value walks expand past MAX_EXPANSION, nesting past
    #: MAX_NESTING, a hashed key past MAX_HASHED
    expansion: tuple[int, int] | None = None
    nesting: tuple[int, int] | None = None
    hash_bomb: tuple[int, int] | None = None
    value: object = None  # what the pickle returns (the top of the stack at STOP)
    #: (offset, target, MUT_* bit, detail): BUILD/SETITEM/APPEND/ADDITEMS on an imported object
    #: itself (a class, a function, a module, a registry), not on an object the pickle made
    mutations: list[tuple[int, GlobalRef, int, object]] = field(default_factory=list)
    #: (offset, why): a security-relevant use of a value the scanner did not keep (an evicted
    #: memo entry, a state dict that lost a computed key): it fails closed in the policy
    blind: list[tuple[int, str]] = field(default_factory=list)
    dropped_events: int = 0  # dynamic calls, mutations or blind uses past KEEP_EVENTS (not kept)


#: BuildHook(vm, target, state, offset) may consume bytes that follow BUILD (joblib arrays)
#: and returns the value that replaces the target on the stack, or None to keep it.
BuildHook = Callable[["PickleVM", object, object, int], object]


class PickleVM:
    """Runs one pickle stream at a time from a binary file object, read as `reader` reads it."""

    def __init__(
        self,
        f: BinaryIO,
        *,
        size: int | None = None,
        memo_budget: int = 200_000,
        build_hook: BuildHook | None = None,
        accelerate: bool = True,
        reader: str = "bytes",
        frame_choices: tuple[bool, ...] = (),
        observe: Callable[[GlobalRef], object] | None = None,
    ):
        if reader not in READERS:
            raise ValueError(f"unknown reader {reader!r}")
        self.f = f
        #: observe(ref) is asked once per new global for a callable that sees each of its calls
        self.observe = observe
        self._fast = _fast_run if accelerate else None
        self.size = size
        self.memo_budget = memo_budget
        self.build_hook = build_hook
        self._seekable = _is_seekable(f)
        # read state, shared with hooks through file_read()/file_skip()/file_tell()
        self._buf = b""
        self._pos = 0
        self._base = f.tell() if self._seekable else 0  # file offset of _buf[0]
        self._eof = False
        # frames (see the module docstring)
        self.reader = reader
        self._choices = frame_choices
        self._read_own = reader == "file"  # a FRAME past the given choices: read into its own buffer?
        self._nframes = 0  # FRAMEs that asked for a choice so far
        self._region: int | None = None  # end of the frame buffer the unpickler reads from, if any
        self._shadows: list[list[int]] = []  # [choice, end] of frames read as part of a larger buffer
        #: choices (FRAME numbers) where reading the frame into its own buffer changes what follows
        self.mattered: list[int] = []
        #: (offset, what) where this reading and the "bytes" reading differ
        self.divergences: list[tuple[int, str]] = []
        self.hook_consumed = False  # a BUILD hook took bytes from the stream (joblib arrays)
        self.hook_in_frame = False  # ...while a frame had bytes left (joblib.load then reads elsewhere)

    # -- reading ---------------------------------------------------------------

    def tell(self) -> int:
        return self._base + self._pos

    def _fill(self, need: int) -> bool:
        """Make `need` bytes available at _pos if the file has them. False at EOF."""
        buf, pos = self._buf, self._pos
        have = len(buf) - pos
        if have >= need:
            return True
        if self._eof:
            return False
        parts = [buf[pos:]]
        want = max(CHUNK, need - have)
        while have < need or want > 0:
            piece = self.f.read(want)
            if not piece:
                self._eof = True
                break
            parts.append(piece)
            have += len(piece)
            want -= len(piece)
            if have >= need and want <= 0:
                break
            want = max(want, need - have)
            if have >= need:
                break
        self._base += pos
        self._buf = b"".join(parts)
        self._pos = 0
        return len(self._buf) >= need

    def read(self, n: int) -> bytes:
        """Consume n bytes as the unpickler reads an operand. Raises PickleError when short."""
        if self._region is not None or self._shadows:
            self._cross(self.tell() + n)
        return self._read_plain(n)

    def _read_plain(self, n: int) -> bytes:
        if not self._fill(n):
            raise PickleTruncated(f"stream ends inside a {n}-byte read", self.tell(), incomplete=False)
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def skip(self, n: int) -> None:
        """Move past an n-byte operand without keeping it (seek when the file allows it)."""
        if self._region is not None or self._shadows:
            self._cross(self.tell() + n)
        self._skip_plain(n)

    def _skip_plain(self, n: int) -> None:
        have = len(self._buf) - self._pos
        if n <= have:
            self._pos += n
            return
        target = self.tell() + n
        if self._seekable:
            if self.size is not None and target > self.size:
                raise PickleTruncated(f"stream ends inside a {n}-byte operand", self.tell())
            self.f.seek(target)
            self._base, self._buf, self._pos = target, b"", 0
            self._eof = False
            return
        n -= have
        self._base += len(self._buf)
        self._buf, self._pos = b"", 0
        while n > 0:
            piece = self.f.read(min(n, CHUNK))
            if not piece:
                self._eof = True
                raise PickleTruncated("stream ends inside an operand", self._base)
            n -= len(piece)
            self._base += len(piece)

    def at_eof(self) -> bool:
        return not self._fill(1)

    # -- what a BUILD hook reads: the file, wherever the unpickler's frame left it ---------

    def file_tell(self) -> int:
        """Where the file is: past the whole current frame when the reader read it into a buffer."""
        if self.reader == "python" and self._region is not None and self._region > self.tell():
            return self._region
        return self.tell()

    def file_read(self, n: int) -> bytes:
        """Read n bytes from the file itself (joblib's array bytes): after the current frame for
        the pure-Python unpickler, which then goes on with the rest of that frame."""
        self._note_hook()
        if self.reader != "python" or self._region is None or self._region <= self.tell():
            return self._read_plain(n)
        tail, data = self._frame_tail_then(n, keep=True)
        self._rebase(tail, self._region + n)
        self._region = self.tell() + len(tail)
        return data

    def file_skip(self, n: int) -> None:
        self._note_hook()
        if self.reader != "python" or self._region is None or self._region <= self.tell():
            self._skip_plain(n)
            return
        tail, _ = self._frame_tail_then(0, keep=False)
        end = self._region
        self._rebase(tail, end + n)
        if self.size is not None and end + n > self.size:
            raise PickleTruncated(f"stream ends inside a {n}-byte array", end)
        self._region = self.tell() + len(tail)

    def _note_hook(self) -> None:
        self.hook_consumed = True
        here = self.tell()
        if any(end > here for _, end in self._shadows) or (self._region is not None and self._region > here):
            self.hook_in_frame = True

    def _frame_tail_then(self, n: int, keep: bool) -> tuple[bytes, bytes]:
        """The unread rest of the current frame, and n bytes of the file after it."""
        here, end = self.tell(), self._region
        if end - here > MAX_LINE:
            raise PickleError("a joblib array inside a frame larger than the scan limit", here, incomplete=True)
        tail = self._read_plain(end - here)
        data = self._read_plain(n) if keep else b""
        return tail, data

    def _rebase(self, prefix: bytes, cont: int) -> None:
        """From now on the stream reads `prefix`, then the file from offset `cont` on.

        Offsets inside `prefix` then map to `cont - len(prefix) + i`: off by what was dropped,
        for the one operand or frame tail that straddled (never in a file a writer made).
        """
        rel = cont - self._base
        if 0 <= rel <= len(self._buf):
            rest = self._buf[rel:]
        else:
            rest = b""
            if self._seekable:
                self.f.seek(cont)
                self._eof = False
            else:  # forward only: cont is ahead of everything read so far
                gap = cont - (self._base + len(self._buf))
                while gap > 0:
                    piece = self.f.read(min(gap, CHUNK))
                    if not piece:
                        self._eof = True
                        break
                    gap -= len(piece)
        self._buf = prefix + rest
        self._pos = 0
        self._base = cont - len(prefix)

    # -- frame boundaries ---------------------------------------------------------

    def _boundary(self) -> int:
        """The nearest frame end ahead that a read may not cross unnoticed (or a huge number)."""
        here = self.tell()
        if self._region is not None and self._region <= here:
            self._region = None  # the frame was used up exactly: reading goes on from the file
        if self._shadows:
            self._shadows = [s for s in self._shadows if s[1] > here]
        ends = [s[1] for s in self._shadows]
        if self._region is not None:
            ends.append(self._region)
        return min(ends) if ends else _FAR

    def _cross(self, end: int) -> bool:
        """The unpickler is about to read [tell(), end). Where a frame ends strictly inside it,
        each reader goes its own way (see the module docstring). True when the reader dropped
        the rest of its frame buffer: the read then starts at the frame's end (now tell())."""
        here = self.tell()
        if self._shadows:
            keep = []
            for choice, frame_end in self._shadows:
                if here < frame_end < end:
                    self._matter(choice, here, "a FRAME ends inside an operand")
                elif frame_end > here:
                    keep.append([choice, frame_end])
            self._shadows = keep
        region = self._region
        if region is None or region <= here:
            self._region = None
            return False
        if region >= end:
            return False
        if self.reader == "python":
            raise PickleError("pickle exhausted before end of frame (a FRAME ends inside an operand)", here)
        # the C unpickler drops the rest of its frame buffer and reads on from the file
        self._region = None
        if len(self.divergences) < KEEP_EVENTS:
            self.divergences.append((here, f"FRAME ends inside an operand: {region - here} byte(s) skipped"))
        self._skip_plain(region - here)
        return True

    def _matter(self, choice: int, at: int, what: str) -> None:
        if choice not in self.mattered:
            self.mattered.append(choice)
        if len(self.divergences) < KEEP_EVENTS:
            self.divergences.append((at, what))

    def _near_boundary(self) -> None:
        """An opcode within 16 bytes of a frame end: if its fixed operand straddles the end, do
        what this reader does before the inline code reads it (splice in what it would read)."""
        if not self._fill(1):
            return
        op = self._buf[self._pos]
        width = _OPERAND_WIDTH.get(op)
        if not width:
            return  # no fixed operand: lines and long operands go through read()/_readline()
        self._pos += 1
        if self._cross(self.tell() + width):
            # dropped: the operand comes from the end of the frame; the opcode stays in front of it
            operand = self._read_plain(width)
            self._rebase(bytes([op]) + operand, self.tell())
        else:
            self._pos -= 1

    def _frame(self, n: int, at: int) -> None:
        """FRAME n, as this reader reads it."""
        here = self.tell()
        end = here + n
        if self.reader == "python":
            if self._region is not None and self._region > here:
                raise PickleError("beginning of a new frame before end of current frame", at)
            self._region = end
            return
        if self._region is not None and self._region > here:
            if end <= self._region:
                return  # the C unpickler already holds these bytes: nothing happens
            # not in the buffer: what is left of it is dropped, the new frame starts at its end
            if len(self.divergences) < KEEP_EVENTS:
                self.divergences.append((at, f"FRAME inside a frame: {self._region - here} byte(s) skipped"))
            self._skip_plain(self._region - here)
            self._region = None
            here = self.tell()
            end = here + n
        for shadow in self._shadows:
            if here < shadow[1] < end:
                self._matter(shadow[0], at, "a FRAME runs past the end of the frame around it")
        if len(self._shadows) >= MAX_SHADOWS:
            raise PickleError(f"more than {MAX_SHADOWS} FRAMEs nested", at, incomplete=True)
        choice = self._nframes
        self._nframes += 1
        own = self._choices[choice] if choice < len(self._choices) else self._read_own
        if own:
            self._region = end
        else:
            self._shadows.append([choice, end])

    def _after_stop(self, facts: StreamFacts) -> None:
        """Where the next load() begins: a frame read whole is consumed whole."""
        here = self.tell()
        facts.end = here
        if self._region is not None and self._region > here:
            if len(self.divergences) < KEEP_EVENTS:
                self.divergences.append((here, f"STOP {self._region - here} byte(s) before the end of its frame"))
            try:
                self._skip_plain(self._region - here)
            except PickleError:
                pass
        for choice, end in self._shadows:
            if end > here:
                self._matter(choice, here, "STOP before the end of its frame")
        self._region = None
        self._shadows = []
        facts.next_start = self.tell()

    def _readline(self) -> bytes:
        """A protocol-0 operand: bytes up to and including the next newline."""
        line = self._readline_plain()
        if self._region is None and not self._shadows:
            return line
        self._pos -= len(line)
        if self._cross(self.tell() + len(line)):
            return self._readline_plain()  # dropped: the line is read afresh from the frame's end
        self._pos += len(line)
        return line

    def _rest(self) -> bytes:
        """What is left of the stream (a line operand cut by EOF), up to MAX_LINE."""
        self._fill(MAX_LINE)
        return self._buf[self._pos : self._pos + MAX_LINE]

    def _readline_plain(self) -> bytes:
        buf, pos = self._buf, self._pos
        nl = buf.find(b"\n", pos)
        while nl < 0:
            searched = len(buf) - pos  # the newline can only be in what the next fill adds
            if searched > MAX_LINE:
                raise PickleError("line operand longer than the scan limit", self.tell(), incomplete=True)
            if self._eof:
                raise PickleTruncated("stream ends inside a line operand", self.tell())
            self._fill(searched + CHUNK)  # may stop short at EOF: the newline can still be there
            buf, pos = self._buf, self._pos
            nl = buf.find(b"\n", pos + searched)
        self._pos = nl + 1
        return buf[pos : nl + 1]

    def _take(self, n: int, offset: int, text: bool):
        """A length-prefixed operand: small ones as values, long ones as Blob."""
        if self._region is not None or self._shadows:
            self._cross(self.tell() + n)
        if n > INLINE_LIMIT:
            start = self.tell()
            self._skip_plain(n)
            return Blob(start, n, text)
        if not self._fill(n):
            raise PickleTruncated(f"stream ends inside a {n}-byte operand", self.tell())
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        if text:
            try:
                return data.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as exc:
                raise PickleError(f"invalid UTF-8 in string operand: {exc.reason}", offset) from None
        return data

    # -- the machine -----------------------------------------------------------

    def run(self) -> StreamFacts:
        """Execute one pickle stream from the current position to STOP (or its failure)."""
        facts = StreamFacts(start=self.tell())
        try:
            self._execute(facts)
        except PickleError as exc:
            facts.error, facts.error_offset, facts.error_incomplete = str(exc), exc.offset, exc.incomplete
            facts.error_truncated = isinstance(exc, PickleTruncated)
            facts.error_at_load = isinstance(exc, PickleLoadError)
            if isinstance(exc, PickleHashBomb):
                facts.hash_bomb = (exc.offset, exc.weight)
        except (ValueError, OverflowError, struct.error) as exc:
            facts.error, facts.error_offset = f"{type(exc).__name__}: {exc}", self.tell()
        except (MemoryError, RecursionError) as exc:
            facts.error, facts.error_offset = f"stopped: {type(exc).__name__}", self.tell()
            facts.error_incomplete = True
        except Exception as exc:  # a VM defect: what was found so far is kept, the rest is unread
            facts.error, facts.error_offset = f"internal error: {type(exc).__name__}: {exc}", self.tell()
        if facts.stopped:
            self._after_stop(facts)
        else:
            facts.end = facts.next_start = self.tell()
        return facts

    def _execute(self, facts: StreamFacts) -> None:  # noqa: C901 - one loop, by design
        # The hot state lives in locals: `buf`, `pos`, `blen`, `base` mirror self._buf,
        # self._pos, len(self._buf) and self._base. Every call into a reading method is
        # bracketed by `self._pos = pos` before and `buf, pos, blen, base, blim = self._sync()` after.
        # `blim` is where the nearest frame end falls in `buf`: inline code never reads across it.
        stack: list = []
        marks: list[int] = []
        fence = 0
        mseq: list = []
        msparse: dict = {}
        memo_left = self.memo_budget
        refs: dict[tuple[str, str], GlobalRef] = {}
        #: (module, name) -> {attribute: value}: names the pickle rewrote (BUILD/SETITEM on a global)
        patches: dict[tuple[str, str], dict] = {}
        observe = self.observe
        planted_any = False  # some BUILD replaced a method the load calls
        ops = 0
        sync = self._sync
        take = self._take
        readline = self._readline

        def err(msg: str, at: int) -> PickleError:
            return PickleError(msg, at)

        def new_global(module: object, name: object, at: int, opname: str) -> object:
            if not isinstance(module, str) or not isinstance(name, str):
                symbolic = (str, Unknown, Call, GlobalRef, Blob)
                if not isinstance(module, symbolic) or not isinstance(name, symbolic):
                    raise err(f"{opname} requires str operands", at)
                if len(facts.unresolved) < KEEP_EVENTS:
                    facts.unresolved.append((at, f"{opname} operands are not static strings: {module!r}, {name!r}"))
                return Unknown(f"name computed at load time ({opname})")
            if patches:
                patched = _patched_name(patches, module, name)
                if patched is not _MISSING:
                    return patched_value(patched, module, name, at, opname)
            key = (module, name)
            ref = refs.get(key)
            if ref is None:
                if len(refs) >= MAX_GLOBALS:
                    raise PickleError(f"more than {MAX_GLOBALS:,} distinct globals", at, incomplete=True)
                ref = refs[key] = GlobalRef(module, name, at, opname)
                facts.globals.append(ref)
                if observe is not None:
                    ref.observer = observe(ref)
            return ref

        def patched_value(patched: object, module: str, name: str, at: int, opname: str) -> object:
            """find_class of a name the pickle itself rewrote returns what it wrote there."""
            value, rest = patched
            if rest and isinstance(value, GlobalRef):
                return new_global(value.module, f"{value.name}.{rest}" if value.name else rest, at, opname)
            if rest or isinstance(value, Unknown):
                event(facts.unresolved, (at, f"{opname} {module}.{name}: a name the pickle rewrote earlier"))
                return Unknown(f"name rewritten at load time ({module}.{name})")
            return value

        def event(events: list, item: object) -> None:
            if len(events) < KEEP_EVENTS:
                events.append(item)
            else:
                facts.dropped_events += 1

        def note_call(func: object, call: Call, use: int) -> None:
            facts.calls += 1
            if isinstance(func, GlobalRef):
                func.uses |= use
                func.ncalls += 1
                if len(func.calls) < KEEP_CALLS:
                    func.calls.append(call)
                if type(call.args) is tuple:  # names handed to a callable, from every call
                    for arg in call.args:
                        if type(arg) is GlobalRef and arg not in func.arg_refs:
                            func.arg_refs.append(arg)
                if func.observer is not None:
                    func.observer(call)
            else:
                event(facts.dynamic_calls, call)

        def mutate(target: object, bit: int, at: int, detail: object) -> None:
            """An opcode changed `target` after it was made; a global changed is a finding."""
            if type(target) is Call:
                target.mutated |= bit
            elif type(target) is GlobalRef:
                target.mutated |= bit
                event(facts.mutations, (at, target, bit, detail))
            elif target is _EVICTED and planted_any:
                # the object may be one whose methods an earlier BUILD replaced: fail closed
                event(facts.blind, (at, "a method call on an object the scanner did not keep (memo budget)"))

        def call_planted(target: object, attribute: str, at: int) -> None:
            """The loader calls `target.<attribute>`: run what an earlier BUILD planted there."""
            planted = target.planted if type(target) is Call else None
            if planted and attribute in planted:
                value = planted[attribute]
                note_call(value, Call(value, Unknown(f"argument of a planted {attribute}"), attribute, at), CALLED)

        def build(target: object, state: object, at: int) -> None:
            nonlocal planted_any
            if type(target) is Call and target.planted is None and type(state) is tuple and len(state) != 2:
                # the common case (numpy dtypes and arrays, __setstate__ of a tuple): nothing planted
                target.mutated |= MUT_BUILD
                if type(target.func) is GlobalRef:
                    target.func.uses |= BUILT
                if state and _symbolic(state[0]):
                    # a callable in the state replaces what the object calls (a partial's func)
                    target.planted = {STATE: state}
                return
            call_planted(target, "__setstate__", at)
            mutate(target, MUT_BUILD, at, state)
            _mark_built(target)
            attributes, blind = _state_attributes(state)
            if blind:
                event(facts.blind, (at, f"BUILD with {blind}"))
            if type(target) is GlobalRef:
                # into a class, a function or a module: every value becomes an attribute that the
                # loader and the interpreter call later (`__new__`, `__setstate__`, `__del__`...)
                record_patch(target, attributes, blind, at)
                for _, value in attributes:
                    if _symbolic(value):
                        note_call(value, Call(value, Unknown("class attribute"), "setstate", at), CALLED)
                if len(attributes) >= DISPLAY_ITEMS:
                    event(facts.unresolved, (at, "BUILD sets more class attributes than the scanner keeps; "
                                                 "any of them may be called later"))
                return
            planted = None
            stored = None
            for key, value in attributes:
                if type(key) is str and type(target) is Call and type(value) in _STORED_TYPES \
                        and not (key[:2] == "__" and key[-2:] == "__"):
                    if stored is None:
                        stored = []
                    stored.append((key, value))
                if type(key) is not str:
                    if _symbolic(value):  # a key computed at load time may spell any method
                        note_call(value, Call(value, Unknown("object state"), "setstate", at), CALLED)
                elif key == "__class__":
                    if type(value) is GlobalRef:
                        value.uses |= BUILT  # obj.__class__ = X: X's methods run on the object from now on
                elif key in _CALLED_ATTRIBUTES and _symbolic(value):
                    if type(target) is Call:
                        if planted is None:
                            planted = target.planted = dict(target.planted or {})
                        planted[key] = value
                        planted_any = True
                    else:  # an object the scanner cannot follow: assume the load calls it
                        note_call(value, Call(value, Unknown("object state"), "setstate", at), CALLED)
            if stored is not None:
                if planted is None:
                    planted = target.planted = dict(target.planted or {})
                planted[STORED] = stored + planted.get(STORED, [])

        def record_patch(target: GlobalRef, attributes: list, blind: str, at: int) -> None:
            names = patches.setdefault((target.module, target.name), {})
            if blind or any(type(k) is not str for k, _ in attributes):
                names[_ANY] = Unknown("attributes set at load time")
            for key, value in attributes:
                if type(key) is str:
                    names[key] = value

        def setitems(target: object, items: list, start: int, at: int) -> None:
            """SETITEM(S) on something that is not a dict literal: its __setitem__ runs."""
            mutate(target, MUT_ITEMS, at, items[start : start + 2 * DISPLAY_ITEMS])
            if type(target) is GlobalRef:
                _loader_table_patch(patches, target, items, start)

        def pop_mark(at: int) -> list:
            nonlocal fence
            if not marks:
                raise err("MARK expected but none is open", at)
            start = marks.pop()
            items = stack[start:]
            del stack[start:]
            fence = marks[-1] if marks else 0
            return items

        def memo_put(idx: int, value: object) -> None:
            nonlocal memo_left
            if memo_left > 0:
                memo_left -= 1
            else:
                # Past the budget keep only what can name a global or be one; the rest
                # becomes Unknown, which fails closed wherever it is used as a name.
                t = type(value)
                if t is str:
                    if not (value[:1].isalpha() or value[:1] == "_") or not _IDENTIFIER.match(value):
                        value = _EVICTED
                elif t is not int and t not in _KEEP_PAST_BUDGET:
                    value = _EVICTED
            if idx == len(mseq):
                mseq.append(value)
                while msparse and len(mseq) in msparse:
                    mseq.append(msparse.pop(len(mseq)))
            elif idx < len(mseq):
                mseq[idx] = value
            else:
                msparse[idx] = value

        heavy: dict[int, list] = {}  # id -> [container, weight, depth] of the big ones (see _weigh)
        heavy_bits = bytearray(_HEAVY_BITS >> 3)  # which ids may be in `heavy` (for the C side)
        counting = [heavy]  # [None] once a bomb is reported: sizes are no longer counted

        def sized(c: object, w: int, d: int, at: int) -> None:
            """Remember a container's size and report a bomb once. Past the nesting limit sizes
            are no longer counted (a chain of a million levels would cost a million entries);
            past the expansion limit weights saturate, so a hashed key made of it still shows."""
            if w < _HEAVY_WEIGHT and d < _HEAVY_DEPTH:
                return
            if d > MAX_NESTING:
                facts.nesting = (at, d)
                counting[0] = None
                heavy.clear()
                return
            if w > MAX_EXPANSION:
                if facts.expansion is None:
                    facts.expansion = (at, w)
                w = MAX_EXPANSION + 1
            key = id(c)
            heavy[key] = [c, w, d]
            bit = (key >> 4) & (_HEAVY_BITS - 1)
            heavy_bits[bit >> 3] |= 1 << (bit & 7)

        def size_new(c: object, items, start: int, at: int) -> None:
            if counting[0] is None:
                return
            w, d = 1, 0
            for i in range(start, len(items)):
                iw, idepth = _weigh(items[i], heavy)
                w += iw
                if idepth > d:
                    d = idepth
            sized(c, w, d + 1, at)

        def size_add(target: object, items, start: int, at: int) -> None:
            if counting[0] is None:
                return
            w, d = _weigh(target, heavy)
            for i in range(start, len(items)):
                iw, idepth = _weigh(items[i], heavy)
                w += iw
                if idepth + 1 > d:
                    d = idepth + 1
            sized(target, w, d, at)

        def memo_get(idx: int, at: int) -> object:
            if 0 <= idx < len(mseq):
                return mseq[idx]
            value = msparse.get(idx, _MISSING)
            if value is _MISSING:
                raise err(f"memo key {idx} was never set", at)
            return value

        fast = self._fast
        buf, pos, blen, base, blim = sync()
        checked = -1  # the offset of an opcode next to a frame end whose operand was looked at
        try:
            while True:
                if pos + 16 > blim and base + pos != checked:
                    # a frame ends within 16 bytes: each reader treats a straddling operand its own way
                    self._pos = pos
                    self._near_boundary()
                    buf, pos, blen, base, blim = sync()
                    checked = base + pos
                if pos + 16 > blen:
                    if not self._eof:
                        # once per chunk: at most one value per byte can have been added since
                        if len(stack) + len(marks) > MAX_STACK or len(mseq) + len(msparse) > MAX_MEMO:
                            raise PickleError(f"more than {MAX_STACK:,} stack or {MAX_MEMO:,} memo entries: "
                                              "stopped before memory runs out", base + pos, incomplete=True)
                        self._pos = pos
                        self._fill(16)
                        buf, pos, blen, base, blim = sync()
                    if pos >= blen:
                        raise PickleTruncated("stream ends without STOP (truncated pickle)", base + pos)
                if fast is not None:
                    # The C accelerator runs data-only opcodes and stops before anything else. It runs
                    # up to a frame end (`blim`): it reads no operand past it, so what it runs reads
                    # the same in every reader; where it stops next to the end, the opcode is looked
                    # at above before it runs here.
                    limit = min(blen if self._eof else blen - 16, blim)
                    if pos < limit and buf[pos] != 0x95:  # (FRAME is left to the code below)
                        pos, fence, memo_left, n = fast(
                            buf, pos, limit, stack, marks, mseq, memo_left, fence, not msparse, PDict, DISPLAY_ITEMS,
                            _KEEP_PAST_BUDGET, _EVICTED, min(blim, _SSIZE_MAX), counting[0], MAX_EXPANSION, MAX_NESTING,
                            heavy_bits,
                        )
                        ops += n
                        if pos >= limit or (pos + 16 > blim and base + pos != checked):
                            continue
                op = buf[pos]
                pos += 1
                ops += 1
                # Ordered by how often real pickles use them; the data-only ops stay inline.
                if op == 0x94:  # MEMOIZE
                    if len(stack) <= fence:
                        raise err("MEMOIZE on an empty stack", base + pos - 1)
                    if memo_left > 0 and not msparse:
                        mseq.append(stack[-1])
                        memo_left -= 1
                    else:
                        memo_put(len(mseq) + len(msparse), stack[-1])
                    continue
                if op == 0x8C:  # SHORT_BINUNICODE
                    n = buf[pos]
                    end = pos + 1 + n
                    if end <= blen and end <= blim:
                        try:
                            stack.append(buf[pos + 1 : end].decode("utf-8", "surrogatepass"))
                        except UnicodeDecodeError as exc:
                            raise err(f"invalid UTF-8 in string operand: {exc.reason}", base + pos - 1) from None
                        pos = end
                    else:
                        self._pos = pos + 1
                        stack.append(take(n, base + pos - 1, True))
                        buf, pos, blen, base, blim = sync()
                    continue
                if op == 0x4B:  # K BININT1
                    stack.append(buf[pos])
                    pos += 1
                    continue
                if op == 0x5D:  # ] EMPTY_LIST
                    stack.append([])
                    continue
                if op == 0x28:  # ( MARK
                    fence = len(stack)
                    marks.append(fence)
                    continue
                if op == 0x65:  # e APPENDS
                    if not marks:
                        raise err("APPENDS without MARK", base + pos - 1)
                    k = marks.pop()
                    fence = marks[-1] if marks else 0
                    if k <= 0:
                        raise err("APPENDS without a list", base + pos - 1)
                    if k < len(stack):
                        target = stack[k - 1]
                        if type(target) is list:
                            size_add(target, stack, k, base + pos - 1)
                            room = DISPLAY_ITEMS - len(target)
                            if room > 0:
                                target.extend(stack[k : k + room])
                        elif _is_bytearray(target):
                            _extend_bytearray(target, stack[k:], base + pos - 1)
                        elif isinstance(target, (Call, GlobalRef, Unknown)):
                            _mark_built(target)  # its own extend/append gets the items
                            mutate(target, MUT_APPEND, base + pos - 1, stack[k : k + DISPLAY_ITEMS])
                            # the C unpickler calls extend when the object has one, append otherwise
                            call_planted(target, "extend", base + pos - 1)
                            call_planted(target, "append", base + pos - 1)
                        else:
                            raise err(f"APPENDS to {type(target).__name__}", base + pos - 1)
                        del stack[k:]
                    continue
                if op == 0x71 or op == 0x68:  # q BINPUT / h BINGET
                    idx = buf[pos]
                    pos += 1
                    if op == 0x71:
                        if len(stack) <= fence:
                            raise err("BINPUT on an empty stack", base + pos - 2)
                        memo_put(idx, stack[-1])
                    else:
                        stack.append(memo_get(idx, base + pos - 2))
                    continue
                if op == 0x4D:  # M BININT2
                    stack.append(buf[pos] | (buf[pos + 1] << 8))
                    pos += 2
                    continue
                if op == 0x4A:  # J BININT
                    stack.append(_unpack_i(buf, pos)[0])
                    pos += 4
                    continue
                if op == 0x75 or op == 0x73:  # u SETITEMS / s SETITEM
                    at = base + pos - 1
                    if op == 0x75:
                        if not marks:
                            raise err("SETITEMS without MARK", at)
                        k = marks.pop()
                        fence = marks[-1] if marks else 0
                    else:
                        k = len(stack) - 2
                    if k <= 0:
                        raise err("SETITEMS without a dict", at)
                    if k < len(stack):
                        target = stack[k - 1]
                        if (len(stack) - k) % 2:
                            if len(stack) - k > 1 and isinstance(target, (Call, GlobalRef, Unknown)):
                                _mark_built(target)  # the pure-Python unpickler sets the pairs before it fails
                            raise err("odd number of items for SETITEMS", at)
                        if type(target) is PDict:
                            _set_items(target, stack, k, at, heavy)
                            size_add(target, stack, k, at)
                        elif isinstance(target, (Call, GlobalRef, Unknown)):
                            _mark_built(target)  # its own __setitem__ gets the items
                            setitems(target, stack, k, at)
                        else:
                            raise err(f"SETITEMS on {type(target).__name__}", at)
                        del stack[k:]
                    continue
                if op == 0x7D:  # } EMPTY_DICT
                    stack.append(PDict())
                    continue
                if op == 0x85 or op == 0x86 or op == 0x87:  # TUPLE1/2/3
                    n = op - 0x84
                    if len(stack) - fence < n:
                        raise err("stack underflow building a tuple", base + pos - 1)
                    t = tuple(stack[-n:])
                    del stack[-n:]
                    size_new(t, t, 0, base + pos - 1)
                    stack.append(t)
                    continue
                if op == 0x29:  # ) EMPTY_TUPLE
                    stack.append(())
                    continue
                if op == 0x4E:  # N NONE
                    stack.append(None)
                    continue
                if op == 0x88 or op == 0x89:  # NEWTRUE / NEWFALSE
                    stack.append(op == 0x88)
                    continue
                if op == 0x47:  # G BINFLOAT
                    stack.append(_unpack_d(buf, pos)[0])
                    pos += 8
                    continue
                if op == 0x72 or op == 0x6A:  # r LONG_BINPUT / j LONG_BINGET
                    idx = _unpack_I(buf, pos)[0]
                    pos += 4
                    if op == 0x72:
                        if len(stack) <= fence:
                            raise err("LONG_BINPUT on an empty stack", base + pos - 5)
                        memo_put(idx, stack[-1])
                    else:
                        stack.append(memo_get(idx, base + pos - 5))
                    continue
                if op == 0x61:  # a APPEND
                    if len(stack) < 2:
                        raise err("APPEND needs a list and a value", base + pos - 1)
                    value = stack.pop()
                    target = stack[-1]
                    if type(target) is list:
                        size_add(target, (value,), 0, base + pos - 1)
                        if len(target) < DISPLAY_ITEMS:
                            target.append(value)
                    elif _is_bytearray(target):
                        _extend_bytearray(target, (value,), base + pos - 1)
                    elif isinstance(target, (Call, GlobalRef, Unknown)):
                        _mark_built(target)  # its own extend/append gets the item
                        mutate(target, MUT_APPEND, base + pos - 1, [value])
                        # APPEND too: the C unpickler calls extend([value]) when the object has one
                        call_planted(target, "extend", base + pos - 1)
                        call_planted(target, "append", base + pos - 1)
                    else:
                        raise err(f"APPEND to {type(target).__name__}", base + pos - 1)
                    continue
                if op == 0x74:  # t TUPLE
                    t = tuple(pop_mark(base + pos - 1))
                    size_new(t, t, 0, base + pos - 1)
                    stack.append(t)
                    continue
                if op == 0x2E:  # . STOP
                    if len(stack) <= fence:
                        raise err("STOP on an empty stack", base + pos - 1)
                    facts.stopped = True
                    facts.value = stack[-1]
                    break

                # Everything below is rare in data and may read through the file object.
                at = base + pos - 1
                self._pos = pos
                if op == 0x95:  # FRAME: what it does depends on the reader
                    self._frame(_unpack_Q(self.read(8), 0)[0], at)
                elif op == 0x93:  # STACK_GLOBAL
                    if len(stack) - fence < 2:
                        raise err("STACK_GLOBAL needs a module and a name", at)
                    name = stack.pop()
                    module = stack.pop()
                    stack.append(new_global(module, name, at, "STACK_GLOBAL"))
                elif op == 0x52:  # R REDUCE
                    if len(stack) - fence < 2:
                        raise err("REDUCE needs a callable and arguments", at)
                    args = stack.pop()
                    func = stack[-1]
                    if not _spreadable(args):
                        raise err(f"REDUCE arguments must be a tuple, not {type(args).__name__}", at)
                    # (the C unpickler wants a tuple; the pure-Python one calls func(*args) with any iterable)
                    call = Call(func, args, "reduce", at)
                    note_call(func, call, CALLED)
                    stack[-1] = call
                elif op == 0x62:  # b BUILD
                    if len(stack) - fence < 2:
                        raise err("BUILD needs an object and its state", at)
                    state = stack.pop()
                    target = stack[-1]
                    build(target, state, at)
                    if self.build_hook is not None:
                        replacement = self.build_hook(self, target, state, at)
                        if replacement is not None:
                            stack[-1] = replacement
                elif op == 0x81 or op == 0x92:  # NEWOBJ / NEWOBJ_EX
                    kwargs = None
                    if op == 0x92:
                        if len(stack) - fence < 3:
                            raise err("NEWOBJ_EX needs a class, arguments and keywords", at)
                        kwargs = stack.pop()
                    elif len(stack) - fence < 2:
                        raise err("NEWOBJ needs a class and arguments", at)
                    args = stack.pop()
                    cls = stack[-1]
                    if not _spreadable(args):
                        raise err("NEWOBJ expected an arg tuple", at)
                    call = Call(cls, args, "newobj" if op == 0x81 else "newobj_ex", at, kwargs)
                    note_call(cls, call, NEW)
                    stack[-1] = call
                elif op == 0x58 or op == 0x8D:  # X BINUNICODE / BINUNICODE8
                    width = 4 if op == 0x58 else 8
                    n = (_unpack_I if width == 4 else _unpack_Q)(self.read(width), 0)[0]
                    stack.append(take(n, at, True))
                elif op == 0x42 or op == 0x43 or op == 0x8E or op == 0x96:  # BINBYTES(8), SHORT_BINBYTES, BYTEARRAY8
                    width = 1 if op == 0x43 else 4 if op == 0x42 else 8
                    raw = self.read(width)
                    n = raw[0] if width == 1 else (_unpack_I if width == 4 else _unpack_Q)(raw, 0)[0]
                    value = take(n, at, False)
                    if op == 0x96:  # a bytearray: APPEND(S) extend it
                        if isinstance(value, Blob):
                            value.bytearray = True
                        else:
                            value = PByteArray(value)
                    stack.append(value)
                elif op == 0x80:  # PROTO
                    proto = self.read(1)[0]
                    if proto > HIGHEST_PROTOCOL:
                        raise err(f"unsupported pickle protocol: {proto}", at)
                    facts.protocol = proto
                elif op == 0x63 or op == 0x69:  # c GLOBAL / i INST
                    # the pure-Python unpickler takes a line cut by EOF as it is (less its last
                    # byte, as if it were the newline) and imports it anyway
                    lines = []
                    try:
                        lines.append(readline())
                        lines.append(readline())
                    except PickleTruncated:
                        lines += [self._rest(), b""][: 2 - len(lines)]
                        module, name = (line[:-1].decode("utf-8", "surrogatepass") for line in lines)
                        ref = new_global(module, name, at, "GLOBAL" if op == 0x63 else "INST")
                        if op == 0x69 and marks:  # ...and an INST then calls it
                            note_call(ref, Call(ref, tuple(pop_mark(at)), "inst", at), CALLED)
                        raise
                    module, name = (line[:-1].decode("utf-8", "surrogatepass") for line in lines)
                    if op == 0x63:
                        stack.append(new_global(module, name, at, "GLOBAL"))
                    else:
                        # the pure-Python unpickler imports the name before it looks for the MARK
                        ref = new_global(module, name, at, "INST")
                        if not marks:
                            raise err("INST without MARK", at)
                        call = Call(ref, tuple(pop_mark(at)), "inst", at)
                        note_call(ref, call, CALLED)
                        stack.append(call)
                elif op == 0x6F:  # o OBJ
                    items = pop_mark(at)
                    if not items:
                        raise err("OBJ needs a class", at)
                    call = Call(items[0], tuple(items[1:]), "obj", at)
                    note_call(items[0], call, CALLED)
                    stack.append(call)
                elif op == 0x30:  # 0 POP (removes a bare MARK, as CPython does)
                    if marks and marks[-1] == len(stack):
                        marks.pop()
                        fence = marks[-1] if marks else 0
                    elif len(stack) > fence:
                        stack.pop()
                    else:
                        raise err("POP on an empty stack", at)
                elif op == 0x31:  # 1 POP_MARK
                    pop_mark(at)
                elif op == 0x32:  # 2 DUP
                    if len(stack) <= fence:
                        raise err("DUP on an empty stack", at)
                    stack.append(stack[-1])
                elif op == 0x49 or op == 0x4C:  # I INT / L LONG, parsed as CPython parses them
                    stack.append(_parse_int_line(readline(), op == 0x4C, at))
                elif op == 0x8A or op == 0x8B:  # LONG1 / LONG4
                    raw = self.read(1 if op == 0x8A else 4)
                    n = raw[0] if op == 0x8A else _unpack_i(raw, 0)[0]
                    if n < 0:
                        raise err("LONG pickle has negative byte count", at)
                    if n > 1024:
                        self.skip(n)
                        stack.append(Unknown("very long integer"))
                    else:
                        stack.append(int.from_bytes(self.read(n), "little", signed=True))
                elif op == 0x46:  # F FLOAT
                    stack.append(_parse_float_line(readline(), at))
                elif op == 0x53:  # S STRING (protocol 0: quoted, escaped)
                    stack.append(_parse_string_line(readline(), at))
                elif op == 0x56:  # V UNICODE (raw-unicode-escape)
                    try:
                        stack.append(codecs.raw_unicode_escape_decode(readline()[:-1])[0])
                    except UnicodeDecodeError as exc:
                        raise err(f"bad UNICODE operand: {exc.reason}", at) from None
                elif op == 0x54 or op == 0x55:  # T BINSTRING / U SHORT_BINSTRING
                    raw = self.read(4 if op == 0x54 else 1)
                    n = _unpack_i(raw, 0)[0] if op == 0x54 else raw[0]
                    if n < 0:
                        raise err("BINSTRING pickle has negative byte count", at)
                    stack.append(_ascii(take(n, at, False), at))
                elif op == 0x70 or op == 0x67:  # p PUT / g GET (protocol 0, decimal index)
                    idx = _parse_index_line(readline(), at)
                    if op == 0x70:
                        if len(stack) <= fence:
                            raise err("PUT on an empty stack", at)
                        if idx < 0:
                            raise err("negative PUT argument", at)
                        memo_put(idx, stack[-1])
                    else:
                        stack.append(memo_get(idx, at))
                elif op == 0x6C:  # l LIST
                    items = pop_mark(at)
                    lst = items[:DISPLAY_ITEMS]
                    size_new(lst, items, 0, at)
                    stack.append(lst)
                elif op == 0x64:  # d DICT
                    items = pop_mark(at)
                    if len(items) % 2:
                        raise err("odd number of items for DICT", at)
                    d = PDict()
                    _set_items(d, items, 0, at, heavy)
                    size_new(d, items, 0, at)
                    stack.append(d)
                elif op == 0x8F:  # EMPTY_SET
                    stack.append(PSet())
                elif op == 0x90:  # ADDITEMS
                    items = pop_mark(at)
                    if not stack:
                        raise err("ADDITEMS without a set", at)
                    target = stack[-1]
                    if items and type(target) is PSet:
                        _check_hashable(items, 0, 1, at, heavy)
                        size_add(target, items, 0, at)
                        target.extend(items[: max(0, DISPLAY_ITEMS - len(target))])
                    elif items and isinstance(target, (Call, GlobalRef, Unknown)):
                        _mark_built(target)  # its own add gets the items
                        mutate(target, MUT_ADD, at, items[:DISPLAY_ITEMS])
                        call_planted(target, "add", at)
                    elif items:
                        raise err(f"ADDITEMS on {type(target).__name__}", at)
                elif op == 0x91:  # FROZENSET
                    items = pop_mark(at)
                    _check_hashable(items, 0, 1, at, heavy)
                    frozen = PSet(items[:DISPLAY_ITEMS])
                    size_new(frozen, items, 0, at)
                    stack.append(frozen)
                elif op == 0x50 or op == 0x51:  # P PERSID / Q BINPERSID
                    if op == 0x50:
                        pid = _ascii(readline()[:-1], at)
                    elif len(stack) <= fence:
                        raise err("BINPERSID on an empty stack", at)
                    else:
                        pid = stack.pop()
                    if type(pid) is tuple and len(pid) >= 2 and pid[0] == "module" and type(pid[1]) is GlobalRef:
                        # legacy torch.save of a whole module: its persistent_load returns the class
                        stack.append(pid[1])
                    else:
                        stack.append(Unknown("persistent object", pid))
                elif op == 0x82 or op == 0x83 or op == 0x84:  # EXT1/2/4: the loader's copyreg registry
                    raw = self.read({0x82: 1, 0x83: 2, 0x84: 4}[op])
                    code = int.from_bytes(raw, "little", signed=op == 0x84)
                    if len(facts.unresolved) < KEEP_EVENTS:
                        facts.unresolved.append((at, f"extension code {code}: the name comes from the loader's copyreg registry"))
                    stack.append(Unknown(f"extension code {code}"))
                elif op == 0x97:  # NEXT_BUFFER
                    stack.append(Unknown("out-of-band buffer"))
                elif op == 0x98:  # READONLY_BUFFER
                    if len(stack) <= fence:
                        raise err("READONLY_BUFFER on an empty stack", at)
                else:
                    raise err(f"invalid opcode 0x{op:02x}", at)
                buf, pos, blen, base, blim = sync()
        except IndexError:
            # An inline operand ran past the end of the buffer: only possible at EOF.
            raise PickleTruncated("stream ends inside an operand (truncated pickle)", base + min(pos, blen)) from None
        finally:
            facts.ops = ops
        self._pos = pos

    def _sync(self) -> tuple[bytes, int, int, int, int]:
        base = self._base
        if self._region is None and not self._shadows:
            return self._buf, self._pos, len(self._buf), base, _FAR
        return self._buf, self._pos, len(self._buf), base, self._boundary() - base


_MISSING = object()

try:  # the optional C accelerator; vm.py alone is complete and is the reference
    from modelscan_core.scanners.pickle._fastvm import run as _fast_run
except ImportError:  # pragma: no cover - depends on the build
    _fast_run = None

#: True when the data-only opcodes run in C
ACCELERATED = _fast_run is not None


#: keys of plain data: a dict keyed by these loses nothing a loader acts on when capped
_PLAIN_KEYS = (str, int, float, bool, bytes, type(None))
#: pairs with a computed key kept past the display cap (then the dict is marked lossy)
_EXTRA_KEYS = 64


def _set_items(target: PDict, items: list, start: int, at: int, heavy: dict) -> None:
    """Key/value pairs into a dict value: the first DISPLAY_ITEMS for people, and after them
    every key BUILD can plant as something the loader calls later (`_LATE_CALLED`), the last
    value of each (as in a real dict), and pairs whose key was computed at load time (it may
    spell any of them), up to _EXTRA_KEYS, then the dict is marked lossy: a hostile dict of
    any size costs bounded memory and hides nothing."""
    _check_hashable(items, start, 2, at, heavy)
    for i in range(start, len(items) - 1, 2):
        key = items[i]
        if len(target) < DISPLAY_ITEMS:
            target.append((key, items[i + 1]))
        elif type(key) is str:
            if key in _LATE_CALLED:
                for j in range(DISPLAY_ITEMS, len(target)):
                    if target[j][0] == key:
                        target[j] = (key, items[i + 1])
                        break
                else:
                    target.append((key, items[i + 1]))
            elif type(items[i + 1]) in _STORED_TYPES:
                # a value the load made or imported under any name: as an object's state it may be
                # a method that trusted code calls (kept, duplicates too, at the cost of a pair)
                target.append((key, items[i + 1]))
        elif not isinstance(key, _PLAIN_KEYS):
            if len(target) < DISPLAY_ITEMS + _EXTRA_KEYS:
                target.append((key, items[i + 1]))
            else:
                target.lossy = True


def _spreadable(args: object) -> bool:
    """Arguments some unpickler calls with: a tuple (C), or anything `f(*args)` iterates
    (the pure-Python unpickler joblib.load uses); a value computed at load time may be either."""
    return not (args is None or type(args) in (int, float, bool))


def _check_hashable(items: list, start: int, step: int, at: int, heavy: dict) -> None:
    """CPython hashes dict keys and set items as it inserts them: a list or dict there raises
    TypeError and the load stops (`N}]Nsb.`), and a tuple's hash walks all of it, shared
    parts each time (a tuple of tuples doubling at each level never finishes). Values the
    VM cannot know (calls) may hash."""
    for i in range(start, len(items), step):
        if type(items[i]) is tuple:
            weight = _weigh(items[i], heavy)[0]
            if weight > MAX_HASHED:
                raise PickleHashBomb(weight, at)
        if _unhashable(items[i]):
            raise PickleLoadError(f"unhashable type: '{_TYPE_NAMES.get(type(items[i]), 'tuple')}' as a dict key or set item", at)


_TYPE_NAMES = {list: "list", PDict: "dict"}


def _weigh(value: object, heavy: dict, budget: list | None = None) -> tuple[int, int]:
    """(weight, depth) of a value as a walk over it meets it: a container weighs 1 + its
    items' weights, shared parts counted each time. Known for the big or deep ones (`heavy`,
    kept as containers are built, in C too); a container not there is tiny and is walked.

    Sizes are counted as containers are built: a container filled after it was shared keeps
    the size it had then (the walk a loader's consumer makes would meet the later items)."""
    t = type(value)
    if t is tuple or t is list or t is PDict or t is PSet:
        entry = heavy.get(id(value))
        if entry is not None and entry[0] is value:
            return entry[1], entry[2]
        budget = budget if budget is not None else [_WALK_BUDGET]
        budget[0] -= 1
        if budget[0] <= 0:  # (the budget only guards against sizes gone stale)
            return 1 + len(value), 1
        w, d = 1, 1
        for item in value:
            for part in item if t is PDict else (item,):  # a PDict holds (key, value) pairs
                iw, idepth = _weigh(part, heavy, budget)
                w += iw
                d = max(d, idepth + 1)
        return w, d
    return 1, 0


def _unhashable(value: object) -> bool:
    """A list or dict, or a tuple holding one (each shared tuple looked at once)."""
    t = type(value)
    if t is not tuple:
        return t is list or t is PDict
    todo, seen = [value], set()
    while todo and len(seen) < 10_000:
        for v in todo.pop():
            t = type(v)
            if t is list or t is PDict:
                return True
            if t is tuple and id(v) not in seen:
                seen.add(id(v))
                todo.append(v)
    return False


#: instance attributes the loader itself calls later: BUILD calls `__setstate__`, APPEND(S) on a
#: non-list calls `append`/`extend`, ADDITEMS on a non-set calls `add`; `dict(obj)` and
#: `update(obj)` call `keys`; a defaultdict calls its `default_factory` for a missing key
_CALLED_ATTRIBUTES = frozenset({"__setstate__", "append", "extend", "add", "keys", "default_factory"})
#: ...and what replaces them all: `__class__` set through slot state (another class's methods
#: then run on the object) and `__dict__` (its keys become the attributes). The C accelerator
#: keeps the same keys past the display cap (`late_key` in _fastvm.c).
_LATE_CALLED = _CALLED_ATTRIBUTES | {"__class__", "__dict__"}
#: values kept past the display cap under any string key (see _set_items, STORED)
_STORED_TYPES = (GlobalRef, Call, Unknown)
#: the constructors of the dicts BUILD accepts as state, given pairs
_DICT_BUILDERS = frozenset({("collections", "OrderedDict"), ("builtins", "dict"), ("__builtin__", "dict"),
                            ("collections", "defaultdict")})
_ANY = object()  # a patch of every attribute (the keys were not static)
#: `Call.planted` key of a tuple state whose first item is a callable (functools.partial's
#: __setstate__ takes (func, args, kwargs, dict): the func the partial calls is that one)
STATE = "<state>"
#: `Call.planted` key: the (attribute, value) pairs a dict state stored on the object whose
#: values were made or imported by the load; trusted code handed the object may call any of its
#: methods, and an instance attribute wins over the class's method (scipy's rv_frozen(dist)
#: calls dist._updated_ctor_param())
STORED = "<stored>"


def _symbolic(value: object) -> bool:
    """A value the load made or imported, which may be callable (not plain data)."""
    return isinstance(value, (GlobalRef, Call, Unknown))


def _state_attributes(state: object) -> tuple[list, str]:
    """The (key, value) pairs BUILD stores in an object, from the dict state and the slot
    state, given as dict literals or as OrderedDict/dict of pairs, with nested `__dict__`
    states flattened; and why the scanner cannot see all of them ("" when it can)."""
    parts = list(state) if type(state) is tuple and len(state) == 2 else [state]
    pairs: list = []
    blind = ""
    depth = 0
    while parts and depth < 16:
        depth += 1
        part = parts.pop()
        if part is None:
            continue
        if type(part) is PDict:
            items = list(part)
            if is_lossy(part):
                blind = "a state whose computed keys the scanner did not keep"
        elif type(part) is Call and type(part.func) is GlobalRef and (part.func.module, part.func.name) in _DICT_BUILDERS:
            items, why = _pairs_of(part)
            blind = blind or why
        elif type(part) is GlobalRef:
            # a module-level mapping as the state (`sys.modules`, a registry): every key it holds
            items = []
            blind = blind or f"the mapping {part.module}.{part.name} as the state"
        elif part is _EVICTED:
            items = []
            blind = blind or "a state the scanner did not keep (memo budget)"
        else:
            # not a dict literal: the class's own __setstate__ gets it, or the loader raises;
            # a value made by a call was judged where it was made
            continue
        for key, value in items:
            pairs.append((key, value))
            if key == "__dict__":
                parts.append(value)  # setattr(obj, "__dict__", d): d's keys become attributes
    return pairs, blind


def _pairs_of(call: Call) -> tuple[list, str]:
    """(key, value) pairs given to a dict constructor, and why they may be incomplete."""
    args = call.args if type(call.args) is tuple else ()
    items: list = []
    blind = ""
    pairs = args[0] if args else None
    if call.func.name == "defaultdict":
        pairs = args[1] if len(args) > 1 else None
    if type(pairs) is PDict:
        items = list(pairs)
        if is_lossy(pairs):
            blind = "a state whose computed keys the scanner did not keep"
    elif isinstance(pairs, (list, tuple)):
        for p in pairs:
            if isinstance(p, (list, tuple)) and len(p) == 2:
                items.append((p[0], p[1]))
            elif _symbolic(p):
                blind = blind or "a state built from pairs computed at load time"
        if type(pairs) is list and len(pairs) >= DISPLAY_ITEMS:
            blind = blind or "a state built from more pairs than the scanner keeps"
    elif pairs is not None:
        blind = "a state built from a value the scanner cannot read"
    if isinstance(call.kwargs, PDict):
        items += list(call.kwargs)
    return items, blind


def _patched_name(patches: dict, module: str, name: str) -> object:
    """What find_class(module, name) returns once the pickle rewrote a prefix of the name:
    (value, rest of the dotted name), or _MISSING when no rewrite applies."""
    segments = name.split(".")
    for i in range(len(segments) - 1, 0, -1):
        names = patches.get((module, ".".join(segments[:i])))
        if names is None:
            continue
        attribute = segments[i]
        if attribute in names:
            return names[attribute], ".".join(segments[i + 1 :])
        if _ANY in names:
            return names[_ANY], ""
    table = patches.get(_LOADER_TABLES)
    if table is not None:
        mapped = table.get((module, name)) or table.get(module)
        if mapped is not None:
            return mapped, ""
    return _MISSING


#: the tables `find_class` consults: rewriting one redirects every later name
_LOADER_TABLES = ("<loader tables>",)
_MODULE_TABLES = {("sys", "modules"), ("_compat_pickle", "IMPORT_MAPPING")}
_NAME_TABLES = {("_compat_pickle", "NAME_MAPPING")}


def _loader_table_patch(patches: dict, target: GlobalRef, items: list, start: int) -> None:
    """`sys.modules[m] = x` and `_compat_pickle`'s mappings change what later names import."""
    key = (target.module, target.name)
    if key not in _MODULE_TABLES and key not in _NAME_TABLES:
        return
    table = patches.setdefault(_LOADER_TABLES, {})
    for i in range(start, len(items) - 1, 2):
        k, v = items[i], items[i + 1]
        if key in _NAME_TABLES and type(k) is tuple and type(v) is tuple and len(v) == 2 and all(type(x) is str for x in v):
            table[k] = Unknown(f"name mapped to {v[0]}.{v[1]} at load time")
        elif type(k) is str:
            table[k] = Unknown(f"module {k} replaced at load time")


def _mark_built(target: object) -> None:
    if isinstance(target, Call) and isinstance(target.func, GlobalRef):
        target.func.uses |= BUILT
    elif isinstance(target, GlobalRef):
        target.uses |= BUILT


def _is_bytearray(value: object) -> bool:
    return type(value) is PByteArray or (type(value) is Blob and value.bytearray)


def _extend_bytearray(target: PByteArray | Blob, items, at: int) -> None:
    """APPEND(S) on a bytearray: the C unpickler calls its extend, which takes ints 0-255 (or
    objects with __index__, which a value made at load time may be) and fails on anything else."""
    for item in items:
        if not isinstance(item, (int, Call, GlobalRef, Unknown)):
            raise PickleError(f"APPEND of {type(item).__name__} to a bytearray", at)
        if isinstance(item, int) and not 0 <= item <= 255:
            raise PickleError("APPEND of an int outside 0-255 to a bytearray", at)
    target.grown = True


def _c_string(line: bytes) -> bytes:
    """A line operand as the C unpickler's C-string parsers see it: up to the first NUL
    (strtol, PyLong_FromString and PyOS_string_to_double stop there), newline dropped."""
    text = line.split(b"\0", 1)[0]
    return text[:-1] if text.endswith(b"\n") else text


def _parse_int_line(line: bytes, is_long: bool, at: int) -> int | bool:
    """INT is parsed with C strtol(base 0) first, then PyLong_FromString(x, 0); LONG with the
    latter, after dropping an 'L' before the newline. Both read a C string (to the first NUL);
    the pure-Python unpickler uses int(x, 0) on the whole line: either reading counts."""
    if is_long:
        text = line[:-2] + b"\n" if line.endswith(b"L\n") else line
        try:
            return _pylong(_c_string(text), at)
        except PickleError:
            return _pylong(text[:-1], at)
    text = _c_string(line)
    # strtol of an empty C string (the line starts with a NUL) converts nothing and ends on the
    # NUL: the C unpickler takes that as 0
    value = 0 if not text and len(line) >= 2 else _strtol(text)
    if value is None:
        try:
            return _pylong(_c_string(line), at)
        except PickleError:
            return _pylong(line[:-1], at)
    if len(line) == 3 and value in (0, 1):
        return bool(value)
    return value


#: what PyOS_string_to_double (strtod without hex) reads: the C unpickler's FLOAT
_C_FLOAT = re.compile(rb"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)", re.I)


def _parse_float_line(line: bytes, at: int) -> float:
    """FLOAT as the C unpickler reads it (a strtod prefix ending at the newline or a NUL) or
    as the pure-Python one does (float() of the line: whitespace, underscores)."""
    text = _c_string(line)
    m = _C_FLOAT.match(text)
    if m and m.end() == len(text):
        return float(m.group())
    try:
        return float(line[:-1])
    except ValueError:
        raise PickleError("could not convert string to float", at) from None


def _parse_index_line(line: bytes, at: int) -> int:
    """PUT/GET's decimal index: PyLong_FromString(x, 10) of the C string, or int() of the line."""
    for text in (_c_string(line), line[:-1]):
        try:
            return int(text, 10)
        except ValueError:
            continue
    raise PickleError("memo index is not a number", at)


def _strtol(text: bytes) -> int | None:
    """C strtol(s, &end, 0) that must consume the whole line, or None (CPython then falls back)."""
    s = text.lstrip(b" \t\r\x0b\x0c")
    sign = 1
    if s[:1] in (b"+", b"-"):
        sign = -1 if s[:1] == b"-" else 1
        s = s[1:]
    base = 10
    if s[:2].lower() == b"0x":
        base, s = 16, s[2:]
    elif s[:1] == b"0" and len(s) > 1:
        base, s = 8, s[1:]
    if not s or not all(chr(c) in _DIGITS[base] for c in s):
        return None
    value = sign * int(s, base)
    return value if -(2**63) <= value < 2**63 else None


_DIGITS = {8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}


def _pylong(text: bytes, at: int) -> int:
    try:
        return int(text.decode("ascii"), 0)
    except (ValueError, UnicodeDecodeError):
        raise PickleError(f"could not convert string to int: {text[:40]!r}", at) from None


def _parse_string_line(line: bytes, at: int) -> str:
    data = line[:-1]
    if len(data) < 2 or data[0] != data[-1] or data[:1] not in (b"'", b'"'):
        raise PickleError("the STRING opcode argument must be quoted", at)
    try:
        raw = codecs.escape_decode(data[1:-1])[0]
    except ValueError as exc:
        raise PickleError(f"bad STRING escape: {exc}", at) from None
    return _ascii(raw, at)


def _ascii(value: object, at: int) -> object:
    """Protocol 0-2 byte strings are decoded as ASCII, as `pickle.load` does by default."""
    if isinstance(value, Blob):
        return Blob(value.offset, value.length, True)
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        # pickle.load would raise, but torch.load (utf-8) and py2-era numpy files (latin-1)
        # pass an encoding: keep reading rather than stop short of a payload.
        return value.decode("latin-1")


def _is_seekable(f: BinaryIO) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False
