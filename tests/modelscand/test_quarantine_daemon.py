"""Quarantine mode in a running daemon: what is moved and what is not, the hook, restores seen
by the daemon, recovery at start, and a Hugging Face cache written by the real client."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from modelscand.quarantine import review, tombstone
from modelscand.quarantine.store import Store
from tests.modelscand.conftest import BENIGN, EVIL
from tests.modelscand.qhelpers import REPO, accounted, killed, plant, run_killed
from tests.modelscand.test_cli import cli, events
from tests.modelscand.test_real_writers import COMMIT, serve

#: a pickle that only names an unknown global (never calls it): a LOW finding
LOW = b"cmypkg.layers\nBlock\n."
Q = {"scan__mode": "quarantine"}


def _land(root, name: str, data: bytes) -> str:
    """Write then rename into place, as downloaders do (the rename is the signal)."""
    tmp = root / f"{name}.0123abcd.incomplete"
    tmp.write_bytes(data)
    final = root / name
    os.rename(tmp, final)
    return str(final)


def _store(tmp_path) -> Store:
    return Store(str(tmp_path / "state"))


def _moved(h, path):
    return h.wait_event("quarantine.moved", path=path, timeout=20)


def test_a_finding_is_moved_at_once_and_its_tombstone_is_not_a_finding(running, root, tmp_path):
    with running(str(root), **Q) as h:
        path = _land(root, "evil.pkl", EVIL)
        ev = _moved(h, path)
        assert ev["level"] == "warning" and ev["show"] == f"modelscand quarantine show {ev['id']}"
        assert tombstone.parse(open(path, "rb").read()) == ev["id"]
        h.wait_event("quarantine.tombstone_seen", path=path)  # the daemon scanned its own tombstone...
        h.settle()
        assert [e["event"] for e in h.scans(path)] == ["scan.finding"]  # ...and gave it no verdict event
        clean = _land(root, "ok.pkl", BENIGN)
        h.wait_scan(clean)
        h.settle()
    store = _store(tmp_path)
    (entry,) = store.index().entries.values()
    b = entry.begin
    assert entry.state == "quarantined" and b["reason"] == "finding" and b["verdict"] == "issues"
    assert b["findings"] and b["findings"][0]["call"] and b["scanner"]["fingerprint"]
    assert b["root"] == str(root) and b["path"] == path
    assert open(clean, "rb").read() == BENIGN
    accounted(store, {path: EVIL, clean: BENIGN})


@pytest.mark.slow
def test_below_threshold_errors_and_detect_mode_are_never_moved(running, root, tmp_path):
    with running(str(root), **Q, scan_function="tests.modelscand.hooks:crash_or_hang") as h:
        low = _land(root, "low.pkl", LOW)
        crash = _land(root, "crash.pkl", EVIL)
        assert h.wait_scan(low)["event"] == "scan.finding"
        assert h.wait_scan(crash)["event"] == "scan.error"
        h.settle()
        assert not h.named("quarantine.moved")
    assert open(low, "rb").read() == LOW and open(crash, "rb").read() == EVIL
    with running(str(root), state=str(tmp_path / "s2"), scan_function="tests.modelscand.hooks:crash_or_hang",
                 **Q, quarantine__fail_closed=True) as h:  # fail closed: the error is moved
        ev = h.wait_event("quarantine.moved", path=crash, timeout=20)
        assert ev["reason"] == "fail_closed"
        h.settle()
    assert open(low, "rb").read() == LOW
    with running(str(root), state=str(tmp_path / "s3")) as h:  # detect mode: logged, left in place
        evil = _land(root, "evil.pkl", EVIL)
        h.wait_event("action.detect", path=evil)
        h.settle()
        assert not [e for e in h.named("quarantine.") if e.get("path") == evil]
    assert open(evil, "rb").read() == EVIL and not (tmp_path / "s3" / "ledger").exists()


@pytest.mark.slow
def test_hook_runs_once_per_bytes_with_the_record_and_is_bounded(running, root, tmp_path):
    out = tmp_path / "hook.out"
    script = tmp_path / "hook.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, time
        rec = json.load(sys.stdin)
        with open({str(out)!r}, "a") as fh:
            fh.write(json.dumps({{"id": rec["id"], "sha256": rec["begin"]["sha256"]}}) + "\\n")
        if "slow" in rec["begin"]["path"]:
            time.sleep(60)
    """))
    hook = [sys.executable, "-S", str(script)]
    with running(str(root), **Q, quarantine__hook=hook, quarantine__hook_timeout=1.5) as h:
        first = _land(root, "evil.pkl", EVIL)
        ev = _moved(h, first)
        h.wait_event("quarantine.hook_ran", id=ev["id"], timeout=20)
        os.unlink(first)  # the user deletes the tombstone and fetches the same bytes again
        again = _land(root, "evil.pkl", EVIL)
        rep = h.wait_event("quarantine.repeat", path=again, timeout=20)
        assert rep["repeat_of"] == ev["id"] and rep["level"] == "info" and rep["times"] == 2
        slow = _land(root, "slow.pkl", EVIL + b"2")
        ev2 = _moved(h, slow)
        failed = h.wait_event("quarantine.hook_failed", id=ev2["id"], timeout=30)
        assert "killed" in failed["error"] and failed["level"] == "warning"
        h.settle()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == [ev["id"], ev2["id"]]  # the repeat alerted no one
    assert lines[0]["sha256"] == hashlib.sha256(EVIL).hexdigest()


