"""Hypothesis strategies for pickle streams an attacker could write, opcode by opcode.

The streams are *valid-ish*: a model of the stack (what kind of value sits where, where the
MARKs are) steers each next opcode towards one the unpickler accepts, so runs get deep
instead of failing at the second byte, while every opcode, operand encoding and odd syntax
CPython accepts can appear:

- names reach the unpickler every way: GLOBAL lines, STACK_GLOBAL fed by any string opcode
  (protocol-0 STRING/UNICODE too) or by memo GETs, INST, dotted names, names of several
  protocols' spellings;
- calls every way: REDUCE, NEWOBJ, NEWOBJ_EX, OBJ, INST, BUILD (dict state, slot state, planted
  `__setstate__`/`append`/`__class__`...), APPEND(S)/SETITEM(S)/ADDITEMS on built objects;
- MARK/POP/POP_MARK games, DUP, memo PUT/GET/MEMOIZE with decoy indices, EXT1/2/4, PERSID,
  protocol-0 integers in every syntax `int(x, 0)` and strtol take;
- FRAME opcodes at any opcode boundary, declaring a length that may end anywhere, inside an
  operand included (`framed`), and several pickles one after another.

Nothing here is ever unpickled outside the inert oracle.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

#: names the streams use: dangerous, benign, ecosystem, dotted, odd
MODULES = ["os", "posix", "builtins", "__builtin__", "subprocess", "collections", "torch._utils", "numpy",
           "copyreg", "copy_reg", "argparse", "pathlib", "operator", "functools", "pickle", "mypkg.sub", "x"]
NAMES = ["system", "eval", "getattr", "OrderedDict", "_rebuild_tensor_v2", "dtype", "_reconstructor",
         "Namespace", "PosixPath", "attrgetter", "partial", "loads", "Popen", "Thing", "os.system",
         "eval.__call__", "__new__", "f"]
ATTRS = ["__setstate__", "append", "extend", "add", "__class__", "__new__", "__del__", "__setitem__", "__call__",
         "x", "__reduce__", "__init__"]
INT_SYNTAX = ["0", "1", "00", "01", "7", "-3", "+5", "0x10", "0o17", "0b101", " 12", "12 ", "1_000", "010",
              "99999999999999999999", "0X1f", "-0x8000000000000000"]


def _short_unicode(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return b"\x8c" + bytes([len(data)]) + data if len(data) < 256 else b"X" + struct.pack("<I", len(data)) + data


def string_ops(text: str) -> st.SearchStrategy[bytes]:
    """Every opcode that pushes `text` as a str (protocol 0 ones included)."""
    data = text.encode("utf-8", "surrogatepass")
    options = [
        _short_unicode(text),
        b"X" + struct.pack("<I", len(data)) + data,
        b"\x8d" + struct.pack("<Q", len(data)) + data,
        b"V" + text.encode("raw-unicode-escape") + b"\n",
    ]
    if text.isascii():
        options += [
            b"S'" + data.replace(b"\\", b"\\\\").replace(b"'", b"\\'") + b"'\n",
            b'S"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"\n',
            b"U" + bytes([len(data)]) + data if len(data) < 256 else b"T" + struct.pack("<i", len(data)) + data,
            b"T" + struct.pack("<i", len(data)) + data,
        ]
    return st.sampled_from(options)


def int_ops() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.integers(0, 255).map(lambda n: b"K" + bytes([n])),
        st.integers(0, 65535).map(lambda n: b"M" + struct.pack("<H", n)),
        st.integers(-(2**31), 2**31 - 1).map(lambda n: b"J" + struct.pack("<i", n)),
        st.sampled_from(INT_SYNTAX).map(lambda s: b"I" + s.encode() + b"\n"),
        st.sampled_from(INT_SYNTAX).map(lambda s: b"L" + s.encode() + b"L\n"),
        st.integers(-(2**70), 2**70).map(lambda n: b"\x8a" + bytes([len(_le(n))]) + _le(n)),
    )


def _le(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 8) // 8 or 1, "little", signed=True)


@st.composite
def ops(draw, max_ops: int = 40, nested: bool = True) -> list[bytes]:
    """A list of opcode byte strings (one opcode with its operands each), ending in STOP."""
    stack: list[str] = []  # kinds: s str, i int, c callable (global or stub), t tuple, d dict, l list, o object, m mark
    memo: dict[int, str] = {}
    out: list[bytes] = []

    def above_mark() -> int:
        n = 0
        for kind in reversed(stack):
            if kind == "m":
                break
            n += 1
        return n

    def push_str(text: str) -> None:
        out.append(draw(string_ops(text)))
        stack.append("s")

    def global_op(module: str, name: str) -> None:
        how = draw(st.sampled_from(["GLOBAL", "STACK_GLOBAL", "STACK_GLOBAL", "MEMO"]))
        if how == "GLOBAL" and "\n" not in module + name:
            out.append(b"c" + module.encode("utf-8", "surrogatepass") + b"\n" + name.encode("utf-8", "surrogatepass") + b"\n")
        elif how == "MEMO":
            # both operands come back from the memo, with a decoy PUT between them
            a, b, c = draw(st.lists(st.integers(0, 255), min_size=3, max_size=3, unique=True))
            for text, idx in ((module, a), ("decoy", b), (name, c)):
                push_str(text)
                out.append(b"q" + bytes([idx]) + b"0")
                memo[idx] = "s"
                stack.pop()
            out.append(b"h" + bytes([a]) + b"h" + bytes([c]) + b"\x93")
        else:
            push_str(module)
            push_str(name)
            out.append(b"\x93")
            stack.pop()
            stack.pop()
        stack.append("c")

    def push_args(kinds_ok: bool = True) -> None:
        """An argument tuple, built one of the ways CPython accepts."""
        n = draw(st.integers(0, 3))
        how = draw(st.sampled_from(["mark", "short"]))
        if how == "mark":
            out.append(b"(")
            stack.append("m")
        for _ in range(n):
            if draw(st.booleans()):
                push_str(draw(st.sampled_from(["touch /tmp/x", "os", "system", "__setstate__", "x"])))
            elif draw(st.booleans()):
                global_op(draw(st.sampled_from(MODULES)), draw(st.sampled_from(NAMES)))
            else:
                out.append(draw(int_ops()))
                stack.append("i")
        if how == "mark":
            out.append(b"t")
            while stack.pop() != "m":
                pass
        else:
            out.append(b")" if n == 0 else bytes([0x84 + n]))
            del stack[len(stack) - n:]
        stack.append("t")

    def call(kind: str) -> None:
        if kind == "nested":
            # bytes that are a pickle, handed to pickle.loads: the loader unpickles them in turn
            inner = b"\x80\x02" + b"".join(draw(ops(max_ops=8, nested=False)))
            global_op(draw(st.sampled_from(["pickle", "_pickle", "dill"])), "loads")
            out.append(b"C" + bytes([len(inner)]) + inner if len(inner) < 256 else b"B" + struct.pack("<I", len(inner)) + inner)
            out.append(b"\x85R")
            stack[-1:] = ["o"]
            return
        if kind == "reduce_top" and stack and stack[-1] in ("o", "c") and above_mark() >= 1:
            push_args()
            out.append(b"R")
            stack[-2:] = ["o"]
            return
        if kind == "obj":
            out.append(b"(")
            stack.append("m")
            global_op(draw(st.sampled_from(MODULES)), draw(st.sampled_from(NAMES)))
            for _ in range(draw(st.integers(0, 2))):
                push_str("arg")
            out.append(b"o")
            while stack.pop() != "m":
                pass
            stack.append("o")
            return
        if kind == "inst":
            out.append(b"(")
            stack.append("m")
            for _ in range(draw(st.integers(0, 2))):
                push_str("arg")
            module, name = draw(st.sampled_from(MODULES)), draw(st.sampled_from(NAMES))
            out.append(b"i" + module.encode() + b"\n" + name.encode() + b"\n")
            while stack.pop() != "m":
                pass
            stack.append("o")
            return
        global_op(draw(st.sampled_from(MODULES)), draw(st.sampled_from(NAMES)))
        push_args()
        if kind == "new_ex":
            out.append(b"}")
            stack.append("d")
            out.append(b"\x92")
            stack[-3:] = ["o"]
        else:
            out.append(b"R" if kind == "reduce" else b"\x81")
            stack[-2:] = ["o"]

    n_ops = draw(st.integers(1, max_ops))
    for _ in range(n_ops):
        choice = draw(st.sampled_from([
            "call", "call", "call", "call", "global", "global", "str", "int", "none", "empty", "mark", "tuple",
            "reduce", "reduce", "build", "build",
            "newobj", "newobj_ex", "obj", "inst", "append", "setitem", "dict", "list", "pop", "pop_mark", "dup",
            "put", "get", "memoize", "ext", "persid", "additems", "frozenset", "stop", "float", "bytes",
        ]))
        top = above_mark()
        if choice == "call":
            call(draw(st.sampled_from(["reduce", "reduce", "new", "new_ex", "obj", "inst", "reduce_top"]
                                      + (["nested"] if nested else []))))
        elif choice == "global":
            global_op(draw(st.sampled_from(MODULES)), draw(st.sampled_from(NAMES)))
        elif choice == "str":
            push_str(draw(st.sampled_from(ATTRS + NAMES + ["", "a\nb", "\udcff", "é"])))
        elif choice == "int":
            out.append(draw(int_ops()))
            stack.append("i")
        elif choice == "float":
            out.append(draw(st.sampled_from([b"G" + struct.pack(">d", 1.5), b"F1.5\n", b"Fnan\n", b"F1e400\n"])))
            stack.append("i")
        elif choice == "bytes":
            body = draw(st.binary(max_size=12))
            out.append(draw(st.sampled_from([b"C" + bytes([len(body)]) + body, b"B" + struct.pack("<I", len(body)) + body,
                                             b"\x8e" + struct.pack("<Q", len(body)) + body,
                                             b"\x96" + struct.pack("<Q", len(body)) + body])))
            stack.append("i")
        elif choice == "none":
            out.append(draw(st.sampled_from([b"N", b"\x88", b"\x89"])))
            stack.append("i")
        elif choice == "empty":
            kind = draw(st.sampled_from(["d", "l", "t", "set"]))
            out.append({"d": b"}", "l": b"]", "t": b")", "set": b"\x8f"}[kind])
            stack.append("o" if kind == "set" else kind)
        elif choice == "mark":
            out.append(b"(")
            stack.append("m")
        elif choice == "tuple":
            if top >= 3 and draw(st.booleans()):
                n = draw(st.integers(1, 3))
                out.append(bytes([0x84 + n]))
                del stack[-n:]
                stack.append("t")
            elif "m" in stack:
                out.append(b"t")
                while stack.pop() != "m":
                    pass
                stack.append("t")
            else:
                out.append(b")")
                stack.append("t")
        elif choice == "reduce" and top >= 2:
            out.append(b"R")
            stack[-2:] = ["o"]
        elif choice == "build" and top >= 2:
            out.append(b"b")
            stack.pop()
        elif choice == "build" and top >= 1:
            # state with a planted attribute: {attr: <top>} or (None, {attr: <top>})
            attr = draw(st.sampled_from(ATTRS))
            slot = draw(st.booleans())
            if slot:
                out.append(b"N")
            out.append(b"}")
            out.append(draw(string_ops(attr)))
            global_op(draw(st.sampled_from(MODULES)), draw(st.sampled_from(NAMES)))
            stack.pop()
            out.append(b"s")
            if slot:
                out.append(b"\x86")
            out.append(b"b")
        elif choice == "newobj" and top >= 2:
            out.append(b"\x81")
            stack[-2:] = ["o"]
        elif choice == "newobj_ex" and top >= 3:
            out.append(b"\x92")
            stack[-3:] = ["o"]
        elif choice == "obj" and "m" in stack:
            out.append(b"o")
            while stack.pop() != "m":
                pass
            stack.append("o")
        elif choice == "inst" and "m" in stack:
            module, name = draw(st.sampled_from(MODULES)), draw(st.sampled_from(NAMES))
            out.append(b"i" + module.encode() + b"\n" + name.encode() + b"\n")
            while stack.pop() != "m":
                pass
            stack.append("o")
        elif choice == "append" and top >= 2:
            out.append(draw(st.sampled_from([b"a", b"(e"])) if top >= 2 else b"a")
            if out[-1] == b"(e":
                out[-1] = b"a"
            stack.pop()
        elif choice == "setitem" and top >= 3:
            out.append(b"s")
            del stack[-2:]
        elif choice == "dict" and "m" in stack:
            out.append(draw(st.sampled_from([b"d", b"u", b"e", b"l"])))
            op = out[-1]
            items = []
            while True:
                kind = stack.pop()
                if kind == "m":
                    break
                items.append(kind)
            if op in (b"d", b"l"):
                stack.append("d" if op == b"d" else "l")
        elif choice == "list" and "m" in stack:
            out.append(b"l")
            while stack.pop() != "m":
                pass
            stack.append("l")
        elif choice == "additems" and "m" in stack:
            out.append(b"\x90")
            while stack.pop() != "m":
                pass
        elif choice == "frozenset" and "m" in stack:
            out.append(b"\x91")
            while stack.pop() != "m":
                pass
            stack.append("o")
        elif choice == "pop" and stack:
            out.append(b"0")
            stack.pop()
        elif choice == "pop_mark" and "m" in stack:
            out.append(b"1")
            while stack.pop() != "m":
                pass
        elif choice == "dup" and top >= 1:
            out.append(b"2")
            stack.append(stack[-1])
        elif choice == "put" and top >= 1:
            idx = draw(st.integers(0, 300))
            out.append(draw(st.sampled_from([b"p" + str(idx).encode() + b"\n", b"q" + bytes([idx % 256]),
                                             b"r" + struct.pack("<I", idx)])))
            memo[idx if out[-1][:1] != b"q" else idx % 256] = stack[-1]
        elif choice == "memoize" and top >= 1:
            out.append(b"\x94")
            memo[len(memo)] = stack[-1]
        elif choice == "get" and memo:
            idx = draw(st.sampled_from(sorted(memo)))
            out.append(draw(st.sampled_from([b"g" + str(idx).encode() + b"\n", b"j" + struct.pack("<I", idx)]
                                            + ([b"h" + bytes([idx])] if idx < 256 else []))))
            stack.append(memo[idx])
        elif choice == "ext":
            code = draw(st.integers(1, 300))
            out.append(b"\x82" + bytes([code]) if code < 256 else b"\x83" + struct.pack("<H", code))
            stack.append("c")
        elif choice == "persid":
            if top >= 1 and draw(st.booleans()):
                out.append(b"Q")
                stack.pop()
            else:
                out.append(b"P" + draw(st.sampled_from([b"0", b"module", b"x y"])) + b"\n")
            stack.append("c")
        elif choice == "stop" and top >= 1 and "m" not in stack:
            out.append(b".")
            proto = draw(st.sampled_from([b"", b"\x80\x02", b"\x80\x04", b"\x80\x05"]))
            if proto:
                out.append(proto)
            stack.clear()
            memo.clear()  # every load() starts with an empty memo
    if not stack:
        out.append(b"N")
        stack.append("i")
    while "m" in stack:
        out.append(b"1" if stack[-1] == "m" and above_mark() == 0 else b"t")
        if out[-1] == b"1":
            stack.pop()
        else:
            while stack.pop() != "m":
                pass
            stack.append("t")
    out.append(b".")
    return out


@st.composite
def pickles(draw, max_ops: int = 40) -> bytes:
    """One or more pickles, each maybe with a PROTO, from `ops`."""
    proto = draw(st.sampled_from([b"", b"\x80\x00", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"]))
    return proto + b"".join(draw(ops(max_ops)))


@st.composite
def framed(draw, max_ops: int = 40) -> bytes:
    """Pickles with FRAME opcodes at opcode boundaries whose declared lengths end anywhere
    (often inside an operand: the readers then disagree on what follows)."""
    parts = draw(ops(max_ops))
    out = bytearray(b"\x80\x04")
    i = 0
    while i < len(parts):
        if draw(st.integers(0, 3)) == 0:
            rest = sum(len(p) for p in parts[i:])
            n = draw(st.one_of(st.integers(0, max(0, rest)), st.integers(0, rest + 16)))
            out += b"\x95" + struct.pack("<Q", n)
        out += parts[i]
        i += 1
    return bytes(out)
