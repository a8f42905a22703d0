"""ONNX models (`ModelProto`), parsed with the protobuf runtime and a minimal schema (proto/onnx.proto).

An ONNX file runs no Python, but a loader does two things the file decides:

- it reads every tensor whose `data_location` is EXTERNAL from the file its `external_data`
  `location` names, relative to the model's directory. A location that is absolute, climbs
  with `..`, or resolves (through a symlink, or a hard link that onnx's checker refuses) to a
  file outside the model's directory reads an arbitrary file into the model, where inference
  can echo it back. That is HIGH, wherever the tensor sits: initializers, sparse initializers,
  attribute tensors of nodes (`Constant`, ...), subgraphs of `If`/`Loop`/`Scan`, functions and
  training graphs. A location inside the directory is resolved the way onnxruntime resolves
  it: under the model's directory as given, or under the directory of the model's real path
  (a Hugging Face snapshot's symlinks into `blobs/`).
  onnxruntime's in-memory marker `*/_ORT_MEM_ADDR_/*` as a location makes it read the tensor
  from the address in `offset`: HIGH too. So is an `EPContext` node (a compiled-model cache)
  whose `ep_cache_context` or `onnx_model_filename` file lies outside the directory.
- it dispatches every node to the kernel registered for its operator domain. A domain that
  is neither ONNX's own nor onnxruntime's needs a custom operator library loaded by the
  application: reported LOW, with the domain, once per domain.

`onnx.load` also reads models written as JSON, as a text proto or in ONNX's textual syntax
(it picks the reader by extension) and loads their external data the same way: their
locations are judged like the binary form's.

Tensor payloads are never read: the two outer levels (model, graph) are split with the wire
reader and each node and tensor is parsed on its own, so memory stays at one element.
"""

from __future__ import annotations

import os
import re
from typing import BinaryIO

from modelscan_core.detect import Rule
from modelscan_core.model import Severity
from modelscan_core.scanners import Format, ScannerSettings
from modelscan_core.scanners.interface import Item, ScanContext, ScanFailed, Scanner
from modelscan_core.scanners.paths import escapes, resolves_outside

#: operator domains a runtime implements itself (ONNX's standard sets and onnxruntime's contrib ops)
BUILTIN_DOMAINS = frozenset({
    "", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training", "com.microsoft",
    "com.microsoft.nchwc", "com.microsoft.experimental", "com.ms.internal.nhwc", "com.microsoft.dml",
})
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

#: ModelProto's top-level fields and their wire types (0 varint, 2 length-delimited)
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}


def sniff_onnx(head: bytes, name: str, stream: BinaryIO) -> bool:
    """A ModelProto, as protobuf parsers read it: fields in any order, unknown fields allowed.

    The whole file must walk as top-level fields that end exactly at its end, with an
    `ir_version` (a small varint) and a `graph` among them: what onnx and onnxruntime need
    to load a model, and what random data or another protobuf message practically never
    is. A file named `.onnx` whose head shows ModelProto's first fields is claimed as
    before, so a file broken further on is reported, not skipped.
    """
    seen = _top_level_fields(stream)
    if seen is not None and 7 in seen and seen[7] == {2}:
        if 1 in seen and seen[1] == {0}:
            return True
        # no ir_version (or one outside 1-100): onnxruntime refuses such a model, but
        # `onnx.load` does not look, and it reads every tensor's external data all the same.
        # Claimed only when every field is one of ModelProto's, with ModelProto's wire type.
        if all(number in _MODEL_FIELDS and wires <= {_MODEL_FIELDS[number], _ODD} for number, wires in seen.items()):
            return True
    return name.endswith(".onnx") and _head_is_model(head)


def _head_is_model(head: bytes) -> bool:
    from modelscan_core.scanners.protowire import WireError, fields

    if not head or head[0] not in (0x08, 0x12, 0x1A, 0x22, 0x2A, 0x3A):
        return False  # ir_version first, as every writer puts it, or another ModelProto field
    seen: list[int] = []
    try:
        for number, wire, value, _stop in fields(head, 0, len(head)):
            if number in _MODEL_FIELDS and _MODEL_FIELDS[number] != wire:
                return False
            if number == 1 and not seen == []:
                return False
            seen.append(number)
            if len(seen) >= 4:
                break
    except WireError as exc:
        if "runs past" not in str(exc):
            return False
    return bool(seen)


