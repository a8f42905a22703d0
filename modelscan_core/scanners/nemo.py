"""NVIDIA NeMo checkpoints (`.nemo`): a tar (plain or gzip) of YAML configs and torch checkpoints.

`restore_from` extracts the tar, loads `model_config.yaml` with OmegaConf and builds the
model from it: every mapping with a Hydra `_target_` (at any depth: preprocessor, encoder,
optimizer, ...) is `hydra.utils.instantiate`d, which imports the dotted path and calls it with
the mapping's other keys (`_args_` positionally; `_partial_` wraps it, `_call_: false` still
imports it). NeMo's own `target`/`cls` with `params` do the same. So a target is code the file
chooses (CVE-2025-23304): outside NeMo, PyTorch, OmegaConf and Lightning it is HIGH, and a
callable the pickle policy denylists (`builtins.exec`, `os.system`, `torch.load`, ...) is
CRITICAL. A target that is not a plain dotted name (an OmegaConf interpolation) is HIGH.

YAML is read with `yaml.safe_load` only; the tar's members (the torch checkpoints, the
tokenizer files) are scanned by the tar scanner like any archive's.
"""

from __future__ import annotations

import re
from typing import Any, BinaryIO, Iterator

from modelscan_core.detect import Rule
from modelscan_core.model import Severity
from modelscan_core.scanners import Format, ScannerSettings
from modelscan_core.scanners.interface import Item, ScanContext, ScanFailed, Scanner

CONFIG_NAME = "model_config.yaml"
#: packages whose classes NeMo configs name (its own, and the frameworks it builds on)
ALLOWED_PACKAGES = frozenset({"nemo", "torch", "omegaconf", "pytorch_lightning", "lightning", "lightning_fabric",
                              "megatron"})
MAX_YAML = 16 * 1024 * 1024
#: members looked at to recognise a NeMo tar (its config sits among a handful of files)
SNIFF_MEMBERS = 256
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


def sniff_nemo(head: bytes, name: str, stream: BinaryIO) -> bool:
    import tarfile

    from modelscan_core.sources import sniff

    if not sniff.tar(head, name, stream):
        return False
    try:
        archive = tarfile.open(fileobj=stream, mode="r:")
        for _ in range(SNIFF_MEMBERS):
            member = archive.next()
            if member is None:
                return False
            if member.name.rsplit("/", 1)[-1] == CONFIG_NAME:
                return True
    except (tarfile.TarError, EOFError, OSError):
        return False
    return False


def hydra_targets(doc: Any) -> Iterator[tuple[str, Any, str]]:
    """(path, target value, key) for every mapping a Hydra/NeMo loader instantiates.

    Anchors and aliases make a YAML document a graph; each mapping is visited once.
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
                # NeMo's own form: `target:` at the root names the model class; with `params`, anywhere
                if key in node and isinstance(node[key], str) and (not path or "params" in node):
                    yield path or "/", node[key], key
            for key, value in node.items():
                stack.append((value, f"{path}/{key}"))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                stack.append((value, f"{path}[{i}]"))


def judge_target(target: Any, policy) -> tuple[Severity, str] | None:
    """(severity, why) for a Hydra target, or None when it is one of NeMo's frameworks' classes."""
    from modelscan_core.scanners.pickle.values import CALLED

    if not isinstance(target, str) or not _DOTTED.match(target.strip()):
        return Severity.HIGH, "is not a plain dotted name (computed when the config is loaded)"
    target = target.strip()
    parts = target.split(".")
    # Hydra imports the longest importable prefix and walks the rest as attributes: try each split
    for i in range(1, len(parts)):
        judgement = policy.judge(".".join(parts[:i]), ".".join(parts[i:]), CALLED)
        if judgement.rule_id == "pickle/unsafe-global":
            return Severity.CRITICAL, f"is a denylisted callable ({judgement.matched or target})"
    if len(parts) == 1:
        judgement = policy.judge("builtins", target, CALLED)
        if judgement.rule_id == "pickle/unsafe-global":
            return Severity.CRITICAL, f"is a denylisted builtin ({target})"
    if parts[0] in ALLOWED_PACKAGES:
        return None
    return Severity.HIGH, f"lies outside {', '.join(sorted(ALLOWED_PACKAGES))}"


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
        verdict = judge_target(target, policy)
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
        configs = [m for m in members if m.isreg() and m.name.lower().endswith((".yaml", ".yml"))]
        if not any(m.name.rsplit("/", 1)[-1] == CONFIG_NAME for m in configs):
            ctx.error(f"no regular {CONFIG_NAME} member: NeMo cannot restore this file, and its config was not checked")
        for member in configs:
            if member.size > MAX_YAML:
                ctx.error(f"{member.name}: {member.size} bytes of YAML, beyond the {MAX_YAML} read", incomplete=True)
                continue
            item.stream.seek(member.offset_data)
            data = item.stream.read(member.size)
            if len(data) < member.size:
                ctx.error(f"{member.name}: truncated")
            analyse_config(data, member.name, ctx, offset=member.offset_data)


FORMATS = (
    # before the generic tar rule: a tar holding model_config.yaml (a gzip .nemo reaches it decompressed)
    Format("nemo", "NemoScanner", "nemo", rules=(Rule(priority=495, sniff=sniff_nemo, family="tar"),),
           extensions=(".nemo",)),
)

SETTINGS = (ScannerSettings("nemo", "modelscan.scanners.NemoScan", {"enabled": True, "supported_extensions": [".nemo"]}),)
