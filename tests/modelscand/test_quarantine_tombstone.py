"""What a user sees when they load a quarantined file: the tombstone's failure names the id.

The loads below run on OUR OWN tombstone bytes only (built here, checked byte for byte
before any loader sees them); nothing a user or test supplies as a model is ever loaded.
"""

from __future__ import annotations

import io
import pickle

import pytest

from modelscand.quarantine import tombstone
from tests.modelscand.conftest import EVIL

QID = "Q20261103-0a1b2c3d"
SHOW = f"modelscand quarantine show {QID}"


def _ours(kind: str) -> bytes:
    data = tombstone.build(QID, kind)
    assert tombstone.parse(data) == QID and len(data) < tombstone.MAX_SIZE
    return data


def test_pickle_load_fails_naming_the_quarantine():
    data = _ours(tombstone.PICKLE)
    with pytest.raises(ModuleNotFoundError) as exc:
        pickle.load(io.BytesIO(data))
    assert SHOW in str(exc.value)
    assert data.splitlines()[0].decode().endswith(f"run '{SHOW}'")  # `head` shows it too


@pytest.mark.slow
def test_torch_load_fails_naming_the_quarantine_with_and_without_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(_ours(tombstone.PICKLE))
    assert tombstone.parse(path.read_bytes()) == QID
    with pytest.raises(pickle.UnpicklingError) as exc:
        torch.load(str(path), weights_only=True)
    assert SHOW in str(exc.value)
    with pytest.raises(ModuleNotFoundError) as exc:
        torch.load(str(path), weights_only=False)
    assert SHOW in str(exc.value)


def test_safetensors_load_fails_naming_the_quarantine(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    from safetensors import safe_open

    path = tmp_path / "model.safetensors"
    path.write_bytes(_ours(tombstone.SAFETENSORS))
    assert tombstone.parse(path.read_bytes()) == QID
    with pytest.raises(safetensors.SafetensorError) as exc:
        with safe_open(str(path), "np"):
            pass
    assert SHOW in str(exc.value)


def test_only_exact_tombstones_are_recognised():
    good = tombstone.build(QID)
    assert tombstone.parse(good) == QID
    assert tombstone.parse(good + EVIL) is None  # a payload appended after our bytes
    assert tombstone.parse(good + b"\n") is None
    assert tombstone.parse(EVIL[:2] + good) is None
    assert tombstone.parse(good.replace(b"see_the", b"sea_the")) is None
    assert tombstone.parse(good.replace(QID.encode(), b"Q20261103-ffffffff", 1)) is None  # ids must agree
    st = tombstone.build(QID, tombstone.SAFETENSORS)
    assert tombstone.parse(st) == QID and tombstone.parse(st + b" ") is None
    assert tombstone.parse(EVIL) is None and tombstone.parse(b"") is None


def test_kind_follows_the_names_the_file_is_known_by():
    assert tombstone.kind_for(["model.safetensors"]) == tombstone.SAFETENSORS
    assert tombstone.kind_for(["model.safetensors", "pytorch_model.bin"]) == tombstone.PICKLE
    assert tombstone.kind_for(["pytorch_model.bin"]) == tombstone.PICKLE
