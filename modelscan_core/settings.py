"""Settings: the defaults, a TOML file merged over them, and the commented file we write.

modelscan's keys keep working (`scanners.<name>.enabled`, `unsafe_globals`,
`unsafe_tf_operators`, `unsafe_keras_operators`, `reporting.module`), and ours sit beside them.
Unlike modelscan, a settings file is read only when it is named on the command line, and it
is merged over the defaults: a file that adds one entry does not drop all the others.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from modelscan_core._version import __version__
from modelscan_core.model import Limits, Severity
from modelscan_core.scanners.pickle import lists

_ATOMS = (str, int, float, bool, type(None))


def _copy(value: Any) -> Any:
    """A deep copy of settings data (tables, lists, strings, numbers) at a fraction of what
    copy.deepcopy costs: every run copies the default name lists. Other types go to deepcopy."""
    if isinstance(value, dict):
        return {k: v if type(v) in _ATOMS else _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [v if type(v) in _ATOMS else _copy(v) for v in value]
    return value if type(value) in _ATOMS else copy.deepcopy(value)


def scanner_defaults() -> dict[str, Any]:
    """`scanners.<table>` defaults, as each scanner module declares them (`SETTINGS`)."""
    from modelscan_core.scanners import registry

    return {entry.table: _copy(dict(entry.defaults)) for entry in registry().settings.values()}


def _tables(key: str) -> tuple[str, ...]:
    """The settings tables a scanner key answers to: its declared table, and the key itself."""
    from modelscan_core.scanners import registry

    entry = registry().settings.get(key)
    return (entry.table, key) if entry is not None and entry.table != key else (key,)


def default_settings() -> dict[str, Any]:
    return {
        "modelscan_version": __version__,
        "supported_zip_extensions": [".zip", ".npz"],
        "scanners": scanner_defaults(),
        "unsafe_globals": _copy(lists.UNSAFE_GLOBALS),
        "safe_globals": _copy(lists.SAFE_GLOBALS),
        "ecosystem_packages": list(lists.ECOSYSTEM_PACKAGES),
        "unknown_globals": {
            "call": "HIGH",
            "class_call": "MEDIUM",
            "new": "LOW",
            "reference": "LOW",
            "unresolved": "HIGH",
            "dynamic_call": "HIGH",
            "call_before_error": "MEDIUM",
            "suspicious_args": "HIGH",
            "mutation": "HIGH",
            "blind": "HIGH",
        },
        "limits": {
            "max_depth": Limits.max_depth,
            "max_members": Limits.max_members,
            "max_total_bytes": Limits.max_total_bytes,
            "max_ratio": Limits.max_ratio,
            "ratio_after_bytes": Limits.ratio_after_bytes,
            "max_memo_values": Limits.max_memo_values,
        },
        "reporting": {"module": "modelscan_core.reports.console", "settings": {}},
    }


class SettingsError(ValueError):
    """A settings file that cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class Settings:
    """The effective settings: defaults with the user's file merged over them."""

    data: dict[str, Any] = field(default_factory=default_settings)
    user_unsafe_globals: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None) -> "Settings":
        if path is None:
            return cls()
        return cls.from_dict(read_toml(path, "settings file"))

    @classmethod
    def from_dict(cls, user: dict[str, Any]) -> "Settings":
        data = default_settings()
        check_keys(user, data)
        _merge(data, user)
        settings = cls(data=data, user_unsafe_globals=copy.deepcopy(user.get("unsafe_globals") or {}))
        settings.validate()
        return settings

    def validate(self) -> None:
        for level, modules in self.data["unsafe_globals"].items():
            if level not in Severity.__members__:
                raise SettingsError(f"unsafe_globals: unknown severity {level!r}")
            if not isinstance(modules, dict):
                raise SettingsError(f"unsafe_globals.{level} must be a table of module = names")
            for module, names in modules.items():
                if names != "*" and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                    raise SettingsError(f"unsafe_globals.{level}.{module} must be \"*\" or a list of names")
        for key, value in self.data["unknown_globals"].items():
            try:
                Severity.parse(str(value))
            except ValueError as exc:
                raise SettingsError(f"unknown_globals.{key}: {exc}") from None
        for key, value in self.data["limits"].items():
            if not isinstance(value, int) or value <= 0:
                raise SettingsError(f"limits.{key} must be a positive integer")

    # -- views used by scanners -----------------------------------------------------

    def scanner_enabled(self, key: str) -> bool:
        """False when any table the key answers to says `enabled = false`."""
        scanners = self.data["scanners"]
        return all(bool(scanners.get(table, {}).get("enabled", True)) for table in _tables(key))

    def scanner_option(self, key: str, option: str, default: Any = None) -> Any:
        for table in _tables(key):
            entry = self.data["scanners"].get(table, {})
            if option in entry:
                return entry[option]
        return default

    @cached_property
    def limits(self) -> Limits:
        return Limits(**{k: v for k, v in self.data["limits"].items() if k in Limits.__dataclass_fields__})

    @cached_property
    def pickle_policy(self):
        from modelscan_core.scanners.pickle.policy import Policy, UnknownSeverities

        unknown = UnknownSeverities(**{k: Severity.parse(str(v)) for k, v in self.data["unknown_globals"].items()})
        unsafe = _copy(self.data["unsafe_globals"])
        # An entry the user wrote decides that name, whatever level the defaults gave it.
        for level, modules in self.user_unsafe_globals.items():
            for module, names in (modules or {}).items():
                for other in unsafe:
                    if other != level and module in unsafe[other]:
                        if names == "*" or unsafe[other][module] == "*":
                            if names == "*":
                                del unsafe[other][module]
                        else:
                            unsafe[other][module] = [n for n in unsafe[other][module] if n not in names]
                unsafe.setdefault(level, {})[module] = names
        return Policy(unsafe, self.data["safe_globals"], tuple(self.data["ecosystem_packages"]), unknown,
                      reasons=lists.SAFE_REASONS)


