"""The daemon's configuration: a TOML file (tomlkit) over built-in defaults, plus conventions.

Roots come from two places: paths written in the file (``~``, ``~user`` and glob forms) and
the cache conventions of the users the daemon protects (``HF_HOME``, ``HF_HUB_CACHE``,
``HF_MODULES_CACHE``, ``TORCH_HOME``, ``KERAS_HOME``, ``OLLAMA_MODELS``, ``XDG_CACHE_HOME``,
...). For the user the daemon runs as, the environment decides; for other users the
environment of *their* sessions is unknowable, so the documented defaults under their home
are used. Every root is canonicalised with ``realpath`` (a symlinked root sees no new
subdirectories unless its target is watched).

Validation is total: `load()` either returns a usable `Config` or raises `ConfigError` with
the key and the reason, so SIGHUP can keep the old config when the new one is wrong.
"""

from __future__ import annotations

import copy
import glob
import os
import pwd
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelscan_core.model import Severity

#: where `run`/`scan`/`check-config` look when --config is not given (absent = defaults)
SYSTEM_CONFIG = "/etc/modelscand/modelscand.toml"

MODES = ("detect", "quarantine")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


def default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/modelscand"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "modelscand")


def defaults() -> dict[str, Any]:
    return {
        "watch": {
            "roots": [],
            "conventions": True,
            "users": [],
            "include": [],
            "exclude": ["CACHEDIR.TAG"],
            "reconcile_interval": 3600,
            "root_retry_interval": 10.0,
            "queue_size": 20000,
            "settle_time": 0.5,
            "busy_recheck": 2.0,
            "busy_max_wait": 300.0,
            "stale_temp_after": 600.0,
        },
        "scan": {
            "mode": "detect",
            "severity_threshold": "medium",
            "report_code": True,
            "code_severity": "medium",
            "workers": 2,
            "timeout": 120.0,
            "hash_timeout": 30.0,
            "memory_limit_mb": 4096,
            "settings_file": "",
        },
        "quarantine": {
            "dir": "",
            "filesystem_dirs": [],
            "per_filesystem": True,
            "tombstones": True,
            "fail_closed": False,
            "hook": [],
            "hook_timeout": 10.0,
            "retention_days": 90,
            "ledger_rotate_mb": 64,
        },
        "state": {"dir": ""},
        "log": {"format": "json", "level": "info"},
        "daemon": {"drain_timeout": 20.0},
    }


@dataclass(frozen=True)
class Root:
    """One watched directory: as configured, and its canonical path (what is watched)."""

    path: str  # realpath, or the expanded path when it does not exist yet
    configured: str
    kind: str  # generic | hf_hub | hf_modules | torch | keras | ollama | ...
    origin: str  # "config" or "convention:<user>:<VAR>"
    pattern: str | None = None  # glob this came from, if any
    refused: str | None = None  # why it is not watched (a user's link into someone else's directory)

    def exists(self) -> bool:
        return os.path.isdir(self.path) or os.path.isfile(self.path)


