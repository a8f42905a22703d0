"""TensorFlow SavedModels (`saved_model.pb`) and Keras's `keras_metadata.pb`, without TensorFlow.

Both are protobuf messages, read here with our own minimal decoder (`protowire`) and the
field numbers of TensorFlow's .proto files:

    SavedModel        2: meta_graphs (MetaGraphDef)
    MetaGraphDef      1: meta_info_def (5: tensorflow_version)  2: graph_def  7: object_graph_def
    GraphDef          1: node (NodeDef)  2: library (FunctionDefLibrary)
    NodeDef           1: name  2: op  5: attr (map: 1 key, 2 AttrValue)
    FunctionDefLibrary 1: function (FunctionDef)  2: gradient (GradientDef 1: function_name)
    FunctionDef       1: signature (OpDef 1: name)  3: node_def (NodeDef)
    AttrValue         2: s
    SavedObjectGraph  1: nodes (SavedObject 4: user_object (SavedUserObject 1: identifier 3: metadata))
    SavedMetadata     1: nodes (SavedObject 3: node_path 4: identifier 5: metadata)   [keras_metadata.pb]

What runs when TensorFlow loads and calls the model is its ops: every node of every meta
graph and of every library function is collected. Ops that touch files, call back into
Python or load libraries get the severities of `unsafe_tf_operators`; ops TensorFlow does not
know (tf_ops.txt, generated from TensorFlow by scripts/gen_tf_ops.py) need a custom kernel
library and are reported too. Keras layer JSON (keras_metadata.pb, and the `metadata` of
user objects in older SavedModels) is walked for Lambda layers like any Keras config.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from functools import lru_cache
from importlib import resources

from modelscan_core.detect import Rule
from modelscan_core.model import Severity
from modelscan_core.scanners import Format, ScannerSettings
from modelscan_core.scanners.interface import Item, ScanContext, ScanFailed, Scanner
from modelscan_core.scanners.protowire import LEN, WireError, fields, looks_like_message, text

#: TensorFlow ops that reach outside the graph: files, Python callbacks, the network, debug
#: dumps. modelscan lists ReadFile and WriteFile; the rest are ours. PrintV2 and
#: DecodeProtoV2/EncodeProto count only when their stream/descriptor names a file.
UNSAFE_TF_OPERATORS = {
    # files
    "ReadFile": "HIGH",
    "WriteFile": "HIGH",
    "MatchingFiles": "HIGH",
    "MatchingFilesDataset": "HIGH",
    "ExperimentalMatchingFilesDataset": "HIGH",
    "ImmutableConst": "MEDIUM",
    "PrintV2": "HIGH",
    "DecodeProtoV2": "MEDIUM",
    "EncodeProto": "MEDIUM",
    "WholeFileReader": "MEDIUM",
    "WholeFileReaderV2": "MEDIUM",
    "TextLineReader": "MEDIUM",
    "TextLineReaderV2": "MEDIUM",
    "FixedLengthRecordReader": "MEDIUM",
    "FixedLengthRecordReaderV2": "MEDIUM",
    "TFRecordReader": "MEDIUM",
    "TFRecordReaderV2": "MEDIUM",
    "LMDBReader": "MEDIUM",
    "TextLineDataset": "MEDIUM",
    "TFRecordDataset": "MEDIUM",
    "TFRecordDatasetV2": "MEDIUM",
    "FixedLengthRecordDataset": "MEDIUM",
    "FixedLengthRecordDatasetV2": "MEDIUM",
    "CSVDataset": "MEDIUM",
    "CSVDatasetV2": "MEDIUM",
    "ExperimentalCSVDataset": "MEDIUM",
    "LMDBDataset": "MEDIUM",
    "ExperimentalLMDBDataset": "MEDIUM",
    "SqlDataset": "MEDIUM",
    "ExperimentalSqlDataset": "MEDIUM",
    "LoadDataset": "MEDIUM",
    "DatasetToTFRecord": "HIGH",
    "ExperimentalDatasetToTFRecord": "HIGH",
    "SaveDataset": "HIGH",
    "SaveDatasetV2": "HIGH",
    "SnapshotDataset": "MEDIUM",
    "SnapshotDatasetV2": "MEDIUM",
    "CreateSummaryFileWriter": "HIGH",
    "CreateSummaryDbWriter": "HIGH",
    "DebugIdentity": "HIGH",
    "DebugIdentityV2": "HIGH",
    "DebugIdentityV3": "HIGH",
    "DebugNanCount": "HIGH",
    "DebugNumericSummary": "HIGH",
    "DebugNumericSummaryV2": "MEDIUM",
    "CacheDataset": "HIGH",
    "CacheDatasetV2": "HIGH",
    "CalibrationStatisticsSaver": "HIGH",
    "DistributedSave": "HIGH",
    "FileSystemSetConfiguration": "HIGH",
    "WriteSummary": "HIGH",
    "WriteScalarSummary": "HIGH",
    "WriteHistogramSummary": "HIGH",
    "WriteImageSummary": "HIGH",
    "WriteAudioSummary": "HIGH",
    "WriteGraphSummary": "HIGH",
    "WriteRawProtoSummary": "HIGH",
    "ImportEvent": "HIGH",
    "Skipgram": "MEDIUM",
    "GenerateVocabRemapping": "MEDIUM",
    "LoadAndRemapMatrix": "MEDIUM",
    "RecordInput": "MEDIUM",
    "ListSnapshotChunksDataset": "MEDIUM",
    # checkpoint ops count only outside the SavedModel's own saver functions / save/ scope
    "Save": "HIGH",
    "SaveV2": "HIGH",
    "SaveSlices": "HIGH",
    "MergeV2Checkpoints": "HIGH",
    "Restore": "MEDIUM",
    "RestoreV2": "MEDIUM",
    "RestoreSlice": "MEDIUM",
    # Python callbacks
    "PyFunc": "HIGH",
    "PyFuncStateless": "HIGH",
    "EagerPyFunc": "HIGH",
    # the network
    "Rpc": "HIGH",
    "TryRpc": "HIGH",
    "RpcClient": "HIGH",
    "RpcCall": "HIGH",
    "RpcServer": "HIGH",
    "RpcServerStart": "HIGH",
    "RpcServerRegister": "HIGH",
    "DataServiceDataset": "HIGH",
    "DataServiceDatasetV2": "HIGH",
    "DataServiceDatasetV3": "HIGH",
    "DataServiceDatasetV4": "HIGH",
    "RegisterDataset": "HIGH",
    "RegisterDatasetV2": "HIGH",
}


SAVED_MODEL_NAMES = ("saved_model.pb",)
KERAS_METADATA_NAMES = ("keras_metadata.pb",)
#: ops that are unsafe only when a string attribute points outside the process:
#: op -> (attribute, values that stay inside, what the op then does)
_CONDITIONAL = {
    "PrintV2": ("output_stream", frozenset({"stdout", "stderr", "log(info)", "log(warning)", "log(error)", ""}), "prints to"),
    "DecodeProtoV2": ("descriptor_source", frozenset({"local://", ""}), "reads proto descriptors from"),
    "EncodeProto": ("descriptor_source", frozenset({"local://", ""}), "reads proto descriptors from"),
}
#: checkpoint ops: every SavedModel has them in its saver; anywhere else they write, delete or
#: read files at an attacker's chosen prefix (a serving function that calls SaveV2)
CHECKPOINT_OPS = frozenset({"Save", "SaveV2", "SaveSlices", "MergeV2Checkpoints", "Restore", "RestoreV2", "RestoreSlice"})
_SAVER_FUNCTION = re.compile(r"__inference__traced_(save|restore)_\d+\Z")  # TF2 object-based saver
_SAVER_NODE = re.compile(r"save(_\d+)?/")  # TF1 tf.train.Saver's name scope
_MAX_PB = 2**31  # protobuf's own limit for one message


def sniff_savedmodel(head: bytes, name: str, stream) -> bool:
    return name in SAVED_MODEL_NAMES and looks_like_message(head, (1, 2))


def sniff_graphdef(head: bytes, name: str, stream) -> bool:
    """A frozen GraphDef (`tf.compat.v1` import_graph_def): a `.pb` whose first field is a NodeDef or library."""
    return name.endswith(".pb") and bool(head) and head[0] in (0x0A, 0x12) and looks_like_message(head, (1, 2))


def sniff_fingerprint(head: bytes, name: str, stream) -> bool:
    return name == "fingerprint.pb" and looks_like_message(head, (1, 2, 3, 4, 5, 6))


def sniff_keras_metadata(head: bytes, name: str, stream) -> bool:
    return name in KERAS_METADATA_NAMES and looks_like_message(head, (1,))


@lru_cache(maxsize=1)
def known_ops() -> frozenset[str]:
    data = resources.files("modelscan_core.scanners").joinpath("tf_ops.txt").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in data.splitlines() if line.strip() and not line.startswith("#"))


def _read_all(item: Item) -> bytes:
    if item.size > _MAX_PB:
        raise ScanFailed(f"{item.size} bytes: larger than protobuf's 2 GiB message limit, TensorFlow cannot load it either")
    item.stream.seek(0)
    data = item.stream.read()
    if len(data) != item.size:
        raise ScanFailed(f"read {len(data)} of {item.size} bytes")
    return data


class _Op:
    __slots__ = ("count", "where", "attrs")

    def __init__(self):
        self.count = 0
        self.where: list[str] = []
        self.attrs: list[dict[str, str]] = []


def _node(buf: bytes, start: int, end: int) -> tuple[str, str, dict[str, str]]:
    """(name, op, string attrs) of a NodeDef."""
    name = op = ""
    attrs: dict[str, str] = {}
    for number, wire, value, stop in fields(buf, start, end):
        if wire != LEN:
            continue
        if number == 1:
            name = text(buf, value, stop)
        elif number == 2:
            op = text(buf, value, stop)
        elif number == 5:
            key = None
            s = None
            for n2, w2, v2, e2 in fields(buf, value, stop):
                if n2 == 1 and w2 == LEN:
                    key = text(buf, v2, e2)
                elif n2 == 2 and w2 == LEN:
                    for n3, w3, v3, e3 in fields(buf, v2, e2):
                        if n3 == 2 and w3 == LEN:
                            s = text(buf, v3, e3)
            if key is not None and s is not None:
                attrs[key] = s
    return name, op, attrs


class SavedModelScanner(Scanner):
    name = "modelscan.scanners.SavedModelTensorflowOpScan"
    formats = ("tf_savedmodel", "tf_graphdef")

    def scan(self, item: Item, ctx: ScanContext) -> None:
        buf = _read_all(item)
        try:
            if item.format == "tf_graphdef":
                ops: dict[str, _Op] = defaultdict(_Op)
                functions: set[str] = set()
                self._graph(buf, 0, len(buf), "", ops, functions)
                self._judge(ops, functions, ctx)
            else:
                self._scan(buf, ctx)
        except WireError as exc:
            what = "GraphDef" if item.format == "tf_graphdef" else "SavedModel"
            raise ScanFailed(f"not a well-formed {what} protobuf: {exc}") from None

    def _scan(self, buf: bytes, ctx: ScanContext) -> None:
        ops: dict[str, _Op] = defaultdict(_Op)
        functions: set[str] = set()
        user_metadata: list[tuple[str, str]] = []
        graphs = 0
        for number, wire, value, stop in fields(buf):
            if number == 2 and wire == LEN:
                graphs += 1
                self._meta_graph(buf, value, stop, f"meta_graphs[{graphs - 1}]", ops, functions, user_metadata)
        if graphs == 0:
            raise ScanFailed("saved_model.pb holds no meta graph")
        self._judge(ops, functions, ctx)
        if user_metadata:
            from modelscan_core.scanners.keras_common import ConfigWalker

            walker = ConfigWalker(ctx, "savedmodel_lambda")
            for where, meta in user_metadata:
                _walk_json(walker, ctx, meta, where)

    def _meta_graph(self, buf, start, end, label, ops, functions, user_metadata) -> None:
        for number, wire, value, stop in fields(buf, start, end):
            if wire != LEN:
                continue
            if number == 2:  # graph_def
                self._graph(buf, value, stop, label, ops, functions)
            elif number == 7:  # object_graph_def
                for i, (n2, w2, v2, e2) in enumerate(fields(buf, value, stop)):
                    if n2 != 1 or w2 != LEN:
                        continue
                    for n3, w3, v3, e3 in fields(buf, v2, e2):
                        if n3 == 4 and w3 == LEN:  # user_object
                            identifier = meta = ""
                            for n4, w4, v4, e4 in fields(buf, v3, e3):
                                if n4 == 1 and w4 == LEN:
                                    identifier = text(buf, v4, e4)
                                elif n4 == 3 and w4 == LEN:
                                    meta = text(buf, v4, e4)
                            if meta:
                                user_metadata.append((f"saved_model.pb {label} object {i} ({identifier})", meta))

    def _graph(self, buf, start, end, label, ops, functions) -> None:
        for number, wire, value, stop in fields(buf, start, end):
            if wire != LEN:
                continue
            if number == 1:
                self._add(ops, _node(buf, value, stop), f"{label} graph".strip())
            elif number == 2:
                self._library(buf, value, stop, label, ops, functions)

    def _library(self, buf, start, end, label, ops, functions) -> None:
        for number, wire, value, stop in fields(buf, start, end):
            if wire != LEN:
                continue
            if number == 1:  # FunctionDef
                fname = ""
                nodes = []
                for n2, w2, v2, e2 in fields(buf, value, stop):
                    if w2 != LEN:
                        continue
                    if n2 == 1:
                        for n3, w3, v3, e3 in fields(buf, v2, e2):
                            if n3 == 1 and w3 == LEN:
                                fname = text(buf, v3, e3)
                    elif n2 == 3:
                        nodes.append((v2, e2))
                functions.add(fname)
                for v2, e2 in nodes:
                    self._add(ops, _node(buf, v2, e2), f"{label} function {fname}", saver=bool(_SAVER_FUNCTION.match(fname)))
            elif number == 2:  # GradientDef: its function_name is a library function too
                for n2, w2, v2, e2 in fields(buf, value, stop):
                    if n2 == 2 and w2 == LEN:
                        functions.add(text(buf, v2, e2))

    @staticmethod
    def _add(ops, node, where, saver: bool = False) -> None:
        name, op, attrs = node
        if op in CHECKPOINT_OPS and (saver or _SAVER_NODE.match(name)):
            return  # the SavedModel's own saver
        entry = ops[op]
        entry.count += 1
        if len(entry.where) < 5 and where not in entry.where:
            entry.where.append(where)
        if op in _CONDITIONAL:
            entry.attrs.append(attrs)

    def _judge(self, ops: dict[str, _Op], functions: set[str], ctx: ScanContext) -> None:
        settings = ctx.settings
        table = {k: Severity.parse(str(v)) for k, v in (settings.scanner_option("savedmodel_ops", "unsafe_tf_operators", {}) or {}).items()}
        unknown_severity = settings.scanner_option("savedmodel_ops", "unknown_tf_operator", "MEDIUM")
        known = known_ops()
        for op in sorted(ops):
            entry = ops[op]
            where = ", ".join(entry.where) + (" ..." if entry.count > len(entry.where) else "")
            if not op:
                ctx.report("tf/empty-op", Severity.MEDIUM, f"{entry.count} node(s) with no op name ({where})", module="Tensorflow")
                continue
            if op in _CONDITIONAL:
                attr, inside, does = _CONDITIONAL[op]
                files = sorted({a.get(attr, "") for a in entry.attrs} - inside)
                if files and op in table:
                    ctx.report(
                        "tf/unsafe-op",
                        table[op],
                        f"Use of unsafe operator '{op}' from module 'Tensorflow': {does} {', '.join(map(repr, files))} ({where})",
                        module="Tensorflow",
                        operator=op,
                    )
                continue
            if op in table:
                ctx.report(
                    "tf/unsafe-op",
                    table[op],
                    f"Use of unsafe operator '{op}' from module 'Tensorflow': {entry.count} node(s) in {where}",
                    module="Tensorflow",
                    operator=op,
                )
            elif op not in known and op not in functions and unknown_severity:
                ctx.report(
                    "tf/unknown-op",
                    Severity.parse(str(unknown_severity)),
                    f"Operator '{op}' is not a TensorFlow op nor a function of the graph: it needs a custom kernel library ({entry.count} node(s) in {where})",
                    module="Tensorflow",
                    operator=op,
                )


class SavedModelTextScanner(SavedModelScanner):
    """`saved_model.pbtxt` (TensorFlow loads it when there is no `saved_model.pb`) and text GraphDefs.

    The text format is read for what matters here, the op of every node (`op: "Name"`) and
    the name of every library function, judged exactly like the binary form's.
    """

    formats = ("tf_savedmodel_text",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        text = _read_all(item).decode("utf-8", "replace")
        if "meta_graphs" not in text and "node" not in text:
            raise ScanFailed("saved_model.pbtxt holds no meta graph")
        ops: dict[str, _Op] = defaultdict(_Op)
        functions = set(_PBTXT_FUNCTION.findall(text))
        for match in _PBTXT_NODE.finditer(text):
            name, op = match.group(1), match.group(2)
            self._add(ops, (_unescape(name), _unescape(op), {}), "saved_model.pbtxt")
        self._judge(ops, functions, ctx)


_PBTXT_NODE = re.compile(r'\bname:\s*"((?:[^"\\]|\\.)*)"\s*op:\s*"((?:[^"\\]|\\.)*)"')
_PBTXT_FUNCTION = re.compile(r'\bsignature\s*\{\s*name:\s*"((?:[^"\\]|\\.)*)"')


def _unescape(text: str) -> str:
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape", "replace") if "\\" in text else text


def sniff_savedmodel_text(head: bytes, name: str, stream) -> bool:
    """A text-format SavedModel or GraphDef (`tf.io.write_graph(..., as_text=True)`)."""
    return name.endswith((".pbtxt", ".pbtext")) and any(
        marker in head for marker in (b"meta_graphs", b"saved_model_schema_version", b"node {", b"node{")
    )


class KerasMetadataScanner(Scanner):
    name = "modelscan.scanners.SavedModelLambdaDetectScan"
    formats = ("keras_metadata",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        from modelscan_core.scanners.keras_common import ConfigWalker

        buf = _read_all(item)
        walker = ConfigWalker(ctx, "savedmodel_lambda")
        try:
            nodes = []
            for number, wire, value, stop in fields(buf):
                if number != 1 or wire != LEN:
                    continue
                path = identifier = meta = ""
                for n2, w2, v2, e2 in fields(buf, value, stop):
                    if w2 != LEN:
                        continue
                    if n2 == 3:
                        path = text(buf, v2, e2)
                    elif n2 == 4:
                        identifier = text(buf, v2, e2)
                    elif n2 == 5:
                        meta = text(buf, v2, e2)
                nodes.append((path, identifier, meta))
        except WireError as exc:
            raise ScanFailed(f"keras_metadata.pb is not a well-formed protobuf: {exc}") from None
        for path, identifier, meta in nodes:
            if meta:
                _walk_json(walker, ctx, meta, f"keras_metadata.pb {path or identifier}", top=path or "root")


class FingerprintScanner(Scanner):
    """`fingerprint.pb` beside a SavedModel: hashes and a version, data only.

    It is read through so that a `.pb` that is not what its name says is an error, not a pass.
    """

    name = "modelscan.scanners.SavedModelTensorflowOpScan"
    formats = ("tf_fingerprint",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        buf = _read_all(item)
        try:
            for _field in fields(buf):
                pass
        except WireError as exc:
            raise ScanFailed(f"fingerprint.pb is not a well-formed FingerprintDef: {exc}") from None


def _walk_json(walker, ctx: ScanContext, meta: str, where: str, top: str = "object") -> None:
    try:
        config = json.loads(meta)
    except (ValueError, RecursionError) as exc:
        raise ScanFailed(f"{where}: metadata is not valid JSON: {exc}", "JSON_DECODE") from None
    walker.walk(config, where, top)


FORMATS = (
    # by name and protobuf structure, before the containers and pickle (a .pb has no magic)
    Format("tf_savedmodel", "SavedModelScanner", "savedmodel_ops", rules=(Rule(priority=120, sniff=sniff_savedmodel, family="protobuf"),),
           extensions=(".pb",)),
    Format("tf_savedmodel_text", "SavedModelTextScanner", "savedmodel_ops",
           rules=(Rule(priority=130, sniff=sniff_savedmodel_text, family="pbtxt"),)),
    Format("keras_metadata", "KerasMetadataScanner", "savedmodel_lambda",
           rules=(Rule(priority=140, sniff=sniff_keras_metadata, family="protobuf"),)),
    Format("tf_fingerprint", "FingerprintScanner", "savedmodel_ops", rules=(Rule(priority=150, sniff=sniff_fingerprint, family="protobuf"),)),
    Format("tf_graphdef", "SavedModelScanner", "savedmodel_ops", rules=(Rule(priority=160, sniff=sniff_graphdef, family="protobuf"),)),
)

SETTINGS = (
    ScannerSettings("savedmodel_lambda", "modelscan.scanners.SavedModelLambdaDetectScan", {
        "enabled": True,
        "supported_extensions": [".pb"],
        "unsafe_keras_operators": {"Lambda": "MEDIUM"},
    }),
    ScannerSettings("savedmodel_ops", "modelscan.scanners.SavedModelTensorflowOpScan", {
        "enabled": True,
        "supported_extensions": [".pb"],
        "unsafe_tf_operators": UNSAFE_TF_OPERATORS,
        # ops TensorFlow does not register (a custom kernel library); "" turns it off
        "unknown_tf_operator": "MEDIUM",
    }),
)