#: a ModelProto has a handful of top-level fields (functions and metadata can be many)
_MAX_TOP_FIELDS = 100_000
_ODD = -1  # stands for the wire type of an ir_version outside 1-100
_MAX_GROUP = 64 * 1024 * 1024


def _top_level_fields(stream: BinaryIO) -> dict[int, set[int]] | None:
    """{field number: wire types} of a whole stream read as one message, or None when it is not one.

    Each field costs one small read: a 2 GB model is a few dozen seeks.
    """
    from modelscan_core.scanners.protowire import (EGROUP, I32, I64, LEN, SGROUP, VARINT, WireError, read_varint,
                                                   skip_group)

    stream.seek(0, 2)
    size = stream.tell()
    pos = 0
    seen: dict[int, set[int]] = {}
    try:
        for _ in range(_MAX_TOP_FIELDS):
            if pos == size:
                return seen
            stream.seek(pos)
            window = stream.read(32)
            key, used = read_varint(window, 0, len(window))
            number, wire = key >> 3, key & 7
            if number == 0 or wire in (EGROUP, 6, 7):
                return None
            if wire == VARINT:
                value, used = read_varint(window, used, len(window))
                if number == 1 and not 1 <= value <= 100:
                    wire = _ODD  # an ir_version no runtime accepts: only `onnx.load` reads the file
                pos += used
            elif wire == LEN:
                length, used = read_varint(window, used, len(window))
                pos += used + length
            elif wire == I64:
                pos += used + 8
            elif wire == I32:
                pos += used + 4
            elif wire == SGROUP:  # no writer puts one there, but parsers step over it
                stream.seek(pos + used)
                chunk = stream.read(min(size - pos - used, _MAX_GROUP))
                pos += used + skip_group(chunk, 0, len(chunk), number, 0)
            if pos > size:
                return None
            seen.setdefault(number, set()).add(wire)
    except (WireError, OSError):
        return None
    return None


