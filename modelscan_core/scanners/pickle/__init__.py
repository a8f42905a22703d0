"""The pickle format: a VM that reports facts (vm.py), a policy that judges them (policy.py,
lists.py), and the scanner that ties them together (scanner.py).

Detection lives here too, because a pickle has no magic: protocol 2+ starts with PROTO, but
protocols 0 and 1 (and PROTO-less streams, which CPython accepts) are recognised by running
the VM over the stream. The rule runs last, after every format with a magic has had its say.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

from modelscan_core.detect import Rule
from modelscan_core.scanners import Format, ScannerSettings


def is_pickle(head: bytes, name: str, stream: BinaryIO | None = None) -> bool:
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
    that is not an identifier). A stream that breaks only when a value is used (a list as a
    dict key, `N}]Nsb.`) is a pickle, a broken one. The whole stream is probed, not a window: a pickle may open
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
    return (facts.error_truncated or facts.error_at_load) and facts.ops >= 4


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


FORMATS = (
    # last of all: protocol 0 has no magic and is recognised by running the VM
    Format("pickle", "modelscan_core.scanners.pickle.scanner:PickleScanner", "pickle",
           rules=(Rule(priority=1000, sniff=is_pickle, family="pickle"),),
           extensions=(".pkl", ".pickle", ".joblib", ".dill")),
)

SETTINGS = (
    ScannerSettings("pickle", "modelscan.scanners.PickleUnsafeOpScan", {
        "enabled": True,
        "supported_extensions": [".pkl", ".pickle", ".joblib", ".dill", ".dat", ".data"],
    }),
)
