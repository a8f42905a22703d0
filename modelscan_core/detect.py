"""Decide what a byte stream is from its content; the file name is only a hint.

Every rule looks at the first bytes of the stream (`HEAD` bytes) and, where magic bytes are
not enough, at the structure behind them. Rules are tried in order and the first match wins,
so a pickle named `.txt`, `.BIN` or with no name at all (a Hugging Face blob) is a pickle.

Adding a format means adding one `Rule` here and one scanner under `scanners/`.
"""

from __future__ import annotations

import importlib
import io
import os
from dataclasses import dataclass
from typing import BinaryIO, Callable

HEAD = 64 * 1024


@dataclass(frozen=True)
class Rule:
    """One format's test. `magics`: the head starts with one of these (empty: no magic test).

    `sniff` (optional) looks further: `(head, lower-cased name, stream) -> bool`. It may be
    a callable or a "module:function" string, imported only when a file reaches the rule,
    so the CLI never imports a format's code for files of other formats.
    """

    format: str
    magics: tuple[bytes, ...] = ()
    sniff: Callable[[bytes, str, BinaryIO], bool] | str | None = None

    def matches(self, head: bytes, name: str, stream: BinaryIO) -> bool:
        if self.magics and not head.startswith(self.magics):
            return False
        if self.sniff is None:
            return True
        sniff = self.sniff
        if isinstance(sniff, str):
            module_name, func_name = sniff.split(":")
            sniff = getattr(importlib.import_module(module_name), func_name)
        stream.seek(0)
        try:
            return bool(sniff(head, name, stream))
        finally:
            stream.seek(0)


def _is_pickle(head: bytes, name: str, stream: BinaryIO | None = None) -> bool:
    if len(head) >= 2 and head[0] == 0x80:
        return head[1] <= 5
    if not head or head[0] not in _STARTS:
        return False
    return _probe(stream if stream is not None else io.BytesIO(head))


# Bytes a pickle can begin with: every opcode (PROTO is optional to CPython, and the probe
# tells pickles from data that merely starts with an opcode byte).
_STARTS = frozenset(b"(.012BCFGIJKLMNPQRSTUVXabcdeghijlopqrstu}])" + bytes(range(0x80, 0x99)))

def _probe(stream: BinaryIO) -> bool:
    """Run the VM over the stream: a pickle gets through several opcodes or names a global.

    Text or binary data that happens to start with an opcode byte fails within an op or two
    (an invalid opcode, a stack underflow, an operand longer than the file, a "module" name
    that is not an identifier). The whole stream is probed, not a window: a pickle may open
    with an operand of any length, which the VM skips with a seek rather than reads.
    """
    from modelscan_core.scanners.pickle.vm import PickleVM

    size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    facts = PickleVM(stream, size=size).run()
    if facts.stopped:
        return True
    if any(_dotted(g.module) and _dotted(g.name) for g in facts.globals):
        return True
    return facts.error_truncated and facts.ops >= 4


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


# Order matters: the first matching rule decides. Containers before the formats they hold;
# pickle last, because protocol 0 has no magic and is recognised by running the VM.
RULES: list[Rule] = [
    # Keras and TensorFlow first: a .keras file is a zip that the generic zip rules must not claim
    Rule("keras_v3", (b"PK\x03\x04", b"PK\x05\x06"), "modelscan_core.scanners.keras_v3:sniff_keras_zip"),
    Rule("keras_h5", (), "modelscan_core.scanners.keras_h5:sniff_hdf5"),
    Rule("tf_savedmodel", (), "modelscan_core.scanners.savedmodel:sniff_savedmodel"),
    Rule("tf_savedmodel_text", (), "modelscan_core.scanners.savedmodel:sniff_savedmodel_text"),
    Rule("keras_metadata", (), "modelscan_core.scanners.savedmodel:sniff_keras_metadata"),
    Rule("tf_fingerprint", (), "modelscan_core.scanners.savedmodel:sniff_fingerprint"),
    Rule("tf_graphdef", (), "modelscan_core.scanners.savedmodel:sniff_graphdef"),
    # Containers (issue 3): archives and compressed streams, then formats that hold pickles
    Rule("pytorch_zip", (b"PK\x03\x04", b"PK\x05\x06"), "modelscan_core.sources.sniff:torch_zip"),
    Rule("zip", (b"PK\x03\x04", b"PK\x05\x06"), "modelscan_core.sources.sniff:zip_any"),
    Rule("pytorch_legacy", (b"\x80", b"L"), "modelscan_core.sources.sniff:legacy_torch"),
    Rule("numpy", (b"\x93NUMPY",), "modelscan_core.sources.sniff:npy"),
    Rule("7z", (b"7z\xbc\xaf\x27\x1c",), "modelscan_core.sources.sniff:sevenzip"),
    Rule("gzip", (b"\x1f\x8b",), "modelscan_core.sources.sniff:gzip"),
    Rule("bz2", (b"BZh",), "modelscan_core.sources.sniff:bzip2"),
    Rule("xz", (b"\xfd7zXZ\x00",), "modelscan_core.sources.sniff:xz"),
    Rule("lzma", (b"\x5d\x00",), "modelscan_core.sources.sniff:lzma_alone"),
    Rule("zlib", (b"\x78",), "modelscan_core.sources.sniff:zlib_stream"),
    Rule("lz4", (b"\x04\x22\x4d\x18",), "modelscan_core.sources.sniff:lz4_frame"),
    Rule("joblib_zfile", (b"ZF",), "modelscan_core.sources.sniff:joblib_zfile"),
    Rule("tar", (), "modelscan_core.sources.sniff:tar"),
    # a zip after other bytes (zipfile opens it; torch.load reads the file as a legacy pickle)
    Rule("pytorch_zip", (), "modelscan_core.sources.sniff:torch_zip"),
    Rule("zip", (), "modelscan_core.sources.sniff:zip_any"),
    Rule("pickle", (), _is_pickle),
]

#: extensions whose files claim to be a model that can execute code when loaded; such a
#: file that matches no rule is an error ("could not read"), not a skip
CLAIMING_EXTENSIONS = frozenset(
    {".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib", ".dill", ".npy", ".npz", ".h5", ".hdf5", ".keras", ".pb", ".pt2"}
)


def detect(head: bytes, name: str, stream: BinaryIO | None = None) -> str | None:
    """The format of a stream whose first bytes are `head`, or None when no rule matches."""
    lowered = os.path.basename(name).lower()
    if stream is None:
        stream = io.BytesIO(head)
    for rule in RULES:
        if rule.matches(head, lowered, stream):
            return rule.format
    return None


def claims_model_format(name: str) -> bool:
    return os.path.splitext(name.lower())[1] in CLAIMING_EXTENSIONS
