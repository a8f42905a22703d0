"""Walk a Keras model config (JSON) the way the Keras loaders would, and say what runs.

One walker serves every place a Keras config is stored: the `model_config` and
`training_config` attributes of an `.h5` file, `config.json` in a `.keras` zip, and the
per-layer JSON in a SavedModel's `keras_metadata.pb`. It visits every dict at every depth
(Sequential and Functional models inside models, wrappers such as TimeDistributed and
Bidirectional, optimizer and loss configs), because the loaders deserialize all of them.

What is code, for a loader:
- a `Lambda` layer: marshalled Python bytecode (`function`, and `output_shape` when it is a
  lambda too) that `func_load` turns into a function. The bytecode is untrusted: it is never
  given to `marshal.loads`; we report its size, sha256 and the strings visible in the raw
  bytes (a marshalled code object stores its names as plain length-prefixed strings);
- a Keras 3 object whose `module` lies outside Keras: `importlib.import_module(module)` and
  `getattr(class_name)` (CVE-2025-1550), judged with the pickle policy's lists;
- Keras APIs that are not modeling APIs (`keras.utils.get_file`,
  `keras.config.enable_unsafe_deserialization`, `load_model`, ...) and layers that load code or
  files by design (TorchModuleWrapper holds a `torch.save` pickle, TFSMLayer loads a
  SavedModel from a path, lookup layers and keras_hub tokenizers read a vocabulary, merges
  or SentencePiece file or URL), and Keras-internal functions that read, write or download
  (a Lambda calls whatever function its config names, with the config's `arguments`);
- custom objects looked up by `registered_name` (`package>Name`) outside Keras's packages, and
  layer names that are escaping paths (Keras 3 makes paths of them).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Any

from modelscan_core.model import Severity
from modelscan_core.scanners.interface import ScanContext

#: packages the Keras 3 loader treats as Keras (it imports these by `module`)
KERAS_PACKAGES = frozenset({"keras", "keras_hub", "keras_cv", "keras_nlp", "tf_keras"})

#: Keras APIs that are not modeling APIs; reachable by name from a config in Keras < 3.11
#: (keras.src.saving.serialization_lib.NON_MODELING_APIS lists them since the fixes)
NON_MODELING = {
    "enable_unsafe_deserialization": (Severity.CRITICAL, "switches safe mode off: any Lambda or pickle after it runs"),
    "get_file": (Severity.HIGH, "downloads a URL to a local path at load time (CVE-2025-8747)"),
    "load_model": (Severity.HIGH, "loads another model (and whatever code it holds)"),
    "model_from_json": (Severity.HIGH, "deserializes another model config"),
    "deserialize_keras_object": (Severity.HIGH, "deserializes an arbitrary config"),
    "register_keras_serializable": (Severity.HIGH, "registers objects in the loader's namespace"),
    "save_model": (Severity.HIGH, "writes a file at load time"),
    "save_weights": (Severity.HIGH, "writes a file at load time"),
    "load_weights": (Severity.HIGH, "reads a file at load time"),
    "save_img": (Severity.HIGH, "writes a file at load time"),
    "load_img": (Severity.MEDIUM, "reads a file at load time"),
    "image_dataset_from_directory": (Severity.MEDIUM, "reads a directory at load time"),
    "text_dataset_from_directory": (Severity.MEDIUM, "reads a directory at load time"),
    "audio_dataset_from_directory": (Severity.MEDIUM, "reads a directory at load time"),
    "clear_session": (Severity.MEDIUM, "resets the loading process's Keras state"),
}

LOOKUP_LAYERS = frozenset({"StringLookup", "IntegerLookup", "TextVectorization", "IndexLookup"})
#: config keys that layers and tokenizers (Keras lookups, keras_hub's WordPiece, BytePair and
#: SentencePiece tokenizers) open as a file or URL when their value is a string; saved models
#: keep these inline (a list) or as assets, so a string is a path the file chooses
FILE_KEYS = ("vocabulary", "merges", "proto", "spm_proto")
#: words in the name of a Keras-internal function that reads, writes, downloads or runs: a
#: config reaches such a function by `module` + `class_name: function` (Keras before 3.11
#: imported any `keras.src` module by name), and a Lambda calls it with the config's `arguments`
_KERAS_EFFECT_WORDS = frozenset({"load", "save", "dump", "write", "open", "exec", "eval", "system", "popen", "spawn",
                                 "download", "urlretrieve", "extract", "remove", "rmtree", "unlink", "delete",
                                 "subprocess", "shell", "import", "file", "makedirs", "mkdir", "copy2", "copyfile",
                                 "move", "rename"})

#: strings in marshalled bytecode that mean the lambda reaches for the system
_DANGEROUS_NAMES = frozenset(
    {
        "system", "popen", "Popen", "exec", "eval", "execfile", "compile", "__import__", "import_module",
        "subprocess", "os", "posix", "nt", "pty", "socket", "spawn", "spawnl", "spawnv", "spawnve", "execv",
        "execve", "execvp", "fork", "forkpty", "check_output", "check_call", "call", "getoutput", "run_path",
        "run_module", "runpy", "builtins", "__builtins__", "__globals__", "__subclasses__", "__code__",
        "marshal", "pickle", "loads", "urlopen", "urllib", "requests", "ctypes", "CDLL", "rmtree", "unlink",
        "remove", "open", "getattr", "setattr", "breakpoint", "shutil", "webbrowser",
        # obfuscation: names built at run time, modules reached through the loader's namespace
        # ("locals" is left out: nested functions' qualnames read "f.<locals>.<lambda>")
        "globals", "vars", "chr", "b64decode", "base64", "fromhex", "decompress", "zlib", "codecs",
        "__dict__", "__getattribute__",
        # reaching a module or an attribute by a name built at run time, without the names above
        # (`inspect.getattr_static(sys.modules[...], ...)`, `operator.attrgetter(...)`)
        "sys", "modules", "importlib", "inspect", "getattr_static", "operator", "attrgetter", "methodcaller",
        "__class__", "__bases__", "__base__", "__mro__", "mro", "__reduce__", "__reduce_ex__", "__getattr__",
        "__loader__", "__spec__", "load_module", "exec_module", "FunctionType", "CodeType",
    }
)

# marshal's string types (Python 3.4+), with and without FLAG_REF (0x80)
_SHORT_STR = frozenset({0x7A, 0xFA, 0x5A, 0xDA})  # TYPE_SHORT_ASCII(_INTERNED)
_LONG_STR = frozenset({0x61, 0xE1, 0x41, 0xC1, 0x75, 0xF5, 0x74, 0xF4, 0x73, 0xF3})  # a A u t s
_PRINTABLE = re.compile(rb"[\x20-\x7e]+\Z")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def bytecode_strings(raw: bytes, limit: int = 200) -> list[str]:
    """Length-prefixed printable strings in marshalled data, read without unmarshalling.

    A code object keeps `co_names`, `co_varnames`, `co_consts` strings and the file name as
    marshal strings: a type byte, a length, the bytes. Reading them needs no interpretation
    of the rest, so hostile bytes can at worst produce a few spurious strings.
    """
    out: list[str] = []
    seen: set[str] = set()
    i, n = 0, len(raw)
    while i < n and len(out) < limit:
        t = raw[i]
        text = None
        if t in _SHORT_STR and i + 1 < n:
            length = raw[i + 1]
            chunk = raw[i + 2 : i + 2 + length]
            if length and len(chunk) == length and _PRINTABLE.match(chunk):
                text, step = chunk, 2 + length
        elif t in _LONG_STR and i + 4 < n:
            length = int.from_bytes(raw[i + 1 : i + 5], "little")
            chunk = raw[i + 5 : i + 5 + length]
            if 0 < length <= 4096 and len(chunk) == length and _PRINTABLE.match(chunk):
                text, step = chunk, 5 + length
        if text is None:
            i += 1
            continue
        s = text.decode("ascii")
        if s not in seen:
            seen.add(s)
            out.append(s)
        i += step
    return out


def describe_bytecode(encoded: Any) -> tuple[str, list[str], bool]:
    """(summary, strings, dangerous) for base64 marshalled bytecode from a config."""
    if not isinstance(encoded, str):
        return f"bytecode of unexpected type {type(encoded).__name__}", [], False
    try:
        raw = base64.b64decode(encoded.encode("ascii", "replace"), validate=False)
    except (binascii.Error, ValueError):
        raw = encoded.encode("utf-8", "replace")
        return f"undecodable bytecode text ({len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()})", [], False
    strings = bytecode_strings(raw)
    tokens = {t for s in strings for t in re.split(r"[^A-Za-z0-9_]+", s) if t}
    dangerous = sorted(tokens & _DANGEROUS_NAMES)
    summary = f"{len(raw)} bytes of marshalled bytecode, sha256 {hashlib.sha256(raw).hexdigest()}"
    if strings:
        shown = ", ".join(repr(s) for s in strings[:24])
        summary += f"; strings: {shown}{' ...' if len(strings) > 24 else ''}"
    return summary, dangerous, bool(dangerous)


class ConfigWalker:
    """Visit every object of a Keras config and report what a loader would execute.

    `where` names the stored config ("model_config", "config.json", a keras_metadata node);
    paths below it drop the `config` levels: `model/layers[2]/layer/layers[1]`.
    """

    def __init__(self, ctx: ScanContext, scanner_key: str, *, source: str | None = None, max_nodes: int = 2_000_000):
        self.ctx = ctx
        self.source = source
        self.max_nodes = max_nodes
        settings = ctx.settings
        ops = settings.scanner_option(scanner_key, "unsafe_keras_operators", None)
        if ops is None:
            ops = settings.scanner_option("savedmodel_lambda", "unsafe_keras_operators", {"Lambda": "MEDIUM"})
        self.unsafe_layers = {k: Severity.parse(str(v)) for k, v in (ops or {}).items()}
        self._policy = None
        self._handled: set[int] = set()
        self._seen: set[tuple[str, object]] = set()

    # -- reporting -------------------------------------------------------------------

    def _report(self, rule: str, severity: Severity, description: str, *, module: str = "Keras", operator: str = "", call: str | None = None, key: object = None) -> None:
        # keras_metadata.pb repeats a layer's config in every enclosing model's node: one finding
        if key is not None:
            if (rule, key) in self._seen:
                return
            self._seen.add((rule, key))
        self.ctx.report(rule, severity, description, module=module, operator=operator, call=call, source=self.source)

    # -- the walk --------------------------------------------------------------------

    def walk(self, root: Any, where: str, top: str = "model") -> None:
        stack: list[tuple[Any, str]] = [(root, top)]
        visited = 0
        while stack:
            node, path = stack.pop()
            visited += 1
            if visited > self.max_nodes:
                self.ctx.error(f"{where}: more than {self.max_nodes} config nodes; the rest was not checked", incomplete=True)
                return
            if isinstance(node, dict):
                self._visit(node, path, where)
                children = []
                for key, value in node.items():
                    if isinstance(value, (dict, list)):
                        # an object's own `config` is the object itself, not a level of the path
                        child = path if key == "config" and "class_name" in node else f"{path}/{key}"
                        children.append((value, child))
                stack.extend(reversed(children))
            elif isinstance(node, list):
                stack.extend(reversed([(v, f"{path}[{i}]") for i, v in enumerate(node) if isinstance(v, (dict, list))]))

    def _visit(self, obj: dict, path: str, where: str) -> None:
        class_name = obj.get("class_name")
        config = obj.get("config")
        if isinstance(class_name, str):
            layer_name = config.get("name") if isinstance(config, dict) else None
            label = f"{path}" + (f" ({class_name} {layer_name!r})" if isinstance(layer_name, str) else f" ({class_name})")
            if class_name == "__lambda__" and id(obj) not in self._handled:
                self._lambda_code(config, path, where, "a serialized Python lambda")
            if class_name in self.unsafe_layers or class_name.rsplit(".", 1)[-1] in self.unsafe_layers:
                self._lambda_layer(class_name, config if isinstance(config, dict) else {}, label, where)
            if "module" in obj:
                self._module(obj, class_name, config, label, where)
            if isinstance(layer_name, str):
                self._path_name(layer_name, label, where, obj)
            registered = obj.get("registered_name")
            if isinstance(registered, str) and ">" in registered:
                self._registered(registered, label, where, obj)
            short = class_name.rsplit(".", 1)[-1]
            target = config if class_name == "function" and isinstance(config, str) else short
            if target in NON_MODELING:
                severity, why = NON_MODELING[target]
                self._report("keras/non-modeling-api", severity, f"{where}: {label} calls Keras API '{target}', which {why}", operator=target, key=(target, json_key(obj)))
            if short == "TorchModuleWrapper" and isinstance(config, dict):
                self._torch_wrapper(config, label, path, where)
            elif short == "TFSMLayer" and isinstance(config, dict):
                fp = config.get("filepath")
                self._report("keras/tfsm-layer", Severity.HIGH, f"{where}: {label} loads a TensorFlow SavedModel (graph code) from {fp!r} at load time", operator="TFSMLayer", key=json_key(obj))
            elif isinstance(config, dict):
                for file_key in FILE_KEYS:
                    vocab = config.get(file_key)
                    if isinstance(vocab, str) and vocab.strip():
                        remote = "://" in vocab
                        self._report(
                            "keras/vocabulary-file",
                            Severity.HIGH,
                            f"{where}: {label} reads its {file_key} from {'the URL' if remote else 'the file'} {vocab!r} "
                            "at load time",
                            operator=short,
                            key=(file_key, json_key(obj)),
                        )

    def _path_name(self, layer_name: str, label: str, where: str, obj: dict) -> None:
        """Keras 3 turns layer names into paths (assets, weight groups): one that escapes is a file
        write or read outside the archive's temporary directory."""
        from modelscan_core.scanners.paths import escapes

        why = escapes(layer_name)
        if why:
            self._report("keras/path-name", Severity.HIGH, f"{where}: {label} is named {layer_name!r}, {why}: Keras uses "
                         "layer names as paths for assets and weights", operator="name", key=json_key(obj))

    def _registered(self, registered: str, label: str, where: str, obj: dict) -> None:
        """`package>Name` is a lookup in the process's registry of custom objects: whatever code
        registered that name (any imported library) is instantiated with this config."""
        package = registered.split(">", 1)[0]
        if package in KERAS_PACKAGES:
            return
        self._report("keras/registered-name", Severity.HIGH, f"{where}: {label} names the custom object {registered!r}: "
                     "the loader instantiates whatever the environment registered under that name, code outside Keras",
                     module=package, operator=registered, key=json_key(obj))

    def _lambda_layer(self, class_name: str, config: dict, label: str, where: str) -> None:
        severity = self.unsafe_layers.get(class_name, self.unsafe_layers.get(class_name.rsplit(".", 1)[-1], Severity.MEDIUM))
        parts: list[str] = []
        dangerous: list[str] = []
        for key in ("function", "output_shape", "mask"):
            value = _untuple(config.get(key))
            kind = config.get(f"{key}_type")
            if isinstance(value, dict) and value.get("class_name") == "__lambda__":
                self._handled.add(id(value))
                inner = value.get("config")
                code = inner.get("code", inner.get("value")) if isinstance(inner, dict) else None
                summary, names, bad = describe_bytecode(code)
                parts.append(f"{key}: {summary}")
                dangerous += names
                continue
            if kind == "lambda" or (key == "function" and kind is None and isinstance(value, (list, str)) and _looks_b64(value)):
                code = value[0] if isinstance(value, (list, tuple)) and value else value
                summary, names, bad = describe_bytecode(code)
                parts.append(f"{key}: {summary}")
                dangerous += names
            elif kind == "function" and isinstance(value, str):
                parts.append(f"{key}: the named function {config.get(f'{key}_module') or config.get('module')!s}.{value}")
        if dangerous:
            severity = Severity.CRITICAL
        detail = "; ".join(parts) if parts else "no code found in its config"
        rule = "keras/lambda-dangerous" if dangerous else "keras/lambda"
        extra = f"; names the system: {', '.join(sorted(set(dangerous)))}" if dangerous else ""
        short = class_name.rsplit(".", 1)[-1]
        what = "runs Python code when the model loads" if short == "Lambda" else "is listed in unsafe_keras_operators"
        self._report(rule, severity, f"{where}: {short} layer at {label} {what} ({detail}){extra}", operator=short, key=(config.get("name"), detail))

    def _lambda_code(self, config: Any, path: str, where: str, what: str) -> None:
        code = None
        if isinstance(config, dict):
            code = config.get("code", config.get("value"))
        summary, dangerous, bad = describe_bytecode(code)
        lam = self.unsafe_layers.get("Lambda", Severity.MEDIUM)
        severity = Severity.CRITICAL if bad else lam
        extra = f"; names the system: {', '.join(dangerous)}" if bad else ""
        self._report("keras/lambda-dangerous" if bad else "keras/lambda-code", severity, f"{where}: {what} at {path} ({summary}){extra}", operator="Lambda", key=summary)

    def _module(self, obj: dict, class_name: str, config: Any, label: str, where: str) -> None:
        module = obj.get("module")
        if module is None or not isinstance(module, str):
            return
        package = module.split(".", 1)[0]
        if package in KERAS_PACKAGES:
            if class_name == "function" and isinstance(config, str) and config not in NON_MODELING:
                words = set(config.lower().split("_"))
                if words & _KERAS_EFFECT_WORDS:
                    self._report(
                        "keras/effect-function",
                        Severity.HIGH,
                        f"{where}: {label} names the Keras-internal function {module}.{config}, which reads, writes or runs "
                        "something: not a modeling function (a Lambda calls it with the config's arguments)",
                        module=module, operator=config, call=f"{module}.{config}", key=json_key(obj),
                    )
            return
        name = config if class_name == "function" and isinstance(config, str) else class_name
        registered = obj.get("registered_name")
        if module == "builtins" and class_name == "function":
            # Keras looks these names up in its own builtin modules (activations, losses, ...)
            if isinstance(name, str) and _IDENT.match(name) and name not in _BUILTIN_DANGER:
                return
        from modelscan_core.scanners.pickle.values import CALLED

        judgement = self._judge(module, name if isinstance(name, str) else str(name), CALLED)
        severity = max(judgement, Severity.MEDIUM)
        reg = f" (registered_name {registered!r})" if registered else ""
        self._report(
            "keras/foreign-module",
            severity,
            f"{where}: {label} makes the loader import module {module!r} and use {name!r}{reg}: an import-and-call primitive outside Keras (CVE-2025-1550)",
            module=module,
            operator=str(name),
            call=f"{module}.{name}",
            key=json_key(obj),
        )

    def _judge(self, module: str, name: str, uses: int) -> Severity:
        if self._policy is None:
            self._policy = self.ctx.settings.pickle_policy
        judgement = self._policy.judge(module, name, uses)
        return judgement.severity or Severity.LOW

    def _torch_wrapper(self, config: dict, label: str, path: str, where: str) -> None:
        payload = config.get("module")
        self._report(
            "keras/torch-module",
            Severity.HIGH,
            f"{where}: {label} holds a torch.save pickle that torch.load unpickles at load time",
            operator="TorchModuleWrapper",
        )
        if isinstance(payload, str):
            try:
                raw = base64.b64decode(payload.encode("ascii", "replace"))
            except (binascii.Error, ValueError):
                self.ctx.error(f"{where}: {path}: TorchModuleWrapper payload is not valid base64")
                return
            import io

            self.ctx.scan_member(f"{where}:{path}/module", lambda: io.BytesIO(raw), len(raw))


_BUILTIN_DANGER = frozenset({"eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "breakpoint", "input", "help", "exit", "quit", "vars", "globals", "locals", "delattr"})


def _untuple(value: Any) -> Any:
    """tf.keras's SavedModel metadata writes tuples as {"class_name": "__tuple__", "items": [...]}."""
    if isinstance(value, dict) and value.get("class_name") == "__tuple__" and isinstance(value.get("items"), list):
        return value["items"]
    return value


def json_key(obj: Any) -> str:
    """A stable identity for a config object, to report each one once."""
    import json

    try:
        return json.dumps(obj, sort_keys=True, default=str)
    except (TypeError, ValueError, RecursionError):
        return repr(id(obj))


def _looks_b64(value: Any) -> bool:
    text = value[0] if isinstance(value, (list, tuple)) and value else value
    return isinstance(text, str) and len(text) >= 16 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", text) is not None
