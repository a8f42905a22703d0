"""Keras 3 `.keras` archives: a zip with `config.json`, `metadata.json` and weights.

Keras reads the archive with Python's `zipfile` (so a duplicated member name means the last
one, as here), deserializes `config.json` object by object, and loads the weights, which
are arrays. `config.json` is walked to every depth by `keras_common.ConfigWalker`;
`metadata.json` gives the Keras version that wrote the file. Every member but the HDF5
weights (arrays to h5py) is handed back to the engine, so a pickle tucked into the zip, or into
`model.weights.npz`, is still scanned.
"""

from __future__ import annotations

import json
import zipfile
from typing import Any

from modelscan_core.detect import Rule
from modelscan_core.scanners import Format, ScannerSettings
from modelscan_core.scanners.interface import Item, ScanContext, ScanFailed, Scanner
from modelscan_core.scanners.jsondoc import MAX_JSON, TOO_LARGE, document, load, parse_object

CONFIG = "config.json"
METADATA = "metadata.json"
#: members Keras reads as plain arrays with h5py (scanned as HDF5, for data kept in other files);
#: anything else is scanned as a file of its own, also `model.weights.npz`, which Keras 3 before
#: the fix opened with `np.load(allow_pickle=True)`
KNOWN_DATA = ("model.weights.h5",)
WEIGHTS = ("model.weights.h5", "model.weights.npz")
KNOWN_DIRS = ("assets/",)


def sniff_keras_zip(head: bytes, name: str, stream) -> bool:
    """A zip named `.keras`, or any zip whose root holds Keras's config: with its metadata or
    weights, or alone when it reads as a Keras object (Keras deserializes `config.json` before
    it looks for weights, and needs no `metadata.json`)."""
    if name.endswith(".keras"):
        return True
    try:
        archive = zipfile.ZipFile(stream)
        names = set(archive.namelist())
        if CONFIG not in names:
            return False
        if METADATA in names or any(n in names for n in WEIGHTS):
            return True
        info = archive.getinfo(CONFIG)
        if info.file_size > MAX_JSON:
            return True
        return _keras_object(parse_object(archive.read(info), _KERAS_KEYS))
    except Exception:
        return False


_KERAS_KEYS = (b'"class_name"',)


def _keras_object(doc: Any) -> bool:
    return doc is TOO_LARGE or isinstance(doc, dict) and "class_name" in doc and "config" in doc


def sniff_keras_json(head: bytes, name: str, stream) -> bool:
    """A JSON document whose top level is a Keras object (`class_name` and `config`): a Keras 3
    model saved as a directory (`keras.saving.load_model` reads a directory's `config.json`, as
    Hugging Face Keras repos hold it), a keras_hub preset's `config.json`/`tokenizer.json`
    (`from_preset` deserializes each), or tf.keras `model.to_json()`."""
    return _keras_object(document(head, stream, _KERAS_KEYS))