@dataclass
class Config:
    data: dict[str, Any] = field(default_factory=defaults)
    source: str | None = None  # file it was read from

    # -- typed views ------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.data["scan"]["mode"]

    @property
    def threshold(self) -> Severity:
        return Severity.parse(self.data["scan"]["severity_threshold"])

    @property
    def code_severity(self) -> Severity:
        return Severity.parse(self.data["scan"]["code_severity"])

    @property
    def state_dir(self) -> str:
        return os.path.expanduser(self.data["state"]["dir"] or default_state_dir())

    @property
    def quarantine_dir(self) -> str:
        return os.path.expanduser(self.data["quarantine"]["dir"] or os.path.join(self.state_dir, "quarantine"))

    @property
    def watch(self) -> dict[str, Any]:
        return self.data["watch"]

    @property
    def scan(self) -> dict[str, Any]:
        return self.data["scan"]

    def scanner_settings(self):
        from modelscan_core.settings import Settings, SettingsError

        path = self.data["scan"]["settings_file"]
        try:
            return Settings.load(os.path.expanduser(path) if path else None)
        except SettingsError as exc:
            raise ConfigError(f"scan.settings_file: {exc}") from None

    def with_overrides(self, *, roots: list[str] | None = None, state_dir: str | None = None, mode: str | None = None) -> "Config":
        """--root replaces the configured roots and switches conventions off."""
        data = copy.deepcopy(self.data)
        if roots:
            data["watch"]["roots"] = [os.path.abspath(os.path.expanduser(r)) for r in roots]
            data["watch"]["conventions"] = False
        if state_dir:
            data["state"]["dir"] = os.path.abspath(state_dir)
        if mode:
            data["scan"]["mode"] = mode
        cfg = Config(data, self.source)
        cfg.validate()
        return cfg

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        d = self.data
        w, s = d["watch"], d["scan"]
        _list_of_str(w, "watch", "roots")
        _list_of_str(w, "watch", "users")
        _list_of_str(w, "watch", "include")
        _list_of_str(w, "watch", "exclude")
        for user in w["users"]:
            try:
                pwd.getpwnam(user)
            except KeyError:
                raise ConfigError(f"watch.users: no such user {user!r}") from None
        if not isinstance(w["conventions"], bool):
            raise ConfigError("watch.conventions must be true or false")
        for key in ("reconcile_interval", "root_retry_interval", "settle_time", "busy_recheck", "busy_max_wait",
                    "stale_temp_after"):
            _number(w, "watch", key, minimum=0)
        if w["root_retry_interval"] <= 0 or w["busy_recheck"] <= 0:
            raise ConfigError("watch.root_retry_interval and watch.busy_recheck must be > 0")
        _int(w, "watch", "queue_size", minimum=16)
        if s["mode"] not in MODES:
            raise ConfigError(f"scan.mode must be one of {', '.join(MODES)}, not {s['mode']!r}")
        for key in ("severity_threshold", "code_severity"):
            try:
                Severity.parse(str(s[key]))
            except ValueError as exc:
                raise ConfigError(f"scan.{key}: {exc}") from None
        if not isinstance(s["report_code"], bool):
            raise ConfigError("scan.report_code must be true or false")
        _int(s, "scan", "workers", minimum=1)
        _number(s, "scan", "timeout", minimum=0.1)
        _number(s, "scan", "hash_timeout", minimum=0)
        _int(s, "scan", "memory_limit_mb", minimum=0)
        if not isinstance(s["settings_file"], str):
            raise ConfigError("scan.settings_file must be a path string")
        for section in ("quarantine", "state"):
            if not isinstance(d[section]["dir"], str):
                raise ConfigError(f"{section}.dir must be a path string")
        _quarantine(d["quarantine"])
        if d["log"]["format"] not in LOG_FORMATS:
            raise ConfigError(f"log.format must be one of {', '.join(LOG_FORMATS)}")
        if str(d["log"]["level"]).lower() not in LOG_LEVELS:
            raise ConfigError(f"log.level must be one of {', '.join(LOG_LEVELS)}")
        _number(d["daemon"], "daemon", "drain_timeout", minimum=0)
        self.scanner_settings()

    # -- roots ----------------------------------------------------------------------------
    def roots(self) -> list[Root]:
        """Every root to watch, realpath'd, nested duplicates removed (outermost wins)."""
        found: list[Root] = []
        for entry in self.data["watch"]["roots"]:
            expanded = os.path.expanduser(os.path.expandvars(entry))
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                for m in matches:
                    if os.path.isdir(m):
                        found.append(Root(*canonical_root(m), m, classify_root(m), "config", pattern=entry))
                if not matches:
                    found.append(Root(expanded, entry, "generic", "config", pattern=entry))
            else:
                found.append(_root(expanded, entry, classify_root(expanded), "config"))
        if self.data["watch"]["conventions"]:
            for user in self.users():
                for var, path, kind in convention_dirs(user):
                    found.append(_root(path, path, kind, f"convention:{user.pw_name}:{var}"))
        return dedupe_roots(found)

    def users(self) -> list[pwd.struct_passwd]:
        names = self.data["watch"]["users"]
        if not names:
            try:
                return [pwd.getpwuid(os.geteuid())]
            except KeyError:  # no passwd entry (containers): still protect $HOME
                home = os.path.expanduser("~")
                return [pwd.struct_passwd(("?", "x", os.geteuid(), os.getegid(), "", home, ""))]
        return [pwd.getpwnam(n) for n in names]


