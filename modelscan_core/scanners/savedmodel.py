"""TensorFlow SavedModels (`saved_model.pb`) and Keras's `keras_metadata.pb`, without TensorFlow.

Both are protobuf messages, parsed with the protobuf runtime and the minimal schema in
`proto/tensorflow.proto` (TensorFlow's field numbers, only the fields read here). The
repeated levels that hold the bulk of a file (meta graphs, graph nodes, library
functions, metadata nodes) are split with the wire reader (`protowire.fields`) and each
element is parsed on its own, so memory stays near the file's size: parsed whole, the
runtime keeps every byte it reads and a 1.5 GB frozen graph would cost twice that
(bench/bench_formats.py measures both).

What runs when TensorFlow loads and calls the model is its ops: every node of every meta
graph and of every library function is collected. Ops that touch files, call back into
Python or load libraries get the severities of `unsafe_tf_operators`; ops TensorFlow does not
know (tf_ops.txt, generated from TensorFlow by scripts/gen_tf_ops.py) need a custom kernel
library and are reported too. Keras layer JSON (keras_metadata.pb, and the `metadata` of
user objects in older SavedModels) is walked for Lambda layers like any Keras config.
Asset filenames (`asset_file_def`, and TF1's `saved_model_assets` collection) are joined to
the assets directory by the loader: one that is absolute or climbs out is HIGH, as ONNX
external data is.
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
from modelscan_core.scanners.protowire import looks_like_message

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
    "ImmutableConst": "HIGH",  # memory-maps the file its memory_region_name names
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
ASSETS_COLLECTION = "saved_model_assets"  # TF1's collection of AssetFileDefs
KERAS_METADATA_NAMES = ("keras_metadata.pb",)
#: ops that are unsafe only when a string attribute points outside the process:
#: op -> (attribute, values that stay inside, what the op then does)
_CONDITIONAL = {
    "PrintV2": ("output_stream", frozenset({"stdout", "stderr", "log(info)", "log(warning)", "log(error)", ""}), "prints to"),
    "DecodeProtoV2": ("descriptor_source", frozenset({"local://", ""}), "reads proto descriptors from"),
    "EncodeProto": ("descriptor_source", frozenset({"local://", ""}), "reads proto descriptors from"),
}
#: ops whose string attribute names the file they touch, shown in the finding
_SHOWN_ATTRS = {"ImmutableConst": "memory_region_name"}
#: checkpoint ops: every SavedModel has them in its saver; anywhere else they write, delete or
#: read files at an attacker's chosen prefix (a serving function that calls SaveV2)
CHECKPOINT_OPS = frozenset({"Save", "SaveV2", "SaveSlices", "MergeV2Checkpoints", "Restore", "RestoreV2", "RestoreSlice"})
_SAVER_FUNCTION = re.compile(r"__inference__traced_(save|restore)_\d+\Z")  # TF2 object-based saver
_SAVER_NODE = re.compile(r"save(_\d+)?/")  # TF1 tf.train.Saver's name scope


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
    from modelscan_core.scanners.proto import read_message

    return read_message(item, "TensorFlow")


class _Op:
    __slots__ = ("count", "where", "attrs")

    def __init__(self):
        self.count = 0
        self.where: list[str] = []
        self.attrs: list[dict[str, str]] = []


def _message(name: str):
    from modelscan_core.scanners.proto import message_class

    return message_class("tensorflow.proto", name)


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _node(node) -> tuple[str, str, dict[str, str]]:
    """(name, op, string attrs) of a NodeDef message."""
    attrs = {_text(a.key): _text(a.value.s) for a in node.attr if a.value.HasField("s")}
    return _text(node.name), _text(node.op), attrs


class SavedModelScanner(Scanner):
    name = "modelscan.scanners.SavedModelTensorflowOpScan"
    formats = ("tf_savedmodel", "tf_graphdef")

    def scan(self, item: Item, ctx: ScanContext) -> None:
        from modelscan_core.scanners.proto import MessageError

        buf = _read_all(item)
        try:
            if item.format == "tf_graphdef":
                ops: dict[str, _Op] = defaultdict(_Op)
                functions: set[str] = set()
                self._graph(buf, 0, len(buf), "", ops, functions)
                self._judge(ops, functions, ctx)
            else:
                self._scan(buf, ctx)
        except MessageError as exc:
            what = "GraphDef" if item.format == "tf_graphdef" else "SavedModel"
            raise ScanFailed(f"not a well-formed {what} protobuf: {exc}") from None

    def _scan(self, buf: bytes, ctx: ScanContext) -> None:
        from modelscan_core.scanners.proto import SPAN, parse_each

        ops: dict[str, _Op] = defaultdict(_Op)
        functions: set[str] = set()
        user_metadata: list[tuple[str, str]] = []
        graphs = 0
        assets: list[tuple[str, bytes]] = []  # (where, filename): a local, the scanner instance is shared
        for _number, (start, end) in parse_each(buf, {2: SPAN}):
            graphs += 1
            self._meta_graph(buf, start, end, f"meta_graphs[{graphs - 1}]", ops, functions, user_metadata, assets)
        if graphs == 0:
            raise ScanFailed("saved_model.pb holds no meta graph")
        self._judge(ops, functions, ctx)
        self._judge_assets(assets, ctx)
        if user_metadata:
            from modelscan_core.scanners.keras_common import ConfigWalker

            walker = ConfigWalker(ctx, "savedmodel_lambda")
            for where, meta in user_metadata:
                _walk_json(walker, ctx, meta, where)

    @staticmethod
    def _judge_assets(assets: list[tuple[str, bytes]], ctx: ScanContext) -> None:
        """TensorFlow joins each asset's filename to `<export_dir>/assets` and hands the path to the
        graph (a vocabulary table reads it, a serving function may return it): a filename that is
        absolute or climbs out reads any file on the host, as ONNX external data does."""
        from modelscan_core.scanners.paths import escapes

        seen: set[bytes] = set()
        for label, raw in assets:
            if raw in seen:
                continue
            seen.add(raw)
            filename = raw.decode("utf-8", "surrogateescape")
            why = escapes(filename)
            if why:
                ctx.report("tf/asset-path", Severity.HIGH,
                           f"{label} asset {raw.decode('utf-8', 'replace')!r} is {why}: the SavedModel reads it as an asset "
                           "at load time, from outside its assets directory", module="Tensorflow", operator="asset_file_def")

    def _meta_graph(self, buf, start, end, label, ops, functions, user_metadata, assets) -> None:
        from modelscan_core.scanners.proto import SPAN, parse_each

        for number, value in parse_each(buf, {2: SPAN, 4: _message("CollectionDefEntry"), 6: _message("AssetFileDef"),
                                              7: _message("SavedObjectGraph")}, start, end):
            if number == 2:
                self._graph(buf, value[0], value[1], label, ops, functions)
                continue
            if number == 6:
                assets.append((label, bytes(value.filename)))
                continue
            if number == 4:  # TF1: AssetFileDefs packed as Any in the "saved_model_assets" collection
                if _text(value.key) == ASSETS_COLLECTION:
                    from google.protobuf.message import DecodeError

                    asset_cls = _message("AssetFileDef")
                    for packed in value.value.any_list.value:
                        asset = asset_cls()
                        try:
                            asset.ParseFromString(bytes(packed.value))
                        except DecodeError as exc:
                            raise ScanFailed(f"{label}: an asset entry that is not an AssetFileDef: {exc}") from None
                        assets.append((label, bytes(asset.filename)))
                continue
            for i, obj in enumerate(value.nodes):
                user = obj.user_object
                if obj.HasField("user_object") and user.metadata:
                    identifier = _text(user.identifier)
                    user_metadata.append((f"saved_model.pb {label} object {i} ({identifier})", _text(user.metadata)))

    def _graph(self, buf, start, end, label, ops, functions) -> None:
        from modelscan_core.scanners.proto import SPAN, parse_each

        for number, value in parse_each(buf, {1: _message("NodeDef"), 2: SPAN}, start, end):
            if number == 1:
                self._add(ops, _node(value), f"{label} graph".strip())
            else:
                self._library(buf, value[0], value[1], label, ops, functions)

    def _library(self, buf, start, end, label, ops, functions) -> None:
        from modelscan_core.scanners.proto import parse_each

        for number, value in parse_each(buf, {1: _message("FunctionDef"), 2: _message("GradientDef")}, start, end):
            if number == 1:
                fname = _text(value.signature.name)
                functions.add(fname)
                saver = bool(_SAVER_FUNCTION.match(fname))
                for node in value.node_def:
                    self._add(ops, _node(node), f"{label} function {fname}", saver=saver)
            else:  # GradientDef: its gradient_func is a library function too
                functions.add(_text(value.gradient_func))

    @staticmethod
    def _add(ops, node, where, saver: bool = False) -> None:
        name, op, attrs = node
        if op in CHECKPOINT_OPS and (saver or _SAVER_NODE.match(name)):
            return  # the SavedModel's own saver
        entry = ops[op]
        entry.count += 1
        if len(entry.where) < 5 and where not in entry.where:
            entry.where.append(where)
        if op in _CONDITIONAL or op in _SHOWN_ATTRS:
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
                shown = ""
                if op in _SHOWN_ATTRS:
                    names = sorted({a.get(_SHOWN_ATTRS[op], "") for a in entry.attrs})
                    shown = f" ({_SHOWN_ATTRS[op]}: {', '.join(map(repr, names[:5]))})"
                ctx.report(
                    "tf/unsafe-op",
                    table[op],
                    f"Use of unsafe operator '{op}' from module 'Tensorflow': {entry.count} node(s) in {where}{shown}",
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
        import bisect

        starts = [(m.start(), _unescape(m.group(1))) for m in _PBTXT_FUNCTION.finditer(text)]
        functions = {fname for _, fname in starts}
        positions = [pos for pos, _ in starts]
        for match in _PBTXT_NODE.finditer(text):
            name, op = match.group(1), match.group(2)
            # a library function's nodes follow its signature: the saver's checkpoint ops are its own
            i = bisect.bisect_right(positions, match.start()) - 1
            fname = starts[i][1] if i >= 0 else ""
            where = f"saved_model.pbtxt function {fname}" if fname else "saved_model.pbtxt"
            self._add(ops, (_unescape(name), _unescape(op), {}), where, saver=bool(_SAVER_FUNCTION.match(fname)))
        self._judge(ops, functions, ctx)
        assets = []
        for match in _PBTXT_ASSET.finditer(text):  # the filename follows the asset's tensor_info block
            found = _PBTXT_FILENAME.search(text, match.end(), match.end() + 4096)
            if found:
                assets.append(("saved_model.pbtxt", _unescape(found.group(1)).encode("utf-8", "surrogateescape")))
        self._judge_assets(assets, ctx)


_PBTXT_NODE = re.compile(r'\bname:\s*"((?:[^"\\]|\\.)*)"\s*op:\s*"((?:[^"\\]|\\.)*)"')
_PBTXT_ASSET = re.compile(r"\basset_file_def\s*\{")
_PBTXT_FILENAME = re.compile(r'\bfilename:\s*"((?:[^"\\]|\\.)*)"')
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

        from modelscan_core.scanners.proto import MessageError, parse_each

        buf = _read_all(item)
        walker = ConfigWalker(ctx, "savedmodel_lambda")
        try:
            nodes = [(_text(n.node_path), _text(n.identifier), _text(n.metadata))
                     for _number, n in parse_each(buf, {1: _message("SavedMetadataObject")})]
        except MessageError as exc:
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
        from google.protobuf.message import DecodeError

        buf = _read_all(item)
        try:
            _message("FingerprintDef")().ParseFromString(buf)
        except DecodeError as exc:
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
