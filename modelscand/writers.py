"""How each writer marks a file complete, as data.

A model cache writer either downloads into a temporary name and renames it to the final
name (huggingface_hub, torch.hub, Ollama), or writes the final name in place (Keras). The
rules below are the only place that knows which is which: the watcher asks `temp_rule()`
"is this a name to wait out?" and, for names that are not temporary, the completion signal
decides how a candidate is confirmed:

- ``rename``: a rename *to* this name means the writer is done: scan at once;
- ``close``: the file was written in place: scan once no writer holds it (lease probe) and,
  where the lease cannot be taken, once its size and mtime are stable.

Add a writer by adding a `Writer` here; nothing else branches on writer names.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Writer:
    name: str
    #: basenames this writer uses while a file is incomplete (never scanned until renamed)
    temp_names: tuple[str, ...]
    #: how the final name is known to be complete: "rename" or "close"
    completion: str
    note: str = ""


WRITERS: tuple[Writer, ...] = (
    Writer(
        "huggingface_hub>=1.18",
        (r"[0-9a-f]{40,64}\.[0-9a-f]{8}\.incomplete",),
        "rename",
        "blobs/<etag>.<8hex>.incomplete -> blobs/<etag>, then the snapshot symlink",
    ),
    Writer(
        "huggingface_hub<1.18",
        (r".+\.incomplete",),
        "rename",
        "blobs/<etag>.incomplete, append mode, resumed across runs: closed many times while incomplete",
    ),
    Writer("huggingface_hub probe", (r"tmp_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",), "rename",
           "blobs/tmp_<uuid4>: created and deleted to test the filesystem"),
    Writer("huggingface_hub>=1.32 shared link", (r"\..+\.[0-9a-f]{8}\.shared", r"\..*\.shared"), "rename",
           "temp symlink .<etag>.<8hex>.shared, renamed over blobs/<etag>"),
    Writer("torch.hub", (r".+\.[0-9a-f]{32}\.partial", r".+\.partial"), "rename",
           "download_url_to_file: <dst>.<32hex>.partial then shutil.move"),
    Writer("ollama", (r".+-partial", r".+-partial-\d+"), "rename",
           "sparse sha256-<hex>-partial truncated to full size up front: size is useless, only the rename counts"),
    Writer("generic temp", (r"\..+\.tmp", r"tmp_.*", r".+\.part", r".+\.crdownload", r"\.#.+"), "rename",
           "editors, browsers and atomic writers"),
    Writer("keras get_file", (), "close", "writes the final path in place: only close-after-write marks completion"),
)

_TEMP = [(w, re.compile(p, re.DOTALL)) for w in WRITERS for p in w.temp_names]


def temp_rule(basename: str) -> Writer | None:
    """The writer whose temporary name this is, or None for a final name."""
    for writer, pattern in _TEMP:
        if pattern.fullmatch(basename):
            return writer
    return None


def is_temp(basename: str) -> bool:
    return temp_rule(basename) is not None


#: how a candidate reached us -> whether the writer is known to be done with it
COMPLETE_ON = {
    "renamed": True,  # Moved to a final name: the writer's own "done"
    "closed": False,  # Closed after write: done unless someone else still writes (probe)
    "created": False,  # Created only (mkdir -p + write, renamed in from outside): probe + stable
    "reconcile": False,  # found by a walk: may be mid-write (Keras), so probe
    "rescan": False,
    "modified": False,  # written in place, maybe still open: probe (bounded by watch.busy_max_wait)
    "stale_temp": False,  # a temp name untouched for watch.stale_temp_after: probe like a walk
}


#: names a loader treats as a model (beyond the core's claiming extensions): a file named so
#: that no scanner can read is worth a warning, not an info line
MODEL_SUFFIXES = frozenset({
    ".bin", ".safetensors", ".gguf", ".ggml", ".onnx", ".tflite", ".msgpack", ".model", ".mar", ".nemo",
    ".pdparams", ".params", ".mlmodel", ".llamafile", ".sav", ".weights", ".ot",
})
_OLLAMA_BLOB = re.compile(r"sha256-[0-9a-f]{64}")


def looks_like_model(basename: str) -> bool:
    from modelscan_core.detect import claims_model_format

    lowered = basename.lower()
    return (claims_model_format(lowered) or os.path.splitext(lowered)[1] in MODEL_SUFFIXES
            or bool(_OLLAMA_BLOB.fullmatch(lowered)))
