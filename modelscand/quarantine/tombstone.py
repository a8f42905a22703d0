"""What stays in a quarantined file's place: a small file a loader fails on, naming the quarantine.

Why leave anything: ``hf_hub_download`` does not download a blob again while
``blobs/<etag>`` exists, and torch.hub does not while the checkpoint exists. With the file
simply gone, the snapshot link dangles and the next load downloads the same bytes again
(quarantined again, downloaded again: a silent loop) or fails with a bare "no such file".
With a tombstone in its place the links still resolve, nothing is downloaded, and the load
fails with a message that says what happened and what to run:

- by default a protocol-0 pickle that opens with GLOBAL, its module name being the message.
  ``torch.load(weights_only=True)`` fails with "Unsupported global: GLOBAL <message>.<name>";
  ``pickle.load`` and ``torch.load(weights_only=False)`` fail with "ModuleNotFoundError: No
  module named '<message>'". The message has no dot, so no parent package is ever imported.
- for a file its names call ``*.safetensors``: an 8-byte header length and a JSON header whose
  one tensor has the message as its dtype; safetensors fails with "unknown variant `<message>`".

Other loaders (h5py, onnx, gguf) fail on the first bytes with their own "not a ... file"
error; ``cat`` or ``head`` shows the message on the first line.

The daemon recognises its own tombstones so it neither flags nor quarantines them: a file
is one only if its bytes are exactly the tombstone of a quarantine id. Nothing may be
prefixed or appended, so a malicious file cannot hide behind our header.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct

from modelscand.quarantine.store import try_chown

PICKLE = "pickle"
SAFETENSORS = "safetensors"
MAX_SIZE = 1024
_NAME = b"see_the_modelscand_quarantine_ledger"
_ID = r"Q\d{8}-[0-9a-f]{8}"
_PICKLE_HEAD = re.compile(rb"^cmodelscand quarantine: this file was quarantined as (" + _ID.encode() + rb");")
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def message(qid: str) -> str:
    return f"modelscand quarantine: this file was quarantined as {qid}; run 'modelscand quarantine show {qid}'"


def kind_for(names: list[str]) -> str:
    """safetensors when every name the file is known by says so; a pickle otherwise."""
    return SAFETENSORS if names and all(n.endswith(".safetensors") for n in names) else PICKLE


def build(qid: str, kind: str = PICKLE) -> bytes:
    msg = message(qid)
    if kind == SAFETENSORS:
        header = json.dumps({"__metadata__": {"modelscand": msg},
                             "quarantined": {"dtype": msg, "shape": [0], "data_offsets": [0, 0]}},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        return struct.pack("<Q", len(header)) + header
    return b"c" + msg.encode() + b"\n" + _NAME + b"\n."


def parse(data: bytes) -> str | None:
    """The quarantine id if `data` is exactly one of our tombstones, else None."""
    if len(data) > MAX_SIZE:
        return None
    m = _PICKLE_HEAD.match(data)
    if m:
        qid = m.group(1).decode()
        return qid if data == build(qid, PICKLE) else None
    if len(data) > 8:
        try:
            meta = json.loads(data[8:])["__metadata__"]["modelscand"]
        except (ValueError, KeyError, TypeError):
            return None
        m = re.search(_ID, meta) if isinstance(meta, str) else None
        if m and data == build(m.group(0), SAFETENSORS):
            return m.group(0)
    return None


def read(dfd: int, name: str) -> str | None:
    """The id of the tombstone at `name` in directory `dfd` (never following a link)."""
    try:
        fd = os.open(name, _OPEN, dir_fd=dfd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SIZE:
            return None
        return parse(os.pread(fd, MAX_SIZE + 1, 0))
    finally:
        os.close(fd)


def place(dfd: int, name: str, qid: str, kind: str, uid: int, gid: int) -> bool:
    """Create the tombstone (never over an existing entry); False if the name is taken.
    Whole or not at all: a write that fails (a full filesystem) removes what it created, so
    no truncated tombstone (which a loader would read as something else) is left; the error
    is raised for the caller to record."""
    data = build(qid, kind)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     0o444, dir_fd=dfd)
    except FileExistsError:
        return False
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        try_chown(fd, uid, gid)  # the user's cache entry (theirs to delete either way: they own the dir)
        os.fchmod(fd, 0o444)
        os.fsync(fd)
    except OSError:
        ours = os.fstat(fd)
        os.close(fd)
        try:
            now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino):
                os.unlink(name, dir_fd=dfd)
        except OSError:
            pass
        raise
    os.close(fd)
    return True
