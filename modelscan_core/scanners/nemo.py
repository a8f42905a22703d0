"""NVIDIA NeMo checkpoints (`.nemo`): a tar (plain or gzip) of YAML configs and torch checkpoints.

`restore_from` extracts the tar, loads `model_config.yaml` with OmegaConf and builds the
model from it: every mapping with a Hydra `_target_` (at any depth: preprocessor, encoder,
optimizer, ...) is `hydra.utils.instantiate`d, which imports the dotted path and calls it with
the mapping's other keys (`_args_` positionally; `_partial_` wraps it, `_call_: false` still
imports it). NeMo's own `target`/`cls` with `params` do the same, and `from_config_dict`
imports a bare `target` of any sub-config it builds and calls it with `cfg=`. So a target is
code the file chooses (CVE-2025-23304). Judged like NeMo's own allowlist (since the fix):
a callable the pickle policy denylists (`builtins.exec`, `os.system`, `torch.load`, ...) is
CRITICAL; outside the prefixes NeMo allows (its own packages, `torch.nn`/`optim`/`utils.data`,
torchmetrics, Lightning's callbacks/loggers/strategies, OmegaConf, Megatron) HIGH; inside
them, a private name or a function named for reading, writing or running (`torch.save`,
`OmegaConf.save`) HIGH. An OmegaConf interpolation (`${a.b}`) is judged by what it resolves to
in the same config, HIGH when it cannot be resolved; a string that OmegaConf turns into a
config when it reads it (`${oc.create:...}`, `${oc.decode:...}`) is walked like the config it
makes.

NeMo 2 checkpoints hold their config as `context/io.json`, fiddle's JSON: `load_context`
rebuilds it with `fdl.build`, importing every python reference (`{"type": "pyref", "module",
"name"}`) and calling each Buildable's `fn_or_cls` with its arguments. References the pickle
policy denylists are reported at its severity; a called one outside the packages NeMo
contexts name is HIGH, a value there MEDIUM.

YAML is read with `yaml.safe_load` only (OmegaConf's loader is a SafeLoader too); config
members stored as tar links are read through the link, as extraction copies them. The tar's
members (the torch checkpoints, the tokenizer files) are scanned by the tar scanner like any
archive's.
"""

from __future__ import annotations

import re
from typing import Any, BinaryIO, Iterator

from modelscan_core.detect import Rule
from modelscan_core.model import Severity
from modelscan_core.scanners import Format, ScannerSettings
from modelscan_core.scanners.interface import Item, ScanContext, ScanFailed, Scanner

CONFIG_NAME = "model_config.yaml"
#: where NeMo's own allowlist (nemo.core.classes.common, since CVE-2025-23304) lets targets come
#: from; `pytorch_lightning.` is Lightning's older name for the same classes
ALLOWED_PREFIXES = (
    "nemo.", "nemo_text_processing.", "torch.nn.", "torch.optim.", "torch.utils.data.", "torch.distributed.fsdp.",
    "torchmetrics.", "lightning.pytorch.callbacks.", "lightning.pytorch.loggers.", "lightning.pytorch.strategies.",
    "lightning.pytorch.accelerators.", "pytorch_lightning.callbacks.", "pytorch_lightning.loggers.",
    "pytorch_lightning.strategies.", "pytorch_lightning.accelerators.", "omegaconf.", "megatron.",
)
#: words in the name of a function that reads, writes or runs something (`torch_load`, `save_to`,
#: `maybe_download_from_cloud`, `import_class_by_path`)
_EFFECT_WORDS = frozenset({"load", "save", "dump", "write", "open", "run", "exec", "spawn", "system", "call", "popen",
                           "download", "upload", "remove", "rmtree", "unlink", "delete", "import", "instantiate",
                           "restore", "pretrained", "subprocess", "shell", "eval"})
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\}\Z")
MAX_YAML = 16 * 1024 * 1024
#: members looked at to recognise a NeMo tar: NeMo extracts every member and then reads the
#: config wherever it sits, so padding the tar with files before it must not hide it (a
#: header costs one 512-byte read; a tar is scanned member by member anyway)
SNIFF_MEMBERS = 100_000
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


def sniff_nemo(head: bytes, name: str, stream: BinaryIO) -> bool:
    from modelscan_core.sources import sniff

    if not sniff.tar(head, name, stream):
        return False
    import tarfile  # only for a tar: every file is asked, and tarfile costs a millisecond

    try:
        archive = tarfile.open(fileobj=stream, mode="r:")
        for i in range(SNIFF_MEMBERS):
            member = archive.next()
            if member is None:
                return False
            if member.name.rsplit("/", 1)[-1] == CONFIG_NAME:
                return True
            if i % 1024 == 1023:
                archive.members.clear()  # tarfile keeps every header it read; the walk needs none
    except (tarfile.TarError, EOFError, OSError):
        return False
    return False


