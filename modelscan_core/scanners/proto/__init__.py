"""Message classes for the protobuf formats (ONNX, TensorFlow), from minimal `.proto` files.

Each `.proto` here declares only the fields a scanner reads, with the upstream field numbers
and types (a test compares them with the onnx and tensorflow packages' descriptors). They
are compiled when first needed, by a reader for the small subset of the language they use
(`syntax`, `package`, top-level `message`s with `optional`/`repeated` fields), into a
private descriptor pool: no generated code to keep in step with the protobuf runtime, no
clash with the onnx or tensorflow packages' own registrations. Fields left out are skipped
by the parser like any unknown field.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

_TOKEN = re.compile(r'[A-Za-z_][\w.]*|\d+|"[^"]*"|[{}=;]|\S')
_SCALARS = {
    "double": 1, "float": 2, "int64": 3, "uint64": 4, "int32": 5, "fixed64": 6, "fixed32": 7, "bool": 8,
    "string": 9, "bytes": 12, "uint32": 13, "sfixed32": 15, "sfixed64": 16, "sint32": 17, "sint64": 18,
}


class ProtoSyntaxError(ValueError):
    pass


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(re.sub(r"//[^\n]*", "", text))


def compile_proto(text: str, filename: str):
    """A FileDescriptorProto for the subset of the language our .proto files use."""
    from google.protobuf import descriptor_pb2

    tokens = _tokens(text)
    fdp = descriptor_pb2.FileDescriptorProto(name=filename)
    i = 0

    def expect(value: str) -> None:
        nonlocal i
        if i >= len(tokens) or tokens[i] != value:
            raise ProtoSyntaxError(f"{filename}: expected {value!r} at token {i} ({tokens[i:i + 3]})")
        i += 1

    while i < len(tokens):
        word = tokens[i]
        i += 1
        if word == "syntax":
            expect("=")
            fdp.syntax = tokens[i].strip('"')
            i += 1
            expect(";")
        elif word == "package":
            fdp.package = tokens[i]
            i += 1
            expect(";")
        elif word == "message":
            message = fdp.message_type.add(name=tokens[i])
            i += 1
            expect("{")
            while tokens[i] != "}":
                label, ftype, name = tokens[i], tokens[i + 1], tokens[i + 2]
                i += 3
                expect("=")
                number = int(tokens[i])
                i += 1
                expect(";")
                if label not in ("optional", "repeated"):
                    raise ProtoSyntaxError(f"{filename}: {message.name}.{name}: label {label!r} is not supported")
                field = message.field.add(name=name, number=number, label=1 if label == "optional" else 3)
                if ftype in _SCALARS:
                    field.type = _SCALARS[ftype]
                else:
                    field.type = 11  # TYPE_MESSAGE
                    field.type_name = f".{fdp.package}.{ftype}"
            i += 1
        else:
            raise ProtoSyntaxError(f"{filename}: unexpected {word!r}")
    if fdp.syntax and fdp.syntax != "proto2":
        raise ProtoSyntaxError(f"{filename}: only proto2 files are supported here")
    fdp.ClearField("syntax")  # proto2 is the default
    return fdp


@lru_cache(maxsize=None)
def _pool(filename: str):
    from google.protobuf import descriptor_pool

    text = resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")
    fdp = compile_proto(text, filename)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return pool, fdp.package


@lru_cache(maxsize=None)
def message_class(filename: str, name: str) -> type:
    """The class of message `name` in `filename` (e.g. `message_class("onnx.proto", "ModelProto")`)."""
    from google.protobuf import message_factory

    pool, package = _pool(filename)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))


#: protobuf's limit for one message (larger ONNX models keep their weights in external files)
MAX_MESSAGE = 2**31


def read_message(item, reader: str) -> bytes:
    """The whole serialized message of an item; `reader` names who would refuse a larger one."""
    from modelscan_core.scanners.interface import ScanFailed

    if item.size > MAX_MESSAGE:
        raise ScanFailed(f"{item.size} bytes: larger than protobuf's 2 GiB message limit: {reader} cannot load it either")
    item.stream.seek(0)
    data = item.stream.read()
    if len(data) != item.size:
        raise ScanFailed(f"read {len(data)} of {item.size} bytes")
    return data


#: in `parse_each`'s `wanted`: yield the field's (start, end) span instead of parsing it
SPAN = object()


class MessageError(ValueError):
    """The bytes are not the message the schema describes."""


def parse_each(buf, wanted: dict, start: int = 0, end: int | None = None):
    """Walk one level of a message with the wire reader and parse each wanted field with the
    protobuf runtime, one at a time: `(field number, message)`, or `(number, (start, end))`
    for fields mapped to `SPAN` (a level to walk the same way).

    Why not one `ParseFromString` of the whole file: the runtime keeps every byte it parses
    (unknown fields too), so a 1.5 GB model would cost twice its size; split at the
    repeated levels that hold tensors, memory stays at the file plus one element.
    """
    from google.protobuf.message import DecodeError

    from modelscan_core.scanners.protowire import LEN, WireError, fields

    view = memoryview(buf)
    try:
        for number, wire, value, stop in fields(buf, start, end):
            cls = wanted.get(number)
            if cls is None:
                continue
            if wire != LEN:
                continue  # the runtime keeps a field of the wrong wire type as unknown: so do we
            if cls is SPAN:
                yield number, (value, stop)
                continue
            message = cls()
            try:
                message.ParseFromString(view[value:stop])
            except DecodeError as exc:
                raise MessageError(f"field {number} at offset {value}: {exc}") from None
            yield number, message
    except WireError as exc:
        raise MessageError(str(exc)) from None
