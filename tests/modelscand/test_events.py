"""Every way a model file lands, with real watchdog on temp directories (model-caches.md)."""

from __future__ import annotations

import os
import subprocess

from tests.modelscand.conftest import BENIGN, EVIL


def test_write_and_close_is_scanned(running, root):
    with running(str(root)) as h:
        p = root / "model.pkl"
        with open(p, "wb") as f:
            f.write(EVIL)
        ev = h.wait_scan(str(p))
        assert ev["event"] == "scan.finding" and ev["severity"] == "critical"
        assert "pickle/unsafe-global" in ev["rule_ids"]
        assert ev["reason"] in ("closed", "created")
        h.wait_event("action.detect", path=str(p))
        h.settle()
        assert len(h.scans(str(p))) == 1


def test_temp_file_then_rename_scans_final_name_once(running, root):
    with running(str(root)) as h:
        tmp = root / "model.bin.0123456789abcdef0123456789abcdef.partial"
        with open(tmp, "wb") as f:
            f.write(EVIL)
        final = root / "model.bin"
        os.rename(tmp, final)
        ev = h.wait_scan(str(final))
        assert ev["reason"] == "renamed" and ev["event"] == "scan.finding"
        h.settle()
        assert [e["path"] for e in h.scans()] == [str(final)]  # the temp name never scanned


def test_rename_in_from_outside_the_watch(running, root, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "w.pkl").write_bytes(EVIL)
    with running(str(root)) as h:
        os.rename(outside / "w.pkl", root / "w.pkl")  # only Created(final) reaches the watch
        ev = h.wait_scan(str(root / "w.pkl"))
        assert ev["event"] == "scan.finding"


def test_mkdir_p_then_write_at_once(running, root):
    with running(str(root)) as h:
        target = root / "a" / "b" / "c" / "model.pkl"
        # one process: mkdir -p and write before the daemon can watch the new directories
        subprocess.run(["sh", "-c", f"mkdir -p {target.parent} && cat > {target}"], input=EVIL, check=True)
        ev = h.wait_scan(str(target))
        assert ev["event"] == "scan.finding"


def test_whole_tree_moved_in(running, root, tmp_path):
    tree = tmp_path / "tree"
    for i in range(5):
        d = tree / f"d{i}" / "sub"
        d.mkdir(parents=True)
        (d / f"m{i}.pkl").write_bytes(EVIL if i == 3 else BENIGN)
    with running(str(root)) as h:
        os.rename(tree, root / "tree")
        for i in range(5):
            h.wait_scan(str(root / "tree" / f"d{i}" / "sub" / f"m{i}.pkl"))
        h.settle()
        assert len(h.scans()) == 5
        assert {e["event"] for e in h.scans()} == {"scan.clean", "scan.finding"}


def test_keras_style_in_place_write_waits_for_close(running, root):
    with running(str(root)) as h:
        p = root / "model.keras.pkl"
        f = open(p, "wb")
        f.write(EVIL[:10])
        f.flush()
        h.wait_for(lambda h: any(e["event"] == "scan.wait_writer" and e["path"] == str(p) for e in h.events),
                   5, "the daemon to see a writer holding the file")
        assert h.scans(str(p)) == []  # never scanned while a writer holds it
        f.write(EVIL[10:])
        f.close()
        ev = h.wait_scan(str(p))
        assert ev["event"] == "scan.finding"
        h.settle()
        assert len(h.scans(str(p))) == 1


def test_burst_into_brand_new_directories(running, root):
    n = 300
    with running(str(root), watch__queue_size=100000) as h:
        for i in range(n):
            d = root / f"new{i % 30}" / f"deep{i % 7}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i}.pkl").write_bytes(BENIGN)
        h.wait_for(lambda h: len(h.scans()) >= n, 60, f"{n} verdicts")
        h.settle(30)
        paths = [e["path"] for e in h.scans()]
        assert len(paths) == n and len(set(paths)) == n  # every one, exactly once


def test_same_inode_scanned_once_hf_blob_and_link(running, root):
    repo = root / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    with running(str(root)) as h:
        blob = repo / "blobs" / "ab12"
        tmp = repo / "blobs" / "ab12.0a1b2c3d.incomplete"
        tmp.write_bytes(EVIL)
        os.rename(tmp, blob)
        os.symlink("../../blobs/ab12", repo / "snapshots" / "c0ffee" / "pytorch_model.bin")
        ev = h.wait_scan(str(blob))
        assert ev["hf"]["repo_id"] == "org/tiny"
        link = h.wait_event("hf.snapshot")
        assert link["hf"]["files"] == [{"revision": "c0ffee", "file": "pytorch_model.bin"}]
        assert link["verdict"] == "issues"
        h.settle()
        assert len(h.scans()) == 1


def test_undecodable_file_name_logged_safely(running, root):
    with running(str(root)) as h:
        raw = os.fsencode(str(root)) + b"/bad\xff\xfename.pkl"
        with open(raw, "wb") as f:
            f.write(EVIL)
        ev = h.wait_for(lambda h: [e for e in h.scans() if "bad" in e["path"]], 10, "the odd name")[0]
        assert ev["path"].endswith("bad\\xff\\xfename.pkl") and ev.get("undecodable") is True
        ev["path"].encode("utf-8")  # strict UTF-8: safe for any JSON consumer