def _root(path: str, configured: str, kind: str, origin: str) -> Root:
    real, refused = canonical_root(path)
    return Root(real, configured, kind, origin, refused=refused)


def canonical_root(path: str) -> tuple[str, str | None]:
    """(realpath of `path`, why it must not be watched or None).

    A root runs as root over what it names, so where it leads is only as trusted as the
    links on the way: a link owned by a user (``~/.cache/huggingface/hub -> ...``, or one
    made later by swapping the directory) may lead only to a directory that user owns.
    Otherwise the user could point the daemon at another user's files, to be read, logged
    and moved (the kernel's protected_symlinks rule, for a daemon that follows links once,
    at set-up). Links owned by root (or us) are the operator's: followed as they are."""
    real, owners = _resolve(os.path.abspath(path))
    users = sorted({uid for uid, _link in owners if uid not in (0, os.geteuid())})
    if not users:
        return real, None
    try:
        owner = os.stat(real).st_uid
    except OSError:
        return real, None  # not there yet: judged again when it appears
    if any(uid != owner for uid in users):
        link = next(link for uid, link in owners if uid != owner and uid not in (0, os.geteuid()))
        return real, (f"{link} is a link owned by uid {users[0]} that leads to {real}, owned by uid {owner}: "
                      f"a user's link may lead only to that user's own directory")
    return real, None


def _resolve(path: str) -> tuple[str, list[tuple[int, str]]]:
    """realpath, and (owner uid, link path) of every symlink followed on the way."""
    owners: list[tuple[int, str]] = []
    todo = [p for p in path.split(os.sep) if p][::-1]
    cur, hops = os.sep, 0
    while todo:
        part = todo.pop()
        if part == ".":
            continue
        if part == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, part)
        try:
            st = os.lstat(nxt)
        except OSError:
            return os.path.join(nxt, *todo[::-1]), owners  # the rest does not exist (yet)
        if not stat.S_ISLNK(st.st_mode):
            cur = nxt
            continue
        hops += 1
        if hops > 40:
            return os.path.realpath(path), owners
        owners.append((st.st_uid, nxt))
        target = os.readlink(nxt)
        if os.path.isabs(target):
            cur = os.sep
        todo.extend([p for p in target.split(os.sep) if p][::-1])
    return cur, owners


