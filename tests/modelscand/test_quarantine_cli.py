"""``modelscand quarantine list|show|restore|purge|verify`` as an operator runs it: subprocesses,
stdout, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from modelscand.quarantine import mover
from tests.modelscand.conftest import BENIGN, EVIL
from tests.modelscand.qhelpers import make_store, plant
from tests.modelscand.test_cli import REPO, cli

FINDINGS = [{"rule_id": "pickle/dangerous-call", "severity": "critical", "call": "posix.system('echo hi')",
             "offset": 12, "module": "posix", "operator": "system", "description": "calls posix.system"}]


@pytest.fixture
def populated(tmp_path):
    """Three entries: a plain file, an HF blob (with its snapshot link), one already restored."""
    store = make_store(tmp_path)
    root = tmp_path / "root"
    plain = plant(root, "torch/evil.pt")
    etag = "e" * 64
    blob = plant(root, f"hub/models--org--evil-model/blobs/{etag}", EVIL + b"hf")
    snap = root / "hub" / "models--org--evil-model" / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    os.symlink(f"../../blobs/{etag}", snap / "pytorch_model.bin")
    restored = plant(root, "other.pkl", EVIL + b"r")
    meta = {"verdict": "issues", "severity": "critical", "findings": FINDINGS, "reason": "finding"}
    ids = {}
    for name, path in (("plain", plain), ("hf", blob), ("restored", restored)):
        begin, _ = mover.quarantine(store, mover.Subject(str(root), path), meta)
        ids[name] = begin["id"]
    mover.restore(store, ids["restored"])
    return store, root, ids, {"plain": plain, "hf": blob, "restored": restored}


@pytest.fixture
def q(capsys):
    """The CLI in this process (what `modelscand quarantine ...` runs), its code and output."""
    from modelscand import cli as cli_module

    def run(store, *args):
        capsys.readouterr()
        code = cli_module.run(["quarantine", *args, "--state-dir", store.state_dir])
        out = capsys.readouterr()
        return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


def test_list_table_json_and_filters(q, populated):
    store, root, ids, paths = populated
    out = q(store, "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["ID", "WHEN", "STATE", "USER", "WHERE", "WORST", "FINDING"]
    assert len(lines) == 4
    hf_line = next(ln for ln in lines if ids["hf"] in ln)
    assert "org/evil-model: pytorch_model.bin@cccccccc" in hf_line and "critical posix.system('echo hi')" in hf_line
    assert "quarantined" in hf_line and "restored" in next(ln for ln in lines if ids["restored"] in ln)
    rows = json.loads(q(store, "list", "--json").stdout)
    assert [r["id"] for r in rows] == [ids["plain"], ids["hf"], ids["restored"]]
    assert rows[1]["repo"] == "org/evil-model" and rows[1]["files"] == [{"revision": "c" * 40,
                                                                        "file": "pytorch_model.bin"}]
    pick = lambda *a: [r["id"] for r in json.loads(q(store, "list", "--json", *a).stdout)]  # noqa: E731
    assert pick("--state", "restored") == [ids["restored"]]
    assert pick("--repo", "org/evil-model") == [ids["hf"]] and pick("--repo", "evil-model") == [ids["hf"]]
    assert pick("--user", "root" if os.geteuid() == 0 else str(os.geteuid())) == list(ids.values())
    assert pick("--user", "nobody-at-all") == []
    assert pick("--since", "1h") == list(ids.values()) and pick("--since", "2999-01-01") == []
    bad = q(store, "list", "--since", "yesterday-ish")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "--since" in bad.stderr
    assert q(store, "list", "--state", "lost").returncode == 4


def test_show_has_everything_and_findings_with_their_calls(q, populated):
    store, root, ids, paths = populated
    out = q(store, "show", ids["hf"])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in (ids["hf"], paths["hf"], "org/evil-model", "pytorch_model.bin @ " + "c" * 40,
                     "posix.system('echo hi')", "(byte 12)", "quarantine.begin", "quarantine.done",
                     f"modelscand quarantine restore {ids['hf']}", "tombstone (pickle)"):
        assert expected in text, expected
    data = json.loads(q(store, "show", ids["restored"], "--json").stdout)
    assert data["entry"]["state"] == "restored"
    assert [r["type"] for r in data["records"]] == ["quarantine.begin", "quarantine.done", "restore.begin",
                                                   "restore.done"]
    missing = q(store, "show", "Q20990101-deadbeef")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no quarantine entry" in missing.stderr


def test_restore_conflict_force_and_allow(q, populated):
    store, root, ids, paths = populated
    os.unlink(paths["plain"])
    plant(root, "torch/evil.pt", BENIGN)
    out = q(store, "restore", ids["plain"])
    assert out.returncode == 2 and "not overwritten" in out.stderr and out.stderr.count("\n") == 1
    assert open(paths["plain"], "rb").read() == BENIGN
    out = q(store, "restore", ids["plain"], "--force")
    assert out.returncode == 0, out.stderr
    assert "allowed from now on" in out.stdout and open(paths["plain"], "rb").read() == EVIL
    assert q(store, "restore", ids["plain"]).returncode == 2  # restored already
    assert store.index().allowed_by(store.index().entries[ids["plain"]].sha256) == ids["plain"]


def test_purge_by_id_by_age_and_dry_run(q, populated, tmp_path):
    store, root, ids, paths = populated
    held = lambda qid: os.path.exists(os.path.join(store.dirs.primary, qid))  # noqa: E731
    out = q(store, "purge")  # default retention (90 days): nothing that old
    assert out.returncode == 0 and "nothing to purge" in out.stderr
    out = q(store, "purge", "--older-than", "0s", "--dry-run")
    assert out.returncode == 0 and out.stdout.count("would purge") == 2 and held(ids["plain"]) and held(ids["hf"])
    out = q(store, "purge", ids["plain"])
    assert out.returncode == 0 and f"purged {ids['plain']}" in out.stdout and not held(ids["plain"])
    out = q(store, "purge", "--older-than", "0s", "--json")
    assert [r["id"] for r in json.loads(out.stdout)] == [ids["hf"]] and not held(ids["hf"])
    kinds = [(r["type"], r["id"]) for r in store.ledger.records() if r["type"].startswith("purge.")]
    assert kinds == [("purge.begin", ids["plain"]), ("purge.done", ids["plain"]),
                     ("purge.begin", ids["hf"]), ("purge.done", ids["hf"])]
    assert q(store, "purge", ids["plain"]).returncode == 2
    assert q(store, "purge", ids["hf"], "--older-than", "1d").returncode == 4
    cfg = tmp_path / "keep.toml"
    cfg.write_text("[quarantine]\nretention_days = 0\n")
    assert q(store, "purge", "--config", str(cfg)).returncode == 4


def test_verify_ok_then_a_tampered_line_or_file_exits_1(q, populated):
    store, root, ids, paths = populated
    out = q(store, "verify")
    assert out.returncode == 0 and out.stdout.startswith("ok:"), out.stdout + out.stderr
    seg = os.path.join(store.ledger.dir, store.ledger.segments()[0])
    lines = open(seg, "rb").read().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"changed_during_move":false', b'"changed_during_move":true ')
    open(seg, "wb").write(b"".join(lines))
    out = q(store, "verify")
    assert out.returncode == 1 and "MISMATCH" in out.stdout and "seq 2" in out.stdout
    data = json.loads(q(store, "verify", "--json").stdout)
    assert data["problems"] and data["files_checked"] == 2


@pytest.mark.slow
def test_errors_are_one_line_with_codes(tmp_path, populated):
    store, root, ids, paths = populated
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    out = cli("quarantine", "list", "--state-dir", str(empty))
    assert out.returncode == 0 and out.stdout == "" and "nothing has been quarantined" in out.stderr
    assert json.loads(cli("quarantine", "list", "--json", "--state-dir", str(empty)).stdout) == []
    assert cli("quarantine").returncode == 4
    bad = tmp_path / "bad.toml"
    bad.write_text('[quarantine]\nhook = ["notify-send"]\n')
    out = cli("quarantine", "list", "--config", str(bad))
    assert out.returncode == 78 and "absolute path" in out.stderr and "Traceback" not in out.stderr
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from modelscand.quarantine.ledger import Ledger\n"
                               "with Ledger(sys.argv[1]).locked():\n    print('held', flush=True); time.sleep(60)\n",
                               store.ledger.dir], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        env = dict(os.environ)
        out = subprocess.run([sys.executable, "-c", "import sys; from modelscand.quarantine import ledger, cli;"
                              "import modelscand.cli as m; ledger.Ledger.LOCK_TIMEOUT = 0.5;"
                              "sys.exit(m.run(sys.argv[1:]))", "quarantine", "restore", ids["plain"],
                              "--state-dir", store.state_dir], capture_output=True, text=True, cwd=REPO, env=env,
                             timeout=60)
        assert out.returncode == 75 and "busy" in out.stderr and out.stderr.count("\n") == 1
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_a_non_root_operator_gets_permission_denied_not_a_traceback(populated):
    """Forked, not exec'd: the interpreter itself may not be executable by `nobody`."""
    store, root, ids, paths = populated
    from modelscand import cli as cli_module

    assert cli_module.run(["quarantine", "list", "--state-dir", store.state_dir]) == 0  # as root; warms imports
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, run the CLI, report through stderr and the exit code
        code = 70
        try:
            sys.stderr = open(write, "w", closefd=False)
            os.setgid(65534)
            os.setuid(65534)
            code = cli_module.run(["quarantine", "list", "--state-dir", store.state_dir])
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as fh:
        err = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 77, err
    assert "permission denied" in err and "Traceback" not in err and err.count("\n") == 1