def test_a_restore_by_the_cli_is_honoured_by_the_running_daemon(running, root, tmp_path):
    with running(str(root), **Q) as h:
        path = _land(root, "evil.pkl", EVIL)
        ev = _moved(h, path)
        out = cli("quarantine", "restore", ev["id"], "--state-dir", str(tmp_path / "state"))
        assert out.returncode == 0, out.stderr
        allowed = h.wait_event("quarantine.allowed", path=path, timeout=20)
        assert allowed["restored_as"] == ev["id"]
        h.settle()
        assert open(path, "rb").read() == EVIL
        assert len(h.named("quarantine.moved")) == 1


def test_the_daemon_never_scans_its_own_quarantine_inside_a_root(running, tmp_path):
    """state dir (and so the quarantine) inside the watched tree: moved files are not found
    again by the walk or the watch (that would be a loop)."""
    top = tmp_path / "top"
    top.mkdir()
    with running(str(top), state=str(top / "state"), **Q) as h:
        path = _land(top, "evil.pkl", EVIL)
        ev = _moved(h, path)
        h.settle()
    with running(str(top), state=str(top / "state"), **Q) as h:  # a restart walks everything again
        h.settle()
        assert not [e for e in h.scans() if "/state/" in e["path"]]
        assert len(h.named("quarantine.moved")) == 1  # the first run's; nothing moved again
    assert os.path.exists(top / "state" / "quarantine" / ev["id"])