def convention_dirs(user: pwd.struct_passwd) -> list[tuple[str, str, str]]:
    """(variable, directory, kind) for one user's model caches."""
    own = user.pw_uid == os.geteuid()
    env = os.environ if own else {}
    home = os.path.expanduser("~") if own else user.pw_dir

    def get(var: str, default: str) -> str:
        return os.path.expanduser(env.get(var) or default)

    xdg = get("XDG_CACHE_HOME", os.path.join(home, ".cache"))
    hf_home = get("HF_HOME", os.path.join(xdg, "huggingface"))
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(hf_home, "hub")
    torch_home = get("TORCH_HOME", os.path.join(xdg, "torch"))
    return [
        ("HF_HUB_CACHE", os.path.expanduser(hub), "hf_hub"),
        ("HF_MODULES_CACHE", get("HF_MODULES_CACHE", os.path.join(hf_home, "modules")), "hf_modules"),
        ("TORCH_HOME", os.path.join(torch_home, "hub"), "torch"),
        ("KERAS_HOME", get("KERAS_HOME", os.path.join(home, ".keras")), "keras"),
        ("OLLAMA_MODELS", get("OLLAMA_MODELS", os.path.join(home, ".ollama", "models")), "ollama"),
        ("MODELSCOPE_CACHE", get("MODELSCOPE_CACHE", os.path.join(xdg, "modelscope")), "modelscope"),
        ("KAGGLEHUB_CACHE", get("KAGGLEHUB_CACHE", os.path.join(xdg, "kagglehub")), "kagglehub"),
        ("LLAMA_CACHE", get("LLAMA_CACHE", os.path.join(xdg, "llama.cpp")), "llama_cpp"),
        ("VLLM_CACHE_ROOT", get("VLLM_CACHE_ROOT", os.path.join(xdg, "vllm")), "vllm"),
    ]


def classify_root(path: str) -> str:
    parts = Path(path).parts
    if "modules" in parts[-1:] and "huggingface" in parts:
        return "hf_modules"
    if parts[-1:] == ("hub",) and "huggingface" in parts:
        return "hf_hub"
    if "torch" in parts:
        return "torch"
    return "generic"


def dedupe_roots(roots: list[Root]) -> list[Root]:
    out: list[Root] = []
    # a refused root shadows nothing (it is not watched), and is dropped where a root that is
    # watched covers its path anyway
    for root in sorted(roots, key=lambda r: (r.refused is not None, len(r.path), r.path)):
        if any(root.path == o.path or root.path.startswith(o.path.rstrip("/") + "/") for o in out):
            continue
        out.append(root)
    return out


def load(path: str | None = None) -> Config:
    """Read `path` (or the system config if it exists, or nothing) over the defaults."""
    from modelscan_core.settings import SettingsError, read_toml

    if path is None and os.path.exists(SYSTEM_CONFIG):
        path = SYSTEM_CONFIG
    data = defaults()
    if path is not None:
        try:
            user = read_toml(path, "config")
        except SettingsError as exc:
            raise ConfigError(str(exc)) from None
        _merge(data, user, "")
    cfg = Config(data, path)
    cfg.validate()
    return cfg


def _merge(base: dict[str, Any], over: dict[str, Any], prefix: str) -> None:
    for key, value in over.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown key {name!r}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a table")
            _merge(base[key], value, name + ".")
        else:
            base[key] = value


def _quarantine(q: dict) -> None:
    _list_of_str(q, "quarantine", "filesystem_dirs")
    for path in q["filesystem_dirs"]:
        if not os.path.isabs(os.path.expanduser(path)):
            raise ConfigError(f"quarantine.filesystem_dirs: {path!r} is not an absolute path")
    for key in ("per_filesystem", "tombstones", "fail_closed"):
        if not isinstance(q[key], bool):
            raise ConfigError(f"quarantine.{key} must be true or false")
    _list_of_str(q, "quarantine", "hook")
    if q["hook"] and not os.path.isabs(q["hook"][0]):
        raise ConfigError(f"quarantine.hook: the program {q['hook'][0]!r} must be an absolute path (no shell, no PATH)")
    _number(q, "quarantine", "hook_timeout", minimum=0.1)
    _number(q, "quarantine", "retention_days", minimum=0)
    _number(q, "quarantine", "ledger_rotate_mb", minimum=0.001)


def _list_of_str(table: dict, section: str, key: str) -> None:
    value = table[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{section}.{key} must be a list of strings")


def _number(table: dict, section: str, key: str, minimum: float) -> None:
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"{section}.{key} must be a number >= {minimum}")


def _int(table: dict, section: str, key: str, minimum: int) -> None:
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{section}.{key} must be an integer >= {minimum}")