class KerasV3Scanner(Scanner):
    name = "modelscan.scanners.KerasLambdaDetectScan"
    formats = ("keras_v3",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        from modelscan_core.scanners.keras_common import ConfigWalker

        try:
            archive = zipfile.ZipFile(item.stream)
            infos = archive.infolist()
        except (zipfile.BadZipFile, ValueError, EOFError) as exc:
            raise ScanFailed(f"not a readable .keras zip: {exc}", "MODEL_SCAN") from None
        with archive:
            names = {info.filename for info in infos}
            if CONFIG not in names:
                ctx.error("no config.json: not a model Keras can load, and nothing was checked in its place")
            else:
                version = None
                if METADATA in names:
                    metadata = self._json(archive, archive.getinfo(METADATA))
                    if isinstance(metadata, dict):
                        version = metadata.get("keras_version")
                # zipfile (which Keras uses) reads the last of duplicated names; other readers
                # take the first: every copy is walked
                copies = [info for info in infos if info.filename == CONFIG]
                walker = ConfigWalker(ctx, "keras")
                for n, info in enumerate(copies):
                    where = CONFIG if not version else f"{CONFIG} (Keras {version})"
                    if len(copies) > 1:
                        where += f" [copy {n + 1} of {len(copies)}]"
                    walker.walk(self._json(archive, info), where, "model")
            for info in infos:
                _member_path(info, ctx)
                if info.is_dir() or info.filename in (CONFIG, METADATA):
                    continue
                if info.filename in KNOWN_DATA:
                    # weights: arrays, but HDF5 may keep them in other files (external storage, links)
                    ctx.scan_member(info.filename, lambda info=info: _weights(archive, info, item.stream), info.file_size)
                    continue
                if info.filename.startswith(KNOWN_DIRS) and info.file_size == 0:
                    continue
                ctx.scan_member(info.filename, lambda info=info: _open(archive, info), info.file_size)

    @staticmethod
    def _json(archive: zipfile.ZipFile, info: zipfile.ZipInfo):
        try:
            data = archive.read(info)
        except (zipfile.BadZipFile, ValueError, EOFError, OSError, NotImplementedError) as exc:
            raise ScanFailed(f"{info.filename}: cannot be read from the zip: {exc}") from None
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ScanFailed(f"{info.filename} is not valid JSON: {exc}", "JSON_DECODE") from None


class KerasJsonScanner(Scanner):
    """A Keras object config stored as a JSON file of its own, walked like a `.keras` config."""

    name = "modelscan.scanners.KerasLambdaDetectScan"
    formats = ("keras_json",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        from modelscan_core.scanners.keras_common import ConfigWalker

        ConfigWalker(ctx, "keras").walk(load(item, "a Keras config"), "Keras config", "model")


def _member_path(info: zipfile.ZipInfo, ctx: ScanContext) -> None:
    """Keras extracts asset members to a temporary directory; other tools unzip the whole
    file: a member named outside it, or stored as a symbolic link, is a write elsewhere."""
    from modelscan_core.model import Severity
    from modelscan_core.scanners.paths import escapes

    why = escapes(info.filename)
    if why is None and (info.external_attr >> 16) & 0o170000 == 0o120000:
        why = "a symbolic link"
    if why:
        ctx.report("keras/member-path", Severity.HIGH, f"zip member {info.filename!r} is {why}: extracting the archive "
                   "writes or links outside its directory", module="zipfile", operator=info.filename)


def _weights(archive: zipfile.ZipFile, info: zipfile.ZipInfo, stream):
    """The weights member as a seekable stream: in place when stored (as Keras writes it; h5py
    seeks all over the file, which a decompressing reader pays for by re-reading from the
    start), else decompressed into memory."""
    import struct

    from modelscan_core.sources.window import Window

    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
        stream.seek(info.header_offset)
        local = stream.read(30)
        if len(local) == 30 and local[:4] == b"PK\x03\x04":
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            return Window(stream, info.header_offset + 30 + name_len + extra_len, info.file_size)
    return _open(archive, info)


def _open(archive: zipfile.ZipFile, info: zipfile.ZipInfo):
    import io

    return io.BytesIO(archive.read(info))


FORMATS = (
    # before the generic zip rules, which would otherwise claim a .keras file
    Format("keras_v3", "KerasV3Scanner", "keras",
           rules=(Rule(priority=100, magics=(b"PK\x03\x04", b"PK\x05\x06"), sniff=sniff_keras_zip, family="zip"),),
           extensions=(".keras",)),
    # text: after every binary format, before the zip rules that look for an archive's tail
    Format("keras_json", "KerasJsonScanner", "keras", rules=(Rule(priority=600, sniff=sniff_keras_json, family="json"),)),
)

SETTINGS = (ScannerSettings("keras", "modelscan.scanners.KerasLambdaDetectScan", {"enabled": True, "supported_extensions": [".keras"]}),)
