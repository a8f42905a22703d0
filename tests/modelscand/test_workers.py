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
