"""Scan every model-like file the installed packages ship, and list what is HIGH or worse.

Packages ship real pickles as test data (joblib's Python 2 pickles, numpy's object arrays,
scipy's .mat/.npz, scikit-learn's datasets, torch's testing data...). None of them is an
attack, so every HIGH/CRITICAL finding on them is a false positive of the policy.

    python scripts/scan_shipped_models.py [ROOT ...] [--show-all]

Without ROOTs it reads the base interpreter's site-packages and standard library. Exit
status 1 when any file has a HIGH or CRITICAL finding. Nothing is ever loaded: the files
are only read by the scanner.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: file names that a model loader (pickle, joblib, numpy, torch...) may read
SUFFIXES = frozenset({
    ".pkl", ".pickle", ".joblib", ".dill", ".npy", ".npz", ".pt", ".pth", ".ckpt", ".bin", ".dat", ".data",
    ".gz", ".gzip", ".bz2", ".xz", ".lzma", ".z", ".zip", ".tar", ".mat", ".h5", ".hdf5", ".keras", ".pb",
    ".onnx", ".gguf", ".safetensors", ".nemo", ".tflite", ".msgpack",
})


def default_roots() -> list[Path]:
    """The base interpreter's site-packages and standard library (not a venv's own)."""
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix, "installed_base": sys.base_prefix}
    paths = sysconfig.get_paths(vars=base)
    roots = []
    for key in ("purelib", "platlib", "stdlib"):
        path = Path(paths[key])
        if path.is_dir() and path not in roots:
            roots.append(path)
    return roots


def model_files(roots: list[Path]) -> list[Path]:
    found: set[Path] = set()
    for root in roots:
        for path in root.rglob("*"):
            if path.suffix.lower() in SUFFIXES and path.is_file() and not path.is_symlink():
                found.add(path)
    return sorted(found)


def scan_all(files: list[Path]):
    """(path, FileResult, findings at HIGH or worse) for every file, in order."""
    from modelscan_core import scan_path
    from modelscan_core.model import Severity

    for path in files:
        report = scan_path(path)
        high = [f for f in report.findings() if f.severity >= Severity.HIGH]
        yield path, report, high


def _walk(results):
    """Every file result and, recursively, its members (a gzip member may be a pickle)."""
    for result in results:
        yield result
        yield from _walk(result.members)


#: formats whose content a Python loader unpickles or reads as a model
PICKLE_LIKE = frozenset({"pickle", "joblib", "numpy", "pytorch_zip", "pytorch_legacy", "npz"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*", type=Path)
    parser.add_argument("--show-all", action="store_true", help="print every finding, not only HIGH or worse")
    args = parser.parse_args(argv)
    files = model_files(args.roots or default_roots())
    start = time.perf_counter()
    formats: Counter = Counter()
    bad = 0
    for path, report, high in scan_all(files):
        for f in _walk(report.files):
            formats[f.format or "?"] += 1
        if high or args.show_all:
            shown = high if not args.show_all else report.findings()
            for finding in shown:
                print(f"{finding.severity.name:8} {path}: {finding.rule_id} {finding.module}.{finding.operator} "
                      f"{finding.call or ''}")
        bad += bool(high)
    took = time.perf_counter() - start
    print(f"{len(files)} files, {sum(formats.values())} results with members "
          f"({', '.join(f'{k} {v}' for k, v in formats.most_common())}) in {took:.1f} s; "
          f"{bad} with HIGH/CRITICAL findings", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
