"""Keras models in HDF5 (`.h5`, `.hdf5`), read with h5py: never with Keras or TensorFlow.

`keras.models.load_model` (Keras 3 and tf.keras 2.x alike) rebuilds the model from the JSON
in the file's `model_config` attribute and compiles it from `training_config`; the weights
in `model_weights/` are plain arrays. So the JSON is what can run code, and it is walked
to every depth by `keras_common.ConfigWalker`. An HDF5 file with no model config (a
weights-only file, or plain data) is data, clean unless HDF5 reads some of it from other
files (external raw storage, external links, virtual datasets): the weights would then be
a file of the host.
"""

from __future__ import annotations

import json
import os

from modelscan_core.detect import Rule
from modelscan_core.scanners import Format, ScannerSettings
from modelscan_core.scanners.interface import Item, ScanContext, ScanFailed, Scanner

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

#: attributes of the root group that Keras loaders deserialize
CONFIG_ATTRS = ("model_config", "training_config")


def sniff_hdf5(head: bytes, name: str, stream) -> bool:
    """HDF5's signature sits at 0 or, after a user block, at 512, 1024, 2048, ... bytes."""
    if head.startswith(HDF5_MAGIC):
        return True
    offset = 512
    while offset + 8 <= len(head):
        if head[offset : offset + 8] == HDF5_MAGIC:
            return True
        offset *= 2
    return False


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "tobytes") and getattr(value, "shape", None) == ():  # numpy scalar string
        return value.tobytes().decode("utf-8")
    if isinstance(value, str):
        return value
    raise TypeError(f"attribute of type {type(value).__name__}")


class KerasH5Scanner(Scanner):
    name = "modelscan.scanners.H5LambdaDetectScan"
    formats = ("keras_h5",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        import h5py

        from modelscan_core.scanners.keras_common import ConfigWalker

        try:
            handle = h5py.File(item.stream, "r")
        except Exception as exc:  # h5py raises OSError, ValueError, KeyError for broken files
            raise ScanFailed(f"not a readable HDF5 file: {exc}") from None
        with handle:
            walker = ConfigWalker(ctx, "keras_h5")
            try:
                attrs = handle.attrs
                present = [key for key in CONFIG_ATTRS if key in attrs]
                texts = {key: _text(attrs[key]) for key in present}
                # a model saved inside a group (rare; tf.keras never does it) is still loadable
            except Exception as exc:
                raise ScanFailed(f"cannot read the HDF5 attributes: {exc}") from None
            for key, text in texts.items():
                try:
                    config = json.loads(text)
                except (ValueError, RecursionError) as exc:
                    raise ScanFailed(f"{key} is not valid JSON: {exc}", "JSON_DECODE") from None
                walker.walk(config, key, "model" if key == "model_config" else "training")
            _external_storage(handle, ctx)


#: objects looked at for storage outside the file (a model has a few thousand)
MAX_OBJECTS = 1_000_000


def _external_storage(handle, ctx: ScanContext) -> None:
    """HDF5 reads some data from other files: a dataset's external raw storage (any file, at
    an offset: the library reads its bytes as the array), an external link (another HDF5 file)
    and the sources of a virtual dataset. Keras reads every weight of a model or a
    `load_weights` file through h5py, so any of these reads a file of the host into the
    weights; Keras never writes one."""
    import h5py

    from modelscan_core.model import Severity

    def report(what: str, where: str) -> None:
        ctx.report("keras/h5-external-data", Severity.HIGH,
                   f"{where} {what}: HDF5 reads it when the weights are loaded, a file outside the model",
                   module="h5py", operator=where)

    seen: set = set()
    stack = [("", handle)]
    count = 0
    unreadable = (KeyError, OSError, ValueError, RuntimeError)  # what h5py raises for damaged structures
    while stack:
        path, group = stack.pop()
        try:
            names = list(group)
        except unreadable as exc:
            ctx.error(f"{path or '/'}: its members cannot be listed ({exc}); they were not checked")
            continue
        for name in names:
            count += 1
            if count > MAX_OBJECTS:
                ctx.error(f"more than {MAX_OBJECTS} HDF5 objects; the rest was not checked", incomplete=True)
                return
            where = f"{path}/{name}"
            try:
                link = group.get(name, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    report(f"is an external link to {link.filename!r}:{link.path!r}", where)
                    continue
                if isinstance(link, h5py.SoftLink):
                    continue
                obj = group[name]
                info = h5py.h5o.get_info(obj.id)
                key = (info.fileno, getattr(info, "addr", None) or getattr(info, "token", where))  # hard links: once
            except unreadable as exc:
                ctx.error(f"{where}: cannot be read ({exc})")
                continue
            if key in seen:
                continue
            seen.add(key)
            if isinstance(obj, h5py.Group):
                stack.append((where, obj))
            elif isinstance(obj, h5py.Dataset):
                try:
                    external = obj.external
                    virtual = sorted({s.file_name for s in obj.virtual_sources()} - {"."}) if obj.is_virtual else []
                except unreadable as exc:
                    ctx.error(f"{where}: its storage cannot be read ({exc}); not checked")
                    continue
                if external:
                    files = ", ".join(repr(os.fsdecode(e[0])) for e in external[:3])
                    report(f"keeps its data in external file(s) {files}", where)
                if virtual:
                    report(f"is a virtual dataset reading {', '.join(map(repr, virtual[:3]))}", where)


FORMATS = (
    # before the containers: HDF5 has no magic at offset 0 when a user block precedes it
    Format("keras_h5", "KerasH5Scanner", "keras_h5", rules=(Rule(priority=110, sniff=sniff_hdf5, family="hdf5"),),
           extensions=(".h5", ".hdf5")),
)

SETTINGS = (ScannerSettings("keras_h5", "modelscan.scanners.H5LambdaDetectScan", {"enabled": True, "supported_extensions": [".h5"]}),)