#: modelscan 0.8.8's settings files carry these; they mean nothing here and are accepted as is
_IGNORED = {"middlewares"}
#: tables whose keys are the user's own (module names, a custom reporter's options)
_FREE = {"unsafe_globals", "safe_globals", ("reporting", "settings")}


def check_keys(user: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse a key the scanner does not know, naming it: a typo (`unsafe_global`, `limts`,
    `max_memo_value`) would otherwise be merged in silently and change nothing."""
    if not isinstance(user, dict):
        raise SettingsError("a settings file is a TOML table")
    for key, value in user.items():
        if key in _IGNORED:
            continue
        if key not in defaults:
            raise SettingsError(f"unknown setting {key!r}{_did_you_mean(key, defaults)}")
        if key in _FREE or not isinstance(defaults[key], dict):
            continue
        if not isinstance(value, dict):
            raise SettingsError(f"{key} must be a table")
        if key == "scanners":
            _check_scanner_tables(value)
            continue
        for sub, sub_value in value.items():
            if (key, sub) in _FREE:
                continue
            if sub not in defaults[key]:
                raise SettingsError(f"unknown setting {key}.{sub}{_did_you_mean(sub, defaults[key])}")


def _check_scanner_tables(tables: dict[str, Any]) -> None:
    from modelscan_core.scanners import registry

    entries = registry().settings.values()
    known = {entry.table for entry in entries} | {entry.key for entry in entries}
    # an option declared by one scanner may be read by its siblings (the Keras scanners read
    # the SavedModel scanner's unsafe_keras_operators from their own tables too)
    options_known = {"enabled", "supported_extensions"}.union(*(entry.defaults for entry in entries))
    for table, options in tables.items():
        if table not in known:
            raise SettingsError(f"unknown scanner table scanners.{table!r}{_did_you_mean(table, known)}")
        if not isinstance(options, dict):
            raise SettingsError(f"scanners.{table!r} must be a table")
        for option in options:
            if option not in options_known:
                raise SettingsError(f"unknown setting scanners.{table!r}.{option}{_did_you_mean(option, options_known)}")


def _did_you_mean(key: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(str(key), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as plain dicts; unreadable or invalid files raise SettingsError naming `what`."""
    import tomlkit

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return tomlkit.parse(text).unwrap()
    except Exception as exc:  # tomlkit raises several types for bad TOML
        raise SettingsError(f"{what} {path} is not valid TOML: {exc}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    """Merge `over` into `base`: tables recursively, lists of names as a union, the rest replaced."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        elif isinstance(value, list) and isinstance(base.get(key), list) and key not in ("supported_extensions",):
            base[key] = list(dict.fromkeys(list(base[key]) + list(value)))
        else:
            base[key] = copy.deepcopy(value)


def settings_toml() -> str:
    """The default settings as a commented TOML document (`create-settings-file`)."""
    import tomlkit

    data = default_settings()
    doc = tomlkit.document()
    doc.add(tomlkit.comment("modelscan settings. Every key is optional: this file is merged over the built-in"))
    doc.add(tomlkit.comment("defaults, so keep only what you change. Pass it with --settings-file; it is never"))
    doc.add(tomlkit.comment("read from the current directory by itself."))
    doc.add(tomlkit.nl())
    doc.add("modelscan_version", data["modelscan_version"])
    doc.add(tomlkit.comment("Extensions of generic zip archives (content decides; this is only a hint)."))
    doc.add("supported_zip_extensions", data["supported_zip_extensions"])
    doc.add(tomlkit.nl())
    comments = {
        "scanners": "Per scanner: enabled switches it off; supported_extensions are hints (content decides).",
        "unsafe_globals": "Denylist: severity -> module -> [names] or \"*\" (module and submodules).\n"
        "An entry you write here decides that name, whatever level the defaults gave it.",
        "safe_globals": "Allowlist of reconstruction globals: module -> [names] or \"*\".",
        "ecosystem_packages": "Packages whose classes and pickle helpers (_rebuild_*, _unpickle*, ...) are trusted.",
        "unknown_globals": "Severity for names on neither list, by how the pickle uses them:\n"
        "call (a function is called), class_call (a class is constructed with arguments),\n"
        "new (instantiated without __init__), reference (only imported), unresolved (a name\n"
        "computed at load time), dynamic_call (a value built at load time is called),\n"
        "call_before_error (the stream breaks after calls were made), suspicious_args (a class\n"
        "is constructed with an argument that reads as code, a command, a path or a URL),\n"
        "mutation (the pickle rewrites a class, function, module or registry it imported),\n"
        "blind (a value the scanner could not keep is used where it matters).",
        "limits": "Bounds against hostile files: nesting depth, archive members, decompressed bytes,\n"
        "compression ratio, pickle memo entries kept with their values.",
        "reporting": "Report module for -r custom: a module with a `render(report, settings) -> str`.",
    }
    for key in ("scanners", "unsafe_globals", "safe_globals", "ecosystem_packages", "unknown_globals", "limits", "reporting"):
        doc.add(tomlkit.nl())
        for line in comments[key].splitlines():
            doc.add(tomlkit.comment(line))
        doc.add(key, data[key])
    return tomlkit.dumps(doc)
