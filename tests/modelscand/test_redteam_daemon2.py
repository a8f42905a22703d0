"""Red team of the daemon and its quarantine, round two (round one: test_redteam_daemon.py).

Each test of a defect was written first and failed on the code it names; each asserts what a
user or operator sees: a verdict, a file moved or left, a log line and its level, an exit
code. Other users are simulated with real uids (those tests run as root; they skip otherwise).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from modelscand.quarantine import tombstone
from modelscand.quarantine.store import Store
from tests.modelscand.conftest import EVIL
from tests.modelscand.qhelpers import REPO, plant
from tests.modelscand.test_cli import cli, events
from tests.modelscand.test_issue10 import _state

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="simulating other users needs root")
VICTIM = 6161  # a uid with no passwd entry: an owner only
USER = 6262


def _kill_at(step: str) -> str:
    return ("import os, signal, sys\n"
            "from modelscand.quarantine import mover\n"
            f"mover.STEP_HOOK = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == {step!r} else None\n"
            "from modelscand.cli import main\n"
            "sys.argv[0] = 'modelscand'\n"
            "main()\n")


def _hook_config(tmp_path, state: str) -> tuple[str, str]:
    out = tmp_path / "hook.out"
    script = tmp_path / "hook.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        rec = json.load(sys.stdin)
        with open({str(out)!r}, "a") as fh:
            fh.write(json.dumps({{"id": rec["id"], "recovered": rec.get("recovered", False),
                                  "path": rec["begin"]["path"], "done": rec["done"]["type"]}}) + "\\n")
    """))
    conf = tmp_path / "q.toml"
    conf.write_text(f'[scan]\nmode = "quarantine"\n[state]\ndir = "{state}"\n[watch]\nconventions = false\n'
                    f'[quarantine]\nhook = {json.dumps([sys.executable, "-S", str(script)])}\nhook_timeout = 20.0\n')
    return str(conf), str(out)


def _hook_runs(out: str) -> list[dict]:
    try:
        with open(out) as fh:
            return [json.loads(line) for line in fh]
    except FileNotFoundError:
        return []


# -- the operator's hook survives a kill --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("step", ["done", "tombstoned"])
def test_a_kill_between_the_move_and_the_hook_runs_the_hook_at_the_next_start_once(tmp_path, step):
    """The hook ran only from memory: a kill after the move was recorded ("done"), or a move
    finished by start-up recovery (killed at "tombstoned"), never alerted anyone."""
    root = tmp_path / "r"
    evil = plant(root, "evil.pkl")
    state = _state(tmp_path)
    conf, out = _hook_config(tmp_path, state)
    args = ["run", "--once", "--config", conf, "--root", str(root)]
    first = subprocess.run([sys.executable, "-c", _kill_at(step), *args], capture_output=True, text=True,
                           cwd=REPO, timeout=60)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert _hook_runs(out) == []
    (entry,) = Store(state).index().entries.values()
    again = cli(*args)
    evs = events(again.stdout)
    ran = [e for e in evs if e["event"] == "quarantine.hook_ran"]
    assert [e["id"] for e in ran] == [entry.id], again.stdout[-3000:]
    due = [e for e in evs if e["event"] == "quarantine.hook_due"]
    assert due and due[0]["level"] == "warning" and due[0]["ids"] == [entry.id]
    assert [(r["id"], r["recovered"], r["path"], r["done"]) for r in _hook_runs(out)] == \
        [(entry.id, True, evil, "quarantine.done")]
    assert tombstone.parse(open(evil, "rb").read()) == entry.id
    quiet = cli(*args)  # recorded as run: never again
    assert not [e for e in events(quiet.stdout) if e["event"].startswith("quarantine.hook")]
    assert len(_hook_runs(out)) == 1
    shown = cli("quarantine", "show", entry.id, "--state-dir", state)
    assert "hook.done" in shown.stdout


@pytest.mark.slow
def test_a_hook_killed_with_the_daemon_is_run_again_and_a_finished_one_is_not(tmp_path):
    """At least once: a run cut short by the kill (no hook.done) is repeated at the next start;
    a live run that was recorded is not."""
    root = tmp_path / "r"
    first_evil = plant(root, "a/evil.pkl")
    state = _state(tmp_path)
    conf, out = _hook_config(tmp_path, state)
    args = ["run", "--once", "--config", conf, "--root", str(root)]
    ok = cli(*args)
    assert [e["event"] for e in events(ok.stdout) if e["event"].startswith("quarantine.hook")] == \
        ["quarantine.hook_ran"]
    plant(root, "b/evil2.pkl", EVIL + b" ")
    kill_in_hook = _kill_at("none").replace(
        "from modelscand.cli import main\n",
        "from modelscand.quarantine import action\n"
        "action.Hook._one = lambda self, qid, rec: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from modelscand.cli import main\n")
    killed = subprocess.run([sys.executable, "-c", kill_in_hook, *args], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    again = cli(*args)
    ran = [e for e in events(again.stdout) if e["event"] == "quarantine.hook_ran"]
    assert len(ran) == 1 and ran[0]["recovered"] is True
    assert [r["path"] for r in _hook_runs(out)] == [first_evil, str(root / "b" / "evil2.pkl")]
