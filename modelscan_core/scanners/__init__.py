"""One scanner per format, and the registry that finds them.

Each scanner module declares what it reads, next to the code that reads it:

    FORMATS = (Format("gguf", "GgufScanner", settings="gguf", rules=(Rule(priority=..., ...),),
                      extensions=(".gguf",)),)
    SETTINGS = (ScannerSettings("gguf", "modelscan.scanners.GgufScan", {"enabled": True, ...}),)

`detect.py` tries every declared rule by priority, the engine asks `scanner_for(format)`,
and `settings.py` builds its defaults from the declared `SETTINGS`. Adding a format is adding
one module and naming it in `MODULES`.

Declaring modules are imported when the registry is first needed, so they import nothing
heavy at module level (h5py, protobuf, jinja2, yaml, lz4, py7zr are imported inside the
functions that use them): `modelscan -p small.pkl` never pays for them.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

from modelscan_core.detect import Rule
from modelscan_core.scanners.interface import Scanner

#: the modules that declare formats, in the order their settings tables are written
MODULES = (
    "modelscan_core.scanners.pickle",
    "modelscan_core.scanners.torch",
    "modelscan_core.scanners.numpy",
    "modelscan_core.scanners.keras_h5",
    "modelscan_core.scanners.keras_v3",
    "modelscan_core.scanners.savedmodel",
    "modelscan_core.scanners.archives",
    "modelscan_core.scanners.gguf",
    "modelscan_core.scanners.safetensors",
    "modelscan_core.scanners.onnx",
    "modelscan_core.scanners.nemo",
)


# The declarations are NamedTuples, not frozen dataclasses: every run imports every declaring
# module, and a NamedTuple class is made for a tenth of what a dataclass costs at start-up.


class Format(NamedTuple):
    """One format: how detection recognises it and which scanner reads it.

    `scanner` is a class name in the declaring module or a "module:Class" path, imported
    when a file of the format turns up. `settings` is the key of the `ScannerSettings` that
    switches it on and off. A format with no `rules` is reached only when a container names
    it (`format_hint`), e.g. the records of torch's legacy tar. `extensions` claim the
    format: a file so named that matches no rule is an error, not a skip.
    """

    name: str
    scanner: str
    settings: str
    rules: tuple[Rule, ...] = ()
    extensions: tuple[str, ...] = ()


class ScannerSettings(NamedTuple):
    """A scanner's table in the settings file: `scanners."<table>"` with its `defaults`.

    `table` keeps modelscan's names (`modelscan.scanners.PickleUnsafeOpScan`) so old settings
    files still switch scanners on and off; the short `key` is what code asks for, and a
    table named by the key itself (`[scanners.archives]`) works too.
    """

    key: str
    table: str
    defaults: Mapping[str, Any] = MappingProxyType({"enabled": True})  # read-only: shared by all


class Registry(NamedTuple):
    formats: Mapping[str, tuple[Format, str]]  # format name -> (declaration, declaring module)
    settings: Mapping[str, ScannerSettings]  # key -> settings, in declaration order
    rules: tuple[Rule, ...]  # bound to their format, sorted by priority
    claimed_extensions: frozenset[str]


class RegistryError(RuntimeError):
    """Two declarations contradict each other: a bug in a scanner module, found at start-up."""


@lru_cache(maxsize=1)
def registry() -> Registry:
    formats: dict[str, tuple[Format, str]] = {}
    settings: dict[str, ScannerSettings] = {}
    bound: list[tuple[int, int, Rule]] = []
    extensions: set[str] = set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for entry in getattr(module, "SETTINGS", ()):
            if entry.key in settings:
                raise RegistryError(f"settings key {entry.key!r} declared twice ({module_name})")
            settings[entry.key] = entry
        for fmt in getattr(module, "FORMATS", ()):
            if fmt.name in formats:
                raise RegistryError(f"format {fmt.name!r} declared twice ({module_name})")
            formats[fmt.name] = (fmt, module_name)
            extensions.update(ext.lower() for ext in fmt.extensions)
            for rule in fmt.rules:
                bound.append((rule.priority, len(bound), replace(rule, format=fmt.name)))
    for fmt, module_name in formats.values():
        if fmt.settings not in settings:
            raise RegistryError(f"format {fmt.name!r} ({module_name}) names undeclared settings {fmt.settings!r}")
    priorities = [p for p, _, _ in bound]
    if len(set(priorities)) != len(priorities):
        clash = sorted({p for p in priorities if priorities.count(p) > 1})
        raise RegistryError(f"rule priorities used twice: {clash} (detection order must not depend on import order)")
    rules = tuple(rule for _, _, rule in sorted(bound, key=lambda t: (t[0], t[1])))
    return Registry(formats, settings, rules, frozenset(extensions))


_instances: dict[type, Scanner] = {}


def scanner_class(format_name: str) -> type[Scanner] | None:
    """The class that reads a format (imports its module), or None for an unknown format."""
    entry = registry().formats.get(format_name)
    if entry is None:
        return None
    fmt, declared_in = entry
    module_name, _, class_name = fmt.scanner.rpartition(":")
    return getattr(importlib.import_module(module_name or declared_in), class_name)


def scanner_for(format_name: str) -> tuple[str, Scanner] | None:
    """The settings key and scanner instance for a format, or None if none reads it.
    One instance per class, whatever number of formats it serves."""
    cls = scanner_class(format_name)
    if cls is None:
        return None
    if cls not in _instances:
        _instances[cls] = cls()
    return registry().formats[format_name][0].settings, _instances[cls]