def hydra_targets(doc: Any) -> Iterator[tuple[str, Any, str]]:
    """(path, target value, key) for every mapping a Hydra/NeMo loader instantiates.

    Anchors and aliases make a YAML document a graph; each mapping is visited once. A bare
    `target` below the root is given as key "target?": `from_config_dict` imports it only
    when it builds that sub-config, so its value counts only when it names code.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(doc, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, (dict, list)):
            if id(node) in seen:
                continue
            seen.add(id(node))
        if isinstance(node, dict):
            if "_target_" in node:
                yield path or "/", node["_target_"], "_target_"
            for key in ("target", "cls"):
                # NeMo's own form: `target:` at the root names the model class; with `params`, anywhere;
                # alone in a sub-config, from_config_dict still imports it
                if key in node and isinstance(node[key], str):
                    yield path or "/", node[key], key if (not path or "params" in node) else key + "?"
            for key, value in node.items():
                stack.append((value, f"{path}/{key}"))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                stack.append((value, f"{path}[{i}]"))
        elif isinstance(node, str) and "${" in node:
            # `${oc.create:{_target_: ...}}` / `${oc.decode:...}`: OmegaConf turns the string into a
            # config when it is read, and Hydra instantiates what it holds
            created = _created_config(node, doc)
            if created is not None:
                stack.append((created, f"{path}(created by interpolation)"))
            elif "_target_" in node:
                yield path or "/", node, "_target_"


_CREATING = re.compile(r"\$\{\s*oc\.(?:create|decode)\s*:\s*(.*)\}\s*\Z", re.S)


def _created_config(text: str, doc: Any, depth: int = 0) -> Any:
    """The mapping or list an `oc.create`/`oc.decode` interpolation makes of its argument (a
    literal, read as YAML: OmegaConf's grammar for these is YAML's flow style; or another node
    of the config, `${a.b}`), or None."""
    import yaml

    match = _CREATING.match(text.strip())
    if not match or depth > 8:
        return None
    arg = match.group(1).strip()
    if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "'\"":
        arg = arg[1:-1]
    resolved = _resolve(arg, doc)
    if resolved is not arg:
        value = resolved
    else:
        try:
            value = yaml.safe_load(arg)
        except (yaml.YAMLError, RecursionError):
            return None
    if isinstance(value, str):
        if "${" in value:
            return _created_config(value, doc, depth + 1)
        try:
            value = yaml.safe_load(value)  # oc.create of a string node holding YAML
        except (yaml.YAMLError, RecursionError):
            return None
    return value if isinstance(value, (dict, list)) else None


def judge_target(target: Any, policy, *, doc: Any = None, bare: bool = False) -> tuple[Severity, str] | None:
    """(severity, why) for a Hydra target, or None when it is a class NeMo's own allowlist accepts.

    `doc` resolves `${a.b}` interpolations; `bare` is a sub-config's `target` alone, which counts
    only when it names code (a denylisted callable, or a class outside the allowed prefixes).
    """
    from modelscan_core.scanners.pickle.values import CALLED

    resolved = _resolve(target, doc)
    if resolved is not target:
        verdict = judge_target(resolved, policy, bare=bare)
        return verdict and (verdict[0], f"resolves to {resolved!r}, which {verdict[1]}")
    if not isinstance(target, str) or not _DOTTED.match(target.strip()):
        if bare:
            return None
        return Severity.HIGH, "is not a plain dotted name (computed when the config is loaded)"
    target = target.strip()
    parts = target.split(".")
    private = [p for p in parts if p.startswith("_")]
    allowed_class = target.startswith(ALLOWED_PREFIXES) and parts[-1][:1].isupper() and not private
    # Hydra imports the longest importable prefix and walks the rest as attributes (so a module's
    # re-exports are reachable: `nemo.x.utils.subprocess.Popen`): try each split
    denied = None
    for i in range(1, len(parts)):
        judgement = policy.judge(".".join(parts[:i]), ".".join(parts[i:]), CALLED)
        if judgement.rule_id == "pickle/unsafe-global":
            if judgement.severity is not None and judgement.severity >= Severity.CRITICAL:
                return Severity.CRITICAL, f"is a denylisted callable ({judgement.matched or target})"
            denied = denied or judgement
    if len(parts) == 1:
        judgement = policy.judge("builtins", target, CALLED)
        if judgement.rule_id == "pickle/unsafe-global":
            return Severity.CRITICAL, f"is a denylisted builtin ({target})"
    if denied is not None and not allowed_class:
        # a class NeMo's allowlist names where the policy denies a whole package (torch.distributed) passes
        return Severity.CRITICAL, f"is a denylisted callable ({denied.matched or target})"
    if bare and not (len(parts) >= 2 and parts[-1][:1].isupper()):
        return None  # a value that happens to be dotted (`en.wav`), not a class path
    if not target.startswith(ALLOWED_PREFIXES):
        return Severity.HIGH, "lies outside the packages NeMo's own target allowlist accepts"
    if private:
        return Severity.HIGH, f"reaches the private name {private[0]!r}"
    if not parts[-1][:1].isupper() and _EFFECT_WORDS & set(parts[-1].lower().split("_")):
        return Severity.HIGH, f"is a function that reads, writes or runs something ({parts[-1]})"
    return None


def _resolve(value: Any, doc: Any) -> Any:
    """What a whole-value interpolation `${a.b.c}` names in the same config (OmegaConf resolves
    it before Hydra imports), or `value` itself."""
    seen = 0
    while isinstance(value, str) and doc is not None and seen < 16:
        match = _INTERPOLATION.match(value.strip())
        if not match:
            return value
        node = doc
        for part in match.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                return value
            node = node[part]
        value = node
        seen += 1
    return value


def analyse_config(text: bytes, where: str, ctx: ScanContext, *, offset: int | None = None) -> None:
    """Report the Hydra targets of one YAML document."""
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        ctx.error(f"{where} is not YAML the scanner can read: {str(exc).splitlines()[0]}")
        return
    except RecursionError:
        ctx.error(f"{where} nests too deeply to read", incomplete=True)
        return
    policy = ctx.settings.pickle_policy
    for path, target, key in hydra_targets(doc):
        bare = key.endswith("?")
        key = key.rstrip("?")
        verdict = judge_target(target, policy, doc=doc, bare=bare)
        if verdict is None:
            continue
        severity, why = verdict
        shown = target if isinstance(target, str) else repr(target)
        ctx.report(
            "nemo/hydra-target",
            severity,
            f"{where}: `{key}: {shown}` at {path} {why}; NeMo's restore_from imports and calls it (CVE-2025-23304)",
            module=shown.rsplit(".", 1)[0] if "." in shown else "",
            operator=shown.rsplit(".", 1)[-1],
            call=shown,
            offset=offset,
        )


class NemoScanner(Scanner):
    name = "modelscan.scanners.NemoScan"
    formats = ("nemo",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        import tarfile

        from modelscan_core.scanners.archives import TarScanner

        TarScanner().scan(item, ctx)  # every member, checkpoints included, as any tar's
        item.stream.seek(0)
        try:
            archive = tarfile.open(fileobj=item.stream, mode="r:")
            members = archive.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ScanFailed(f".nemo tar cannot be read: {exc}", "NESTED_ZIP") from None
        configs = [m for m in members if (m.isreg() or m.islnk() or m.issym())
                   and m.name.lower().endswith((".yaml", ".yml"))]
        if not any(m.name.rsplit("/", 1)[-1] == CONFIG_NAME for m in configs):
            ctx.error(f"no {CONFIG_NAME} member: NeMo cannot restore this file, and its config was not checked")
        for member in configs:
            target = _link_target(archive, member)
            if target is None:
                continue  # a link out of the archive (reported by the tar scan) or to nothing
            if target.size > MAX_YAML:
                ctx.error(f"{member.name}: {target.size} bytes of YAML, beyond the {MAX_YAML} read", incomplete=True)
                continue
            item.stream.seek(target.offset_data)
            data = item.stream.read(target.size)
            if len(data) < target.size:
                ctx.error(f"{member.name}: truncated")
            where = member.name if target is member else f"{member.name} (a link to {target.name})"
            analyse_config(data, where, ctx, offset=target.offset_data)


def _link_target(archive, member):
    """The regular member whose bytes extraction puts at `member`'s name (itself, or what a hard
    or symbolic link inside the archive names), or None."""
    for _ in range(32):
        if member.isreg():
            return member
        if not (member.islnk() or member.issym()):
            return None
        try:
            member = archive._find_link_target(member)  # tarfile's own resolution, as extraction does it
        except KeyError:
            return None
    return None


# -- NeMo 2 checkpoints: context/io.json ---------------------------------------------------

#: modules a NeMo 2 context names for its own objects (NeMo's SafePyrefPolicy trusts the first
#: group; fiddle, Megatron, Transformers and a few stdlib value types are what real contexts hold)
CONTEXT_MODULES = frozenset({
    "nemo", "nemo_run", "nemo_alligner", "nemo_curator", "torch", "pytorch_lightning", "lightning", "numpy",
    "collections", "typing", "enum", "dataclasses", "pathlib", "fiddle", "megatron", "transformers", "builtins",
    "functools", "datetime", "omegaconf",
})
_CONTEXT_KEYS = (b'"pyref"',)


def _fiddle_document(doc: Any) -> bool:
    from modelscan_core.scanners.jsondoc import TOO_LARGE

    return doc is TOO_LARGE or isinstance(doc, dict) and "root" in doc and "objects" in doc


def sniff_nemo_context(head: bytes, name: str, stream: BinaryIO) -> bool:
    """A fiddle JSON document (`root`, `objects`, python references): NeMo 2's `context/io.json`,
    which `nemo.lightning.io.load_context` rebuilds with `fdl.build`."""
    from modelscan_core.scanners.jsondoc import document, looks_like_object

    return looks_like_object(head) and _fiddle_document(document(head, stream, _CONTEXT_KEYS))


def pyrefs(doc: Any) -> Iterator[tuple[Any, Any, bool]]:
    """(module, name, called) of every python reference in a fiddle document. `called`: the
    reference is a Buildable's `fn_or_cls` (inline, or an entry of `objects` it refers to),
    which `fdl.build` calls with the config's arguments; any other reference is imported and
    handed to the model as a value."""
    objects = doc.get("objects") if isinstance(doc, dict) else None
    called_keys: list[Any] = []
    stack: list[tuple[Any, bool]] = [(doc, False)]
    while stack or called_keys:
        if not stack:
            key = called_keys.pop()
            if isinstance(objects, dict) and isinstance(key, str) and key in objects:
                stack.append((objects.pop(key), True))  # popped: each entry is walked once as called
            continue
        node, called = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "pyref":
                yield node.get("module"), node.get("name"), called
            elif called and node.get("type") == "ref":
                called_keys.append(node.get("key"))
            stack.extend((v, False) for v in node.values())
        elif isinstance(node, list):
            # a traversable's items are [path, value] pairs; the Buildable's callable sits at `fn_or_cls`
            if len(node) == 2 and isinstance(node[0], str) and "fn_or_cls" in node[0]:
                stack.append((node[1], True))
                continue
            stack.extend((v, called) for v in node)


class NemoContextScanner(Scanner):
    name = "modelscan.scanners.NemoScan"
    formats = ("nemo_context",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        from modelscan_core.scanners.jsondoc import load
        from modelscan_core.scanners.pickle.values import CALLED

        doc = load(item, "a NeMo context")
        policy = ctx.settings.pickle_policy
        seen: set[tuple[str, str, bool]] = set()
        for module, name, called in pyrefs(doc):
            key = (repr(module), repr(name), called)
            if key in seen:
                continue
            seen.add(key)
            verdict = _judge_pyref(module, name, called, policy, CALLED)
            if verdict is None:
                continue
            severity, why = verdict
            shown = f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else f"{module!r}:{name!r}"
            role = "calls" if called else "imports"
            ctx.report(
                "nemo/context-pyref",
                severity,
                f"python reference {shown} {why}; NeMo's load_context {role} it when it rebuilds the context "
                "(fdl.build)",
                module=module if isinstance(module, str) else "",
                operator=name if isinstance(name, str) else "",
                call=shown,
            )


def _judge_pyref(module: Any, name: Any, called: bool, policy, uses) -> tuple[Severity, str] | None:
    if not isinstance(module, str) or not isinstance(name, str) or not _DOTTED.match(module) or not _DOTTED.match(name):
        return Severity.HIGH, "is not a plain module and name"
    judgement = policy.judge(module, name, uses)
    if judgement.rule_id == "pickle/unsafe-global" and judgement.severity is not None and judgement.severity >= Severity.HIGH:
        return judgement.severity, f"is a denylisted callable ({judgement.matched or module + '.' + name})"
    if module.split(".", 1)[0] in CONTEXT_MODULES:
        return None
    if called:
        return Severity.HIGH, "lies outside the packages a NeMo context names"
    return Severity.MEDIUM, "lies outside the packages a NeMo context names"


FORMATS = (
    # before the generic tar rule: a tar holding model_config.yaml (a gzip .nemo reaches it decompressed)
    Format("nemo", "NemoScanner", "nemo", rules=(Rule(priority=495, sniff=sniff_nemo, family="tar"),),
           extensions=(".nemo",)),
    # text, like Keras's JSON configs (their own family: a document is one or the other)
    Format("nemo_context", "NemoContextScanner", "nemo", rules=(Rule(priority=610, sniff=sniff_nemo_context, family="json"),)),
)

SETTINGS = (ScannerSettings("nemo", "modelscan.scanners.NemoScan", {"enabled": True, "supported_extensions": [".nemo"]}),)
