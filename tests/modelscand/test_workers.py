"""The worker boundary: typed results over a data-only pipe, phases with their own limits."""

from __future__ import annotations

import io
import json

import pytest

from modelscan_core.engine import scan_stream
from modelscan_core.model import file_result_from_json, file_result_to_json
from modelscan_core.settings import Settings
from tests.modelscand.conftest import EVIL


def test_file_result_json_is_lossless_and_type_checked():
    r = scan_stream(io.BytesIO(EVIL + b"trailing"), "m.pkl", Settings(), name="m.pkl")
    assert r.all_findings()
    assert file_result_from_json(json.loads(json.dumps(file_result_to_json(r)))) == r
    bad = file_result_to_json(r)
    bad["findings"][0]["severity"] = "EXEC"
    with pytest.raises(ValueError):
        file_result_from_json(bad)
    bad = file_result_to_json(r)
    bad["members"] = [{"__reduce__": "os.system"}]
    with pytest.raises(ValueError):
        file_result_from_json(bad)


def test_a_worker_that_sends_a_malformed_reply_is_an_error_verdict_and_is_replaced(running, root):
    with running(str(root), scan_function="tests.modelscand.hooks:liar") as h:
        (root / "m.pkl").write_bytes(EVIL)
        ev = h.wait_scan(str(root / "m.pkl"))
        assert ev["event"] == "scan.error" and "invalid reply" in ev["error"] and "severity" in ev["error"]
        assert ev["level"] == "error"


def test_the_worker_scans_a_file_with_its_path_so_onnx_external_data_links_are_followed(running, root, tmp_path):
    """An ONNX model whose external data is a sibling symlink to a file outside the watched
    directory: only a scan that knows the file's path can see where the sibling leads."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    secret = tmp_path / "outside" / "id_rsa"
    secret.parent.mkdir()
    secret.write_bytes(b"\0" * 16)
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    entry = w.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[w])
    data = helper.make_model(graph).SerializeToString()
    with running(str(root)) as h:
        (root / "weights.bin").symlink_to(secret)
        (root / "model.onnx").write_bytes(data)
        ev = h.wait_scan(str(root / "model.onnx"))
        assert ev["event"] == "scan.finding", ev
        assert "external_data" in json.dumps(ev) or "symbolic link" in json.dumps(ev), ev
