"""Decide what a byte stream is from its content; the file name is only a hint.

The rules are not written here: each scanner module declares the rules of the formats it
reads (`FORMATS` in the module, see `scanners/__init__.py`), and this module tries them in
order of `Rule.priority`. A pickle named `.txt`, `.BIN` or with no name at all (a Hugging
Face blob) is a pickle, whatever its name says.

One stream can be several formats at once (a safetensors header followed by a pickle, a zip
whose first bytes are a pickle): `detect_all` returns every format that claims the stream, one
per `Rule.family` (the structure a rule reads the bytes as, so a `.keras` zip is not also a
plain zip); `detect` returns the first of them, which is what the engine scans today.
"""

from __future__ import annotations

import importlib
import io
import os
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

HEAD = 64 * 1024

Sniff = Callable[[bytes, str, BinaryIO], bool]


@dataclass(frozen=True)
class Rule:
    """One test that says "these bytes are format X". Lower `priority` runs first.

    `magics`: the head starts with one of these (empty: no magic test). `sniff` (optional)
    looks further: `(head, lower-cased name, stream) -> bool`, a callable or a
    "module:function" string imported only when a file reaches the rule, so the CLI never
    imports a format's code for files of other formats. `family` is the structure the rule
    reads (zip, pickle, tar, ...): rules of one family exclude each other, rules of different
    families may all claim one stream. `format` is filled in by the registry from the
    declaring `Format`.
    """

    priority: int
    magics: tuple[bytes, ...] = ()
    sniff: Sniff | str | None = None
    family: str = ""
    format: str = ""

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


def rules() -> tuple[Rule, ...]:
    """Every declared rule, in the order they are tried."""
    from modelscan_core.scanners import registry

    return registry().rules


def detect_all(head: bytes, name: str, stream: BinaryIO | None = None) -> Iterator[str]:
    """Every format that claims the stream, best first, at most one per rule family.

    Lazy: a caller that takes only the first answer runs only the rules before it.
    """
    lowered = os.path.basename(name).lower()
    if stream is None:
        stream = io.BytesIO(head)
    claimed: set[str] = set()
    for rule in rules():
        family = rule.family or rule.format
        if family in claimed:
            continue
        if rule.matches(head, lowered, stream):
            claimed.add(family)
            yield rule.format


def detect(head: bytes, name: str, stream: BinaryIO | None = None) -> str | None:
    """The format of a stream whose first bytes are `head`, or None when no rule matches."""
    return next(detect_all(head, name, stream), None)


def claims_model_format(name: str) -> bool:
    """The name's extension is one a format declares as its own (`.pkl`, `.gguf`, ...): such a
    file that matches no rule is an error ("could not read"), not a skip."""
    from modelscan_core.scanners import registry

    return os.path.splitext(name.lower())[1] in registry().claimed_extensions