class OnnxScanner(Scanner):
    name = "modelscan.scanners.OnnxScan"
    formats = ("onnx",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        from modelscan_core.scanners.proto import MessageError, read_message

        buf = read_message(item, "an ONNX loader")
        walk = _Walk(item, ctx)
        try:
            walk.model(buf)
        except MessageError as exc:
            raise ScanFailed(f"not a well-formed ONNX ModelProto: {exc}") from None
        finally:
            walk.report_domains()


class _Walk:
    def __init__(self, item: Item, ctx: ScanContext):
        from modelscan_core.scanners.proto import message_class

        self.item, self.ctx = item, ctx
        self.cls = {name: message_class("onnx.proto", name) for name in (
            "GraphProto", "NodeProto", "TensorProto", "SparseTensorProto", "OperatorSetIdProto", "FunctionProto")}
        self.domains: dict[str, str] = {}  # domain -> where first seen
        self.functions: set[tuple[str, str]] = set()
        self.locations: dict[bytes, None] = {}
        self.base = os.path.dirname(os.path.abspath(item.path)) if item.path else None

    # -- structure -------------------------------------------------------------------

    def model(self, buf: bytes) -> None:
        from modelscan_core.scanners.proto import SPAN, parse_each

        c = self.cls
        graphs: list[tuple[str, tuple[int, int]]] = []
        functions = []
        opsets: list[str] = []
        for number, value in parse_each(buf, {7: SPAN, 8: c["OperatorSetIdProto"], 20: SPAN, 25: c["FunctionProto"]}):
            if number == 7:
                graphs.append(("graph", value))
            elif number == 8:
                opsets.append(_text(value.domain))
            elif number == 20:
                for n2, span in parse_each(buf, {1: SPAN, 2: SPAN}, *value):
                    graphs.append(("training_info." + ("initialization" if n2 == 1 else "algorithm"), span))
            else:
                functions.append(value)
        for fn in functions:  # local functions first: their (domain, name) are not foreign operators
            self.functions.add((_text(fn.domain), _text(fn.name)))
        local = {domain for domain, _ in self.functions}
        for domain in opsets:
            if domain not in local:
                self._domain(domain, "opset_import")
        for fn in functions:
            where = f"function {_text(fn.domain)}.{_text(fn.name)}"
            for op in fn.opset_import:
                if _text(op.domain) not in local:
                    self._domain(_text(op.domain), where)
            for node in fn.node:
                self._node(node, where)
            for attr in fn.attribute_proto:  # default values of the function's attributes
                self._attribute(attr, f"{where} default attribute {_text(attr.name)!r}")
        for where, (start, end) in graphs:
            self._graph_span(buf, start, end, where)

    def _graph_span(self, buf: bytes, start: int, end: int, where: str) -> None:
        from modelscan_core.scanners.proto import parse_each

        c = self.cls
        for number, message in parse_each(buf, {1: c["NodeProto"], 5: c["TensorProto"], 15: c["SparseTensorProto"]},
                                          start, end):
            if number == 1:
                self._node(message, where)
            elif number == 5:
                self._tensor(message, f"{where} initializer")
            else:
                self._sparse(message, f"{where} sparse initializer")

    def _graph(self, graph, where: str) -> None:
        for node in graph.node:
            self._node(node, where)
        for tensor in graph.initializer:
            self._tensor(tensor, f"{where} initializer")
        for sparse in graph.sparse_initializer:
            self._sparse(sparse, f"{where} sparse initializer")

    def _node(self, node, where: str) -> None:
        domain, op = _text(node.domain), _text(node.op_type)
        label = f"{where} node {_text(node.name) or op!r}"
        if (domain, op) not in self.functions:
            self._domain(domain, f"{label} ({op})")
        for attr in node.attribute:
            self._attribute(attr, f"{label} attribute {_text(attr.name)!r}")
        if op == "EPContext":
            for key, path in _ep_context_paths(node):
                why = escapes(path) or (self._resolves_outside(os.fsencode(path)) if path else None)
                if why:
                    self.ctx.report(
                        "onnx/ep-context-path",
                        Severity.HIGH,
                        f"{label} attribute {key!r} makes the execution provider open {path!r}, {why}: onnxruntime's "
                        "own EPs refuse such a path for this reason",
                        module="onnx",
                        operator="EPContext",
                    )

    def _attribute(self, attr, what: str) -> None:
        if attr.HasField("t"):
            self._tensor(attr.t, what)
        for tensor in attr.tensors:
            self._tensor(tensor, what)
        if attr.HasField("sparse_tensor"):
            self._sparse(attr.sparse_tensor, what)
        for sparse in attr.sparse_tensors:
            self._sparse(sparse, what)
        if attr.HasField("g"):
            self._graph(attr.g, f"{what} subgraph")
        for i, graph in enumerate(attr.graphs):
            self._graph(graph, f"{what} subgraph {i}")

    def _sparse(self, sparse, where: str) -> None:
        if sparse.HasField("values"):
            self._tensor(sparse.values, f"{where} values")
        if sparse.HasField("indices"):
            self._tensor(sparse.indices, f"{where} indices")

    # -- judgements -------------------------------------------------------------------

    def _domain(self, domain: str, where: str) -> None:
        if domain not in BUILTIN_DOMAINS and domain not in self.domains:
            self.domains[domain] = where

    def report_domains(self) -> None:
        for domain, where in self.domains.items():
            self.ctx.report(
                "onnx/custom-domain",
                Severity.LOW,
                f"operator domain {domain!r} (first at {where}) is not ONNX's or onnxruntime's: running the model needs "
                "a custom operator library",
                module="onnx",
                operator=domain,
            )

    def _tensor(self, tensor, where: str) -> None:
        if tensor.data_location != EXTERNAL and not len(tensor.external_data):
            return
        # onnx and onnxruntime take the last `location`; every one is judged all the same
        for entry in tensor.external_data:
            if _text(entry.key) == "location":
                self._location(tensor, bytes(entry.value), where)

    def _location(self, tensor, raw: bytes, where: str) -> None:
        if raw in self.locations:
            return
        self.locations[raw] = None
        location = raw.decode("utf-8", "surrogateescape")  # the bytes a C++ loader opens, kept exact
        why = _special_location(location) or escapes(location) or self._resolves_outside(raw)
        location = raw.decode("utf-8", "replace")
        if why:
            self.ctx.report(
                "onnx/external-data-path",
                Severity.HIGH,
                f"tensor {_text(tensor.name)!r} ({where}) makes the loader read its data from {location!r}, {why}: "
                "a model that reads arbitrary files",
                module="onnx",
                operator="external_data",
            )

    def _resolves_outside(self, location: bytes) -> str | None:
        """Where a lexically harmless location really leads, for a model on disk: under the
        directory as given, or under the real directory of a model reached through a symlink
        (a Hugging Face snapshot's links into `blobs/`), as onnxruntime resolves it."""
        if self.base is None:
            return None
        base = os.fsencode(self.base)
        roots = (os.fsencode(os.path.dirname(os.path.realpath(self.item.path))),) if self.item.path else ()
        why = resolves_outside(base, location, roots)
        if why:
            return why
        target = os.path.join(base, location)
        try:
            st = os.stat(target)
        except OSError:
            return None  # nothing there (yet): nothing to read
        if st.st_nlink > 1 and not os.path.islink(target):
            return f"a file with {st.st_nlink} hard links (its other names may be anywhere; onnx's checker refuses it)"
        return None


#: onnxruntime's marker for an initializer already in memory: its `offset` is read as a pointer.
#: Only the runtime itself writes it, into models it holds in memory; in a file it makes the
#: runtime (and OpenVINO's ONNX frontend) copy bytes from an address the file chooses
ORT_MEMORY_TAG = "*/_ORT_MEM_ADDR_/*"


def _special_location(location: str) -> str | None:
    if location.strip() == ORT_MEMORY_TAG:
        return "onnxruntime's in-memory marker: the runtime reads the tensor from the memory address in its `offset`"
    return None


#: an EP context node (onnxruntime's compiled-model cache) names files its execution provider
#: opens: the compiled context when `embed_mode` is 0, and the original model for refitting
_EP_CONTEXT_PATHS = ("ep_cache_context", "onnx_model_filename")
_ATTR_INT, _ATTR_STRING = 2, 3


def _ep_context_paths(node) -> list[tuple[str, str]]:
    """(attribute, path) of the files an `EPContext` node makes its execution provider open."""
    attrs = {_text(a.name): a for a in node.attribute}
    embed = attrs.get("embed_mode")
    embedded = embed is not None and embed.type == _ATTR_INT and embed.i == 1
    out = []
    for key in _EP_CONTEXT_PATHS:
        attr = attrs.get(key)
        if attr is None or (key == "ep_cache_context" and embedded):
            continue
        out.append((key, bytes(attr.s).decode("utf-8", "surrogateescape")))
    return out


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


# -- a TensorProto of its own (`input_0.pb` of ONNX test data sets, `onnx.load_tensor`) ------------

#: TensorProto's fields and the wire types a writer uses for them (packed or not)
_TENSOR_FIELDS = {1: {0, 2}, 2: {0}, 3: {2}, 4: {2, 5}, 5: {0, 2}, 6: {2}, 7: {0, 2}, 8: {2}, 9: {2}, 10: {1, 2},
                  11: {0, 2}, 12: {2}, 13: {2}, 14: {0}, 16: {2}}


def sniff_onnx_tensor(head: bytes, name: str, stream: BinaryIO) -> bool:
    """A `.pb` that reads whole as a TensorProto with a data type: what ONNX test data sets hold
    and `numpy_helper.to_array` turns into an array, loading its external data."""
    if not name.endswith(".pb") or not head or head[0] not in (0x08, 0x0A, 0x10):
        return False
    seen = _top_level_fields(stream)
    # a dim above 100 shows as the "odd ir_version" wire type: it is a varint all the same
    return bool(seen) and 2 in seen and all(n in _TENSOR_FIELDS and {0 if x == _ODD else x for x in w} <= _TENSOR_FIELDS[n]
                                            for n, w in seen.items())


class OnnxTensorScanner(Scanner):
    name = "modelscan.scanners.OnnxScan"
    formats = ("onnx_tensor",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        from google.protobuf.message import DecodeError

        from modelscan_core.scanners.proto import read_message

        buf = read_message(item, "an ONNX tensor reader")
        walk = _Walk(item, ctx)
        tensor = walk.cls["TensorProto"]()
        try:
            tensor.ParseFromString(buf)
        except DecodeError as exc:
            raise ScanFailed(f"not a well-formed ONNX TensorProto: {exc}") from None
        walk._tensor(tensor, "tensor file")


# -- ONNX in text: onnx.load picks the JSON or text-proto reader by the file's extension ----------

_TEXTPROTO_NAMES = (".txtpb", ".textproto", ".prototxt", ".pbtxt")
_JSON_KEYS = (b'"graph"',)
_TEXT_EXTERNAL = re.compile(rb"\bexternal_data\s*[:]?\s*[{<]([^{}<>]*)[}>]")
_TEXT_FIELD = re.compile(rb"""\b(key|value)\s*:\s*("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')""")


def _onnx_json(doc) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("graph"), dict) and any(
        k in doc for k in ("irVersion", "ir_version", "opsetImport", "opset_import"))


def sniff_onnx_json(head: bytes, name: str, stream: BinaryIO) -> bool:
    """A ModelProto in protobuf's JSON mapping (`onnx.load("model.json")`)."""
    from modelscan_core.scanners.jsondoc import document

    return _onnx_json(document(head, stream, _JSON_KEYS))


def sniff_onnx_textproto(head: bytes, name: str, stream: BinaryIO) -> bool:
    """A ModelProto in protobuf's text format or in ONNX's own textual syntax, under a name
    `onnx.load` reads as one."""
    if b"\x00" in head or not (b"ir_version" in head or b"opset_import" in head):
        return False
    return name.endswith(_TEXTPROTO_NAMES) and b"graph" in head or name.endswith(_ONNXTXT_NAMES)


_ONNXTXT_NAMES = (".onnxtxt", ".onnxtext")
#: ONNX's textual syntax names external data inline: `<float[4] w = ["location": "..."]>`
_ONNXTXT_LOCATION = re.compile(rb"""["']location["']\s*:\s*("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')""")


class OnnxTextScanner(Scanner):
    """External data named by an ONNX model in JSON or text-proto form: `onnx.load` resolves it the
    same way (onnxruntime reads only the binary form)."""

    name = "modelscan.scanners.OnnxScan"
    formats = ("onnx_json", "onnx_textproto")

    def scan(self, item: Item, ctx: ScanContext) -> None:
        from modelscan_core.scanners.jsondoc import MAX_JSON

        if item.size > MAX_JSON:
            raise ScanFailed(f"an ONNX text model of {item.size} bytes, beyond the {MAX_JSON} read", incomplete=True)
        item.stream.seek(0)
        data = item.stream.read()
        walk = _Walk(item, ctx)
        if item.format == "onnx_json":
            import json

            try:
                doc = json.loads(data)
            except (ValueError, RecursionError) as exc:
                raise ScanFailed(f"not valid JSON: {exc}", "JSON_DECODE") from None
            for location in _json_locations(doc):
                walk._location(_Named(b"?"), location, "JSON model")
        else:
            import codecs

            for value in _ONNXTXT_LOCATION.findall(data):
                walk._location(_Named(b"?"), codecs.escape_decode(value[1:-1])[0], "text model")
            for block in _TEXT_EXTERNAL.finditer(data):
                fields = {k: v for k, v in _TEXT_FIELD.findall(block.group(1))}
                if fields.get(b"key", b"")[1:-1] == b"location" and b"value" in fields:
                    raw = codecs.escape_decode(fields[b"value"][1:-1])[0]
                    walk._location(_Named(b"?"), raw, "text model")


class _Named:
    def __init__(self, name: bytes):
        self.name = name


def _json_locations(doc) -> list[bytes]:
    """Every `location` of every `externalData` list, at any depth (protobuf's JSON mapping
    accepts the camelCase and the original field names)."""
    out: list[bytes] = []
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in ("externalData", "external_data"):
                entries = node.get(key)
                if isinstance(entries, list):
                    for entry in entries:
                        if isinstance(entry, dict) and entry.get("key") == "location" and isinstance(entry.get("value"), str):
                            out.append(entry["value"].encode("utf-8", "surrogateescape"))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


FORMATS = (
    # after TensorFlow's protobuf rules (they match by name), in the same family
    Format("onnx", "OnnxScanner", "onnx", rules=(Rule(priority=170, sniff=sniff_onnx, family="protobuf"),),
           extensions=(".onnx",)),
    Format("onnx_tensor", "OnnxTensorScanner", "onnx", rules=(Rule(priority=175, sniff=sniff_onnx_tensor, family="protobuf"),)),
    Format("onnx_json", "OnnxTextScanner", "onnx", rules=(Rule(priority=640, sniff=sniff_onnx_json, family="json"),)),
    Format("onnx_textproto", "OnnxTextScanner", "onnx", rules=(Rule(priority=650, sniff=sniff_onnx_textproto,
                                                                     family="onnx_text"),)),
)

SETTINGS = (ScannerSettings("onnx", "modelscan.scanners.OnnxScan", {"enabled": True, "supported_extensions": [".onnx"]}),)
