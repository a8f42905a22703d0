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
- it dispatches every node to the kernel registered for its operator domain. A domain that
  is neither ONNX's own nor onnxruntime's needs a custom operator library loaded by the
  application: reported LOW, with the domain, once per domain.

Tensor payloads are never read: the two outer levels (model, graph) are split with the wire
reader and each node and tensor is parsed on its own, so memory stays at one element.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from modelscan_core.detect import Rule
from modelscan_core.model import Severity
from modelscan_core.scanners import Format, ScannerSettings
from modelscan_core.scanners.interface import Item, ScanContext, ScanFailed, Scanner
from modelscan_core.scanners.paths import escapes

#: operator domains a runtime implements itself (ONNX's standard sets and onnxruntime's contrib ops)
BUILTIN_DOMAINS = frozenset({
    "", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training", "com.microsoft",
    "com.microsoft.nchwc", "com.microsoft.experimental", "com.ms.internal.nhwc", "com.microsoft.dml",
})
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

#: ModelProto's top-level fields and their wire types (0 varint, 2 length-delimited)
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}


def sniff_onnx(head: bytes, name: str, stream: BinaryIO) -> bool:
    """A ModelProto: `ir_version` first (as every writer serializes it), then ModelProto's fields.

    Without the `.onnx` name the head must show a graph or an opset import, so other
    protobuf messages and binary data that happen to start with 0x08 are not claimed.
    """
    from modelscan_core.scanners.protowire import WireError, fields

    if not head or head[0] != 0x08:
        return False
    seen: list[int] = []
    try:
        for number, wire, value, _stop in fields(head, 0, len(head)):
            if _MODEL_FIELDS.get(number) != wire:
                return False
            if number == 1 and not (seen == [] and 1 <= value <= 64):
                return False
            seen.append(number)
            if len(seen) >= 4:
                break
    except WireError as exc:
        if "runs past" not in str(exc):
            return False
        seen.append(-1)  # a long field cut by the head: what parsed before it decides
    if not seen or seen[0] != 1:
        return False
    return name.endswith(".onnx") or any(n in (7, 8) for n in seen) or (-1 in seen and len(seen) >= 2)


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
        self.locations: dict[str, None] = {}
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
            what = f"{label} attribute {_text(attr.name)!r}"
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
        location = None
        for entry in tensor.external_data:
            if _text(entry.key) == "location":
                location = _text(entry.value)
        if location is None or location in self.locations:
            return
        self.locations[location] = None
        why = escapes(location) or self._resolves_outside(location)
        if why:
            self.ctx.report(
                "onnx/external-data-path",
                Severity.HIGH,
                f"tensor {_text(tensor.name)!r} ({where}) makes the loader read its data from {location!r}, {why}: "
                "a model that reads arbitrary files",
                module="onnx",
                operator="external_data",
            )

    def _resolves_outside(self, location: str) -> str | None:
        """Where a lexically harmless location really leads, for a model on disk."""
        if self.base is None:
            return None
        target = os.path.join(self.base, location)
        try:
            st = os.stat(target)
        except OSError:
            return None  # nothing there (yet): nothing to read
        real = os.path.realpath(target)
        roots = {os.path.realpath(self.base)}
        if self.item.path:
            roots.add(os.path.dirname(os.path.realpath(self.item.path)))
        if not any(_under(real, root) for root in roots):
            return f"which resolves through a symbolic link to {real!r}, outside the model's directory"
        if st.st_nlink > 1 and not os.path.islink(target):
            return f"a file with {st.st_nlink} hard links (its other names may be anywhere; onnx's checker refuses it)"
        return None


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


FORMATS = (
    # after TensorFlow's protobuf rules (they match by name), in the same family
    Format("onnx", "OnnxScanner", "onnx", rules=(Rule(priority=170, sniff=sniff_onnx, family="protobuf"),),
           extensions=(".onnx",)),
)

SETTINGS = (ScannerSettings("onnx", "modelscan.scanners.OnnxScan", {"enabled": True, "supported_extensions": [".onnx"]}),)