def test_a_malicious_target_of_a_link_out_of_the_roots_is_reported_never_moved(running, root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "ab12"
    target.write_bytes(EVIL)
    with running(str(root), **Q) as h:
        link = root / "pytorch_model.bin"
        os.symlink(target, link)
        ev = h.wait_event("quarantine.not_moved", path=str(target), timeout=20)
        assert ev["level"] == "error" and ev["via"] == str(link) and "by hand" in ev["answer"]
        h.settle()
        assert not [e for e in h.named("quarantine.moved") if e["path"] == str(target)]
    assert target.read_bytes() == EVIL and os.readlink(link) == str(target)
    assert not (tmp_path / "state" / "ledger").exists() or not _store(tmp_path).index().entries


def test_recovery_at_start_finishes_a_move_a_kill_interrupted(running, root, tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = plant(root, "evil.pkl")
    assert killed(run_killed({"op": "quarantine", "kill_at": "renamed", "state": str(state), "root": str(root),
                              "path": path}))
    with running(str(root), **Q) as h:
        rec = h.wait_event("quarantine.recovered", timeout=20)
        assert rec["record"] == "quarantine.done" and rec["level"] == "warning"
        h.settle()
        assert not h.named("quarantine.moved")  # the tombstone left by recovery is ours
    accounted(_store(tmp_path), {path: EVIL})


@pytest.mark.slow
def test_run_once_in_quarantine_mode_from_the_command_line(tmp_path):
    root = tmp_path / "r"
    path = plant(root, "evil.pkl")
    state = tmp_path / "state"
    out = cli("run", "--once", "--mode", "quarantine", "--root", str(root), "--state-dir", str(state))
    assert out.returncode == 1, out.stderr
    moved = [e for e in events(out.stdout) if e["event"] == "quarantine.moved"]
    assert [e["path"] for e in moved] == [path]
    listed = cli("quarantine", "list", "--json", "--state-dir", str(state))
    assert [r["id"] for r in json.loads(listed.stdout)] == [moved[0]["id"]]
    assert cli("quarantine", "verify", "--state-dir", str(state)).returncode == 0


# -- the real huggingface_hub client -----------------------------------------------------------------

HF_CODE = textwrap.dedent("""
    import json, os, pickle, sys
    from huggingface_hub import hf_hub_download
    path = hf_hub_download("org/evil-model", "pytorch_model.bin", cache_dir=sys.argv[1])
    st = os.stat(path)
    out = {"path": path, "ino": st.st_ino}
    expect = sys.argv[2].encode("latin-1") if len(sys.argv) > 2 else None
    data = open(path, "rb").read()
    if expect is not None and data == expect:  # only ever our own tombstone, checked byte for byte
        try:
            pickle.loads(data)
        except Exception as exc:
            out["load_error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
""")


def _hf_server(tmp_path):
    """The HF resolve API on 127.0.0.1 serving EVIL as org/evil-model's pytorch_model.bin, and
    the environment that points huggingface_hub at it."""
    server = serve({"/org/evil-model/resolve/main/pytorch_model.bin": EVIL,
                    f"/org/evil-model/resolve/{COMMIT}/pytorch_model.bin": EVIL})
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", HF_HUB_ETAG_TIMEOUT="5", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    return server, env


def _hf(hub, env, expect: bytes | None = None) -> dict:
    args = [sys.executable, "-c", HF_CODE, str(hub)] + ([expect.decode("latin-1")] if expect is not None else [])
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow
def test_huggingface_download_quarantined_load_fails_naming_it_and_a_redownload_is_a_repeat(running, tmp_path):
    pytest.importorskip("huggingface_hub")
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    server, env = _hf_server(tmp_path)
    etag = hashlib.sha256(EVIL).hexdigest()
    blob = hub / "models--org--evil-model" / "blobs" / etag
    try:
        with running(str(hub), **Q) as h:
            _hf(hub, env)
            ev = _moved(h, str(blob))
            qid = ev["id"]
            h.settle()
            # the user loads the model: no new download, a failure that names the quarantine
            got = _hf(hub, env, tombstone.build(qid))
            assert f"modelscand quarantine show {qid}" in got["load_error"]
            assert got["ino"] == os.stat(blob).st_ino  # the tombstone itself: nothing fetched again
            # the user deletes the tombstone and downloads again: the same bytes, moved at once
            os.unlink(blob)
            _hf(hub, env)
            rep = h.wait_event("quarantine.repeat", path=str(blob), timeout=20)
            assert rep["repeat_of"] == qid
            h.settle()
            again = _hf(hub, env, tombstone.build(rep["id"]))
            assert f"modelscand quarantine show {rep['id']}" in again["load_error"]
            h.settle()
            assert len(h.named("quarantine.moved")) == 1  # alerted once; no loop
            assert len(h.named("quarantine.repeat")) == 1
    finally:
        server.shutdown()
    store = _store(tmp_path)
    entry = store.index().entries[qid]
    hf = entry.begin["hf"]
    assert hf["repo_id"] == "org/evil-model" and hf["etag"] == etag and hf["refs"] == {"main": COMMIT}
    assert [(f["revision"], f["file"]) for f in hf["files"]] == [(COMMIT, "pytorch_model.bin")]
    show = cli("quarantine", "show", qid, "--state-dir", str(tmp_path / "state"))
    assert "org/evil-model" in show.stdout and f"pytorch_model.bin @ {COMMIT}" in show.stdout
    assert review.verify(store)["problems"] == []
    # restore puts the blob back under the snapshot link and allows the bytes
    restored = cli("quarantine", "restore", rep["id"], "--state-dir", str(tmp_path / "state"))
    assert restored.returncode == 0, restored.stderr
    link = hub / "models--org--evil-model" / "snapshots" / COMMIT / "pytorch_model.bin"
    assert open(link, "rb").read() == EVIL


@pytest.mark.slow
def test_torch_load_of_a_quarantined_hf_checkpoint_names_the_quarantine(running, tmp_path):
    """What a transformers/torch user sees: torch.load(weights_only=True) on the path
    hf_hub_download returns fails with 'modelscand quarantine show ID' (our tombstone only)."""
    pytest.importorskip("torch")
    pytest.importorskip("huggingface_hub")
    hub = tmp_path / "hub"
    hub.mkdir()
    server, env = _hf_server(tmp_path)
    code = textwrap.dedent("""
        import sys, torch
        from huggingface_hub import hf_hub_download
        path = hf_hub_download("org/evil-model", "pytorch_model.bin", cache_dir=sys.argv[1])
        if open(path, "rb").read() != sys.argv[2].encode("latin-1"):
            sys.exit("not our tombstone: not loading it")
        try:
            torch.load(path, weights_only=True)
        except Exception as exc:
            print(exc)
    """)
    try:
        with running(str(hub), **Q) as h:
            _hf(hub, env)
            qid = _moved(h, str(hub / "models--org--evil-model" / "blobs" / hashlib.sha256(EVIL).hexdigest()))["id"]
            out = subprocess.run([sys.executable, "-c", code, str(hub), tombstone.build(qid).decode("latin-1")],
                                 env=env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr[-2000:]
            assert f"modelscand quarantine show {qid}" in out.stdout
    finally:
        server.shutdown()

