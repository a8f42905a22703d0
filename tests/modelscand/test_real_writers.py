"""The real writers, offline: torch.hub and huggingface_hub downloading from 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading

import pytest

from tests.modelscand.conftest import EVIL

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def serve(files: dict[str, bytes]):
    """A tiny HTTP server: plain files for torch.hub, the HF resolve API for huggingface_hub."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _find(self):
            path = self.path.split("?")[0]
            for suffix, body in files.items():
                if path.endswith(suffix):
                    return body
            return None

        def _headers(self, body):
            etag = hashlib.sha256(body).hexdigest()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()

        def do_HEAD(self):
            body = self._find()
            if body is None:
                self.send_error(404)
                return
            self._headers(body)

        def do_GET(self):
            body = self._find()
            if body is None:
                self.send_error(404)
                return
            self._headers(body)
            self.wfile.write(body)

    server = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.slow
def test_torch_hub_download_url_to_file(running, tmp_path):
    torch_hub = pytest.importorskip("torch.hub")
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    server = serve({"/resnet_evil.pth": EVIL})
    try:
        with running(str(tmp_path / "torch" / "hub")) as h:
            dst = checkpoints / "resnet_evil.pth"
            torch_hub.download_url_to_file(f"http://127.0.0.1:{server.server_port}/resnet_evil.pth", str(dst),
                                           progress=False)
            ev = h.wait_scan(str(dst))
            assert ev["event"] == "scan.finding" and ev["reason"] == "renamed"
            h.settle()
            assert [e["path"] for e in h.scans()] == [str(dst)]  # <dst>.<32hex>.partial never scanned
    finally:
        server.shutdown()


@pytest.mark.slow
def test_huggingface_hub_download_writes_blob_then_snapshot_link(running, tmp_path):
    pytest.importorskip("huggingface_hub")
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    server = serve({"/org/evil-model/resolve/main/pytorch_model.bin": EVIL,
                    f"/org/evil-model/resolve/{COMMIT}/pytorch_model.bin": EVIL})
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", HF_HUB_ETAG_TIMEOUT="5", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    code = ("from huggingface_hub import hf_hub_download; import sys;"
            f"print(hf_hub_download('org/evil-model', 'pytorch_model.bin', cache_dir={str(hub)!r}))")
    try:
        with running(str(hub)) as h:
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr[-2000:]
            etag = hashlib.sha256(EVIL).hexdigest()
            blob = hub / "models--org--evil-model" / "blobs" / etag
            ev = h.wait_scan(str(blob))
            # watchdog holds a MOVED_FROM back (up to 0.5 s) to pair it: under load the snapshot
            # link's Created can come first, and the blob is then scanned as that link's target
            assert ev["event"] == "scan.finding" and ev["reason"] in ("renamed", "created")
            assert ev["hf"]["repo_id"] == "org/evil-model" and ev["hf"]["etag"] == etag
            named = h.wait_event("hf.snapshot") if not ev["hf"]["files"] else ev
            assert named["hf"]["files"] == [{"revision": COMMIT, "file": "pytorch_model.bin"}]
            h.settle()
            # blob + snapshot link = one inode, one scan; no .incomplete scanned; HF's own ref and
            # lock files are scanned too, their clean verdicts at debug level only
            seen = [e for e in h.scans() if e["level"] != "debug"]
            assert len(seen) == 1, [e["path"] for e in h.scans()]
    finally:
        server.shutdown()
