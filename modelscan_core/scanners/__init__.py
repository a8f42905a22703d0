"""One scanner per format. The registry maps detect.py's format names to scanner classes.

Scanner modules are imported only when a file of their format turns up, so `modelscan -p
small.pkl` never pays for h5py or protobuf.
"""

from __future__ import annotations

import importlib

from modelscan_core.scanners.interface import Scanner

#: format name -> (settings key for enabled/options, "module:Class")
REGISTRY: dict[str, tuple[str, str]] = {
    "pickle": ("pickle", "modelscan_core.scanners.pickle.scanner:PickleScanner"),
    "keras_h5": ("keras_h5", "modelscan_core.scanners.keras_h5:KerasH5Scanner"),
    "keras_v3": ("keras", "modelscan_core.scanners.keras_v3:KerasV3Scanner"),
    "tf_savedmodel": ("savedmodel_ops", "modelscan_core.scanners.savedmodel:SavedModelScanner"),
    "tf_savedmodel_text": ("savedmodel_ops", "modelscan_core.scanners.savedmodel:SavedModelTextScanner"),
    "keras_metadata": ("savedmodel_lambda", "modelscan_core.scanners.savedmodel:KerasMetadataScanner"),
    "tf_fingerprint": ("savedmodel_ops", "modelscan_core.scanners.savedmodel:FingerprintScanner"),
    "tf_graphdef": ("savedmodel_ops", "modelscan_core.scanners.savedmodel:SavedModelScanner"),
    "pytorch_zip": ("pytorch", "modelscan_core.scanners.archives:ZipScanner"),
    "zip": ("archives", "modelscan_core.scanners.archives:ZipScanner"),
    "tar": ("archives", "modelscan_core.scanners.archives:TarScanner"),
    "7z": ("archives", "modelscan_core.scanners.archives:SevenZipScanner"),
    "gzip": ("archives", "modelscan_core.scanners.archives:CompressedScanner"),
    "bz2": ("archives", "modelscan_core.scanners.archives:CompressedScanner"),
    "xz": ("archives", "modelscan_core.scanners.archives:CompressedScanner"),
    "lzma": ("archives", "modelscan_core.scanners.archives:CompressedScanner"),
    "zlib": ("archives", "modelscan_core.scanners.archives:CompressedScanner"),
    "lz4": ("archives", "modelscan_core.scanners.archives:CompressedScanner"),
    "joblib_zfile": ("archives", "modelscan_core.scanners.archives:CompressedScanner"),
    "pytorch_legacy": ("pytorch", "modelscan_core.scanners.torch:LegacyTorchScanner"),
    "pytorch_tar_storages": ("pytorch", "modelscan_core.scanners.torch:LegacyTarStoragesScanner"),
    "pytorch_tar_tensors": ("pytorch", "modelscan_core.scanners.torch:LegacyTarTensorsScanner"),
    "numpy": ("numpy", "modelscan_core.scanners.numpy:NumpyScanner"),
}

_instances: dict[str, Scanner] = {}


def scanner_for(format_name: str) -> tuple[str, Scanner] | None:
    """The settings key and scanner instance for a format, or None if none reads it."""
    entry = REGISTRY.get(format_name)
    if entry is None:
        return None
    key, target = entry
    if target not in _instances:
        module_name, class_name = target.split(":")
        _instances[target] = getattr(importlib.import_module(module_name), class_name)()
    return key, _instances[target]
