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
from tests.modelscand.qhelpers import REPO, mounted_tmpfs, plant, tmpfs  # noqa: F401 (a fixture)
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


# -- a root (or a directory above it) swapped for a symlink ---------------------------------------

def _victim_dir(tmp_path, name="victim") -> tuple:
    """A directory of another user's, outside every root, holding a malicious-looking file."""
    vdir = tmp_path / name
    vdir.mkdir(mode=0o700)
    vfile = plant(vdir, "evil.pkl")
    for p in (vfile, vdir):
        os.chown(p, VICTIM, VICTIM)
    return vdir, vfile


def _unchanged(path: str, data: bytes = EVIL, uid: int = VICTIM) -> None:
    st = os.lstat(path)
    assert open(path, "rb").read() == data and st.st_uid == uid and st.st_mode & 0o777 != 0


def _swap_for_link(path, target) -> None:
    os.rename(path, f"{path}.old")
    os.symlink(target, path)


@ROOT_ONLY
@pytest.mark.parametrize("swapped", ["root", "above"])
def test_a_root_swapped_for_a_link_moves_nothing_of_the_victim(tmp_path, swapped):
    """The mover opened the root by its path, following links: a user who owns the root's
    parent (~/.cache) swaps the root, or a directory above it, for a link to a victim's
    directory, and the daemon moved the victim's same-named file into quarantine."""
    from modelscand.quarantine import QuarantineError, mover

    cache = tmp_path / "u" / "cache"
    hub = cache / "hub"
    plant(hub, "evil.pkl")
    vdir, vfile = _victim_dir(tmp_path)
    if swapped == "root":
        _swap_for_link(hub, vdir)
    else:
        (tmp_path / "fake" / "hub").mkdir(parents=True)
        os.rename(vfile, tmp_path / "fake" / "hub" / "evil.pkl")
        vfile = str(tmp_path / "fake" / "hub" / "evil.pkl")
        _swap_for_link(cache, tmp_path / "fake")
    store = Store(_state(tmp_path))
    with pytest.raises(QuarantineError):
        mover.quarantine(store, mover.Subject(str(hub), str(hub / "evil.pkl")), {"verdict": "issues"})
    _unchanged(vfile)
    assert not store.index().entries


@ROOT_ONLY
@pytest.mark.slow
def test_restore_into_a_root_swapped_for_a_link_is_refused(tmp_path):
    """`quarantine restore` (as root) wrote the file, and HF links, wherever the root's path
    now led: into a victim's directory."""
    hub = tmp_path / "u" / "hub"
    evil = plant(hub, "evil.pkl")
    state = _state(tmp_path)
    first = cli("run", "--once", "--mode", "quarantine", "--root", str(hub), "--state-dir", state)
    (moved,) = [e for e in events(first.stdout) if e["event"] == "quarantine.moved"]
    assert moved["path"] == evil
    vdir = tmp_path / "victim"
    vdir.mkdir(mode=0o700)
    os.chown(vdir, VICTIM, VICTIM)
    _swap_for_link(hub, vdir)
    out = cli("quarantine", "restore", moved["id"], "--state-dir", state)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "symlink" in out.stderr and "Traceback" not in out.stderr
    assert os.listdir(vdir) == []
    assert Store(state).index().entries[moved["id"]].state == "quarantined"


@ROOT_ONLY
@pytest.mark.slow
def test_a_watched_root_swapped_for_a_link_to_a_victims_dir_is_not_followed(running, tmp_path):
    """The daemon re-resolved a replaced root with realpath and watched, scanned and moved
    whatever the user's link now named: another user's directory."""
    home = tmp_path / "u"
    home.mkdir()
    os.chown(home, USER, USER)
    hub = home / "hub"
    hub.mkdir()
    os.chown(hub, USER, USER)
    vdir, vfile = _victim_dir(tmp_path)
    with running(str(hub), scan__mode="quarantine", watch__root_retry_interval=0.2) as h:
        h.settle()
        _swap_for_link(hub, vdir)
        os.lchown(hub, USER, USER)
        plant(f"{hub}.old", "evil.pkl", EVIL + b" ")  # an event named like the victim's file
        h.wait_event("watch.root_refused", timeout=20)
        h.settle()
        _unchanged(vfile)
        assert not [e for e in h.events if str(e.get("path", "")).startswith(str(vdir))]
        assert not h.scans(str(hub / "evil.pkl")) or all(
            e.get("path") != vfile for e in h.named("quarantine."))


@ROOT_ONLY
def test_a_users_link_into_another_users_directory_is_refused_at_start_up(tmp_path):
    """Conventions make every user's ~/.cache/huggingface/hub a root: a user who made it a
    link to another user's directory had the daemon (root) scan and move files there."""
    vdir, vfile = _victim_dir(tmp_path)
    own = tmp_path / "own"
    own.mkdir()
    os.chown(own, USER, USER)
    links = {}
    shared, _ = _victim_dir(tmp_path, "shared")
    for name, target, owner in (("to_victim", vdir, USER), ("to_own", own, USER), ("operators", shared, 0)):
        links[name] = tmp_path / name
        os.symlink(target, links[name])
        os.lchown(links[name], owner, owner)
    conf = tmp_path / "c.toml"
    conf.write_text(f'[watch]\nconventions = false\nroots = {json.dumps([str(p) for p in links.values()])}\n'
                    f'[state]\ndir = "{_state(tmp_path)}"\n')
    out = cli("run", "--once", "--config", str(conf))
    evs = events(out.stdout)
    refused = [e for e in evs if e["event"] == "watch.root_refused"]
    assert [e["configured"] for e in refused] == [str(links["to_victim"])] and refused[0]["level"] == "error"
    started = sorted(e["root"] for e in evs if e["event"] == "watch.start")
    assert started == sorted([str(own), str(shared)])  # the operator's own link is followed
    assert not [e for e in evs if str(e.get("path", "")).startswith(str(vdir))]


# -- what a walk cannot scan is said, and is no "clean" ------------------------------------------

def _deep(root, depth: int = 40) -> str:
    """A malicious file below a path longer than PATH_MAX (made through dir fds)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    names = []
    try:
        for i in range(depth):
            name = "d" * 200 + str(i)
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            names.append(name)
        out = os.open("deep_evil.pkl", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, EVIL)
        os.close(out)
    finally:
        os.close(fd)
    return os.path.join(str(root), *names, "deep_evil.pkl")


@pytest.mark.slow
def test_run_once_over_a_tree_it_could_not_read_whole_is_no_clean_exit(tmp_path):
    """A directory below PATH_MAX's reach (or any the walk cannot read) was a warning, then
    exit 0: the one-shot run said "clean" over a malicious file it never read. FIFOs, sockets
    and devices named like models were silent in a walk (only a watch event warned)."""
    import socket

    root = tmp_path / "r"
    root.mkdir()
    deep = _deep(root)
    out = cli("run", "--once", "--root", str(root), "--state-dir", _state(tmp_path))
    evs = events(out.stdout)
    assert [e["level"] for e in evs if e["event"] == "reconcile.unreadable"] == ["warning"]
    assert not [e for e in evs if e.get("path") == deep and e["event"].startswith("scan.")]
    assert out.returncode == 2, out.stdout[-2000:]
    specials = tmp_path / "s"
    specials.mkdir()
    os.mkfifo(specials / "fifo.pkl")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(specials / "sock.safetensors"))
    made = ["fifo.pkl", "sock.safetensors"]
    if os.geteuid() == 0:
        os.mknod(specials / "zero.bin", 0o600 | 0o020000, os.makedev(1, 5))
        made.append("zero.bin")
    (specials / "notes.txt").write_text("fine")
    try:
        out = cli("run", "--once", "--root", str(specials), "--state-dir", _state(tmp_path, "s2"))
    finally:
        sock.close()
    evs = events(out.stdout)
    warned = sorted(os.path.basename(e["path"]) for e in evs if e["event"] == "scan.not_regular")
    assert warned == sorted(made) and {e["level"] for e in evs if e["event"] == "scan.not_regular"} == {"warning"}
    assert out.returncode == 2


# -- a ledger cut by a crash or a disk -------------------------------------------------------------

@pytest.mark.parametrize("cut", ["mid_record", "whole_record"])
def test_a_ledger_cut_below_head_is_reported_by_verify_for_good_and_appends_go_on(tmp_path, cut):
    """The torn tail of a committed record (HEAD named it) was truncated away without a
    trace; verify (which recovers first) then said nothing, and the next append overwrote
    HEAD: the loss was invisible for good."""
    from modelscand.quarantine import mover, review
    from tests.modelscand.qhelpers import make_store

    store = make_store(tmp_path)
    evil = plant(tmp_path / "r", "evil.pkl")
    mover.quarantine(store, mover.Subject(str(tmp_path / "r"), evil), {"verdict": "issues"})
    seg = os.path.join(store.ledger.dir, store.ledger.segments()[-1])
    data = open(seg, "rb").read()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    os.truncate(seg, last + 40 if cut == "mid_record" else last)
    first = review.verify(store)
    assert any("records were lost" in p for p in first["problems"]), first["problems"]
    other = plant(tmp_path / "r", "evil2.pkl", EVIL + b" ")
    mover.quarantine(store, mover.Subject(str(tmp_path / "r"), other), {"verdict": "issues"})
    again = review.verify(store)
    problems = again["problems"]
    assert len(problems) == 1 and "records were lost" in problems[0], problems  # the chain on is valid
    if cut == "mid_record":
        (saved,) = [n for n in os.listdir(store.ledger.dir) if ".torn-" in n]
        assert open(os.path.join(store.ledger.dir, saved), "rb").read() == data[last:last + 40]
    out = cli("quarantine", "verify", "--state-dir", store.state_dir)
    assert out.returncode == 1 and "records were lost" in out.stdout + out.stderr


def test_a_write_cut_before_its_fsync_is_dropped_and_noted_not_a_problem(tmp_path):
    """The ordinary crash: a partial line past HEAD was never committed nor acted on."""
    from modelscand.quarantine import review
    from tests.modelscand.qhelpers import make_store

    store = make_store(tmp_path)
    store.ledger.append("test.note", id=None)
    seg = os.path.join(store.ledger.dir, store.ledger.segments()[-1])
    with open(seg, "ab") as fh:
        fh.write(b'{"type":"quarantine.begin","id":"Q2026')
    result = review.verify(store)
    assert result["problems"] == []
    assert [r["type"] for r in store.ledger.records()] == ["test.note", "ledger.repaired"]


# -- a filesystem that fills up during a copy ---------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    yield from mounted_tmpfs(tmp_path / "small", "size=1m,mode=0700")


def test_a_quarantine_filesystem_that_fills_during_a_copy_leaves_nothing_half_done(tmp_path, small_tmpfs):
    """ENOSPC mid-copy: the partial copy stayed in the quarantine dir (on the state dir's
    filesystem, full for good) and the entry stayed 'quarantining' with no record of why."""
    from modelscand.quarantine import QuarantineError, mover
    from tests.modelscand.qhelpers import EVIL_BIG, accounted

    state = small_tmpfs / "state"
    state.mkdir(mode=0o700)
    store = Store(str(state), per_filesystem=False)
    root = tmp_path / "r"
    evil = plant(root, "big.pkl", EVIL_BIG)
    with pytest.raises(QuarantineError) as err:
        mover.quarantine(store, mover.Subject(str(root), evil), {"verdict": "issues"})
    assert "No space left" in str(err.value)
    assert open(evil, "rb").read() == EVIL_BIG
    assert os.listdir(store.dirs.primary) == []
    (entry,) = store.index().entries.values()
    assert entry.state == "aborted"
    accounted(store, {evil: EVIL_BIG})


def _fill(directory) -> None:
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


def test_a_full_user_filesystem_fails_the_tombstone_not_the_move(tmp_path, small_tmpfs):
    """The tombstone's write hit ENOSPC after the rename: the move was done, yet the daemon
    logged 'the file is still in place' and the entry stayed 'quarantining' until a restart."""
    from modelscand.quarantine import mover
    from tests.modelscand.qhelpers import accounted

    root = small_tmpfs / "r"
    evil = plant(root, "evil.pkl")
    store = Store(_state(tmp_path))
    qdir, same = store.dirs.for_file(os.stat(evil).st_dev, str(root))
    assert same and qdir.startswith(str(small_tmpfs))
    _fill(small_tmpfs)
    begin, done = mover.quarantine(store, mover.Subject(str(root), evil), {"verdict": "issues"})
    assert done["type"] == "quarantine.done" and done["tombstone"]["placed"] is False
    assert "No space left" in done["tombstone"]["error"]
    assert not os.path.lexists(evil)  # no half-written tombstone left in the user's name
    accounted(store, {evil: EVIL})


# -- a file changed between its verdict and its move ---------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("change", ["chmod", "replace"])
def test_a_file_changed_between_scan_and_move_is_scanned_again_and_moved(running, root, monkeypatch, change):
    """The move refuses bytes it did not scan ("scanned again as it is now"), but nothing
    offered the file again: a chmod (no event the daemon asks for) left a malicious file in
    place until the next walk; in run --once, for good."""
    from modelscand.quarantine import mover

    path = root / "evil.pkl"
    other = EVIL + b"  "
    done = []

    def meddle(step):
        if step == "opened" and not done:
            done.append(step)
            if change == "chmod":
                os.chmod(path, 0o600)
            else:  # the same name, new malicious bytes, renamed over it from outside the root
                tmp = root.parent / "x.tmp"
                tmp.write_bytes(other)
                os.rename(tmp, path)

    monkeypatch.setattr(mover, "STEP_HOOK", meddle)
    with running(str(root), scan__mode="quarantine") as h:
        tmp = root / ".evil.pkl.tmp"
        tmp.write_bytes(EVIL)
        os.rename(tmp, path)
        refused = h.wait_event("quarantine.not_moved", path=str(path), timeout=20)
        assert refused["level"] == "info"
        moved = h.wait_event("quarantine.moved", path=str(path), timeout=20)
        h.settle()
    assert tombstone.parse(open(path, "rb").read()) == moved["id"]
    st = Store(str(root.parent / "state"))
    assert st.index().entries[moved["id"]].sha256 == __import__("hashlib").sha256(
        other if change == "replace" else EVIL).hexdigest()


@pytest.mark.slow
def test_run_once_scans_again_what_changed_before_its_move(tmp_path):
    """run --once has no watch: a file changed between its verdict and its move was left in
    place with its first verdict, its new bytes never scanned."""
    root = tmp_path / "r"
    evil = plant(root, "evil.pkl")
    code = _kill_at("none").replace(
        "from modelscand.cli import main\n",
        "done = []\n"
        "def meddle(s):\n"
        "    if s == 'opened' and not done:\n"
        f"        done.append(s); os.chmod({evil!r}, 0o600)\n"
        "mover.STEP_HOOK = meddle\n"
        "from modelscand.cli import main\n")
    out = subprocess.run([sys.executable, "-c", code, "run", "--once", "--mode", "quarantine", "--root", str(root),
                          "--state-dir", _state(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=60)
    evs = events(out.stdout)
    assert [e["event"] for e in evs if e.get("path") == evil and e["event"].startswith("quarantine.")][:1] == \
        ["quarantine.not_moved"]
    moved = [e for e in evs if e["event"] == "quarantine.moved"]
    assert [e["path"] for e in moved] == [evil], out.stdout[-3000:]
    assert tombstone.parse(open(evil, "rb").read()) == moved[0]["id"]
    assert out.returncode == 1


# -- a reload that removes a root while its scan is in flight -----------------------------------

@pytest.mark.slow
def test_a_root_removed_by_a_reload_mid_scan_gets_its_verdict_but_nothing_moved(running, tmp_path):
    """The operator removes a root (SIGHUP) while a file of it is being scanned: the verdict
    still reaches the log, but the quarantine moved the file out of a directory the daemon no
    longer watches, on the word of a configuration that no longer exists."""
    import dataclasses

    keep, drop = tmp_path / "keep", tmp_path / "drop"
    keep.mkdir()
    drop.mkdir()
    conf = tmp_path / "reload.toml"
    conf.write_text(f'[watch]\nconventions = false\nroots = ["{keep}"]\n[scan]\nmode = "quarantine"\n')
    with running([str(keep), str(drop)], scan__mode="quarantine", scan_function="tests.modelscand.hooks:slow") as h:
        h.daemon.config = dataclasses.replace(h.daemon.config, source=str(conf))
        path = drop / "slow_evil.pkl"
        tmp = drop / ".slow_evil.pkl.tmp"
        tmp.write_bytes(EVIL)
        os.rename(tmp, path)
        pool = h.daemon.pool
        h.wait_for(lambda _: any(s.busy_since is not None for s in pool.slots), what="the scan in flight")
        h.daemon.maintenance.reload()
        assert h.daemon.roots.paths() == [str(keep)]
        ev = h.wait_scan(str(path), timeout=20)
        assert ev["event"] == "scan.finding"
        refused = h.wait_event("quarantine.not_moved", path=str(path), timeout=20)
        assert refused["level"] == "warning" and "no longer" in refused["why"]
        h.settle()
        assert not h.named("quarantine.moved")
    assert open(path, "rb").read() == EVIL


# -- attacks that found no defect (kept as guards) ---------------------------------------------------

@ROOT_ONLY
@pytest.mark.slow
def test_a_quarantine_dir_a_user_made_first_at_a_filesystem_top_is_never_used(tmp_path, tmpfs):
    """/tmp-like (sticky, world-writable) filesystem top: a user creates
    `.modelscand-quarantine` before the daemon does. It is not ours: the file is copied to the
    primary quarantine instead, and nothing lands in (or is hidden by) the user's directory."""
    from modelscand.quarantine import mover
    from tests.modelscand.qhelpers import accounted

    trap = tmpfs / ".modelscand-quarantine"
    trap.mkdir(mode=0o700)
    os.chown(trap, USER, USER)
    root = tmpfs / "r"
    evil = plant(root, "evil.pkl")
    store = Store(_state(tmp_path))
    begin, done = mover.quarantine(store, mover.Subject(str(root), evil), {"verdict": "issues"})
    assert begin["method"] == "copy" and begin["dir"] == store.dirs.primary
    assert os.listdir(trap) == []
    accounted(store, {evil: EVIL})
    hidden = plant(trap, "evil.pkl")  # and the user's directory hides nothing from a walk
    out = cli("run", "--once", "--root", str(tmpfs), "--state-dir", _state(tmp_path, "s2"))
    assert [e["event"] for e in events(out.stdout) if e.get("path") == hidden and e["event"].startswith("scan.")] \
        == ["scan.finding"]


@pytest.mark.slow
@pytest.mark.parametrize("broken_report", [False, True])
def test_a_directory_beyond_the_inotify_watch_limit_is_polled_and_its_files_get_verdicts(running, root,
                                                                                          monkeypatch, broken_report):
    """fs.inotify.max_user_watches reached (ENOSPC from inotify_add_watch, simulated): the
    directory is logged as an error with the exact fix, polled, and a file written there
    later still gets its verdict."""
    import errno

    from watchdog.observers import inotify_c

    real = inotify_c.InotifyFD.add_callback

    def limited(self, path, *args, **kwargs):
        if os.path.basename(path) == b"deep":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(inotify_c.InotifyFD, "add_callback", limited)
    monkeypatch.setattr("modelscand.maintenance.SUBWATCH_POLL_INTERVAL", 0.3)
    if broken_report:  # the report itself fails: was `except Exception: pass`, the directory lost silently
        monkeypatch.setattr("modelscand.intake.Intake.on_subwatch_failed",
                            lambda *a: (_ for _ in ()).throw(RuntimeError("report broke")))
    with running(str(root)) as h:
        if broken_report:
            (root / "deep").mkdir()
            ev = h.wait_event("watch.report_failed", timeout=20)
            assert ev["level"] == "error" and "report broke" in ev["error"] and ev["root"].endswith("deep")
            return
        (root / "deep").mkdir()
        failed = h.wait_event("watch.subwatch_failed", path=str(root / "deep"), timeout=20)
        assert failed["level"] == "error" and "max_user_watches" in failed["fix"]
        evil = root / "deep" / "evil.pkl"
        evil.write_bytes(EVIL)
        assert h.wait_scan(str(evil), timeout=20)["event"] == "scan.finding"
        h.settle()


@pytest.mark.slow
def test_names_with_newlines_invalid_utf8_and_escapes_go_through_quarantine_and_back(tmp_path):
    """A file name (or an HF repo folder) holding a newline, bytes that are no UTF-8 and
    terminal escapes: moved and restored to the exact bytes, shown escaped, never raw."""
    import hashlib

    from modelscand.quarantine import mover

    hub = os.fsencode(tmp_path / "hub")
    repo = hub + b"/models--org--ev\x1b]0;PWNED\x07il"
    rev = b"0123456789abcdef0123456789abcdef01234567"
    etag = hashlib.sha256(EVIL).hexdigest().encode()
    os.makedirs(repo + b"/blobs")
    os.makedirs(repo + b"/snapshots/" + rev)
    with open(repo + b"/blobs/" + etag, "wb") as fh:
        fh.write(EVIL)
    os.symlink(b"../../blobs/" + etag, repo + b"/snapshots/" + rev + b"/m\x1b[31m\n.bin")
    odd = hub + b"/bad\xff\n\x1b[2J.pkl"
    with open(odd, "wb") as fh:
        fh.write(EVIL + b" ")
    state = _state(tmp_path)
    store = Store(state)
    ids = [mover.quarantine(store, mover.Subject(os.fsdecode(hub), os.fsdecode(p)), {"verdict": "issues"})[0]["id"]
           for p in (repo + b"/blobs/" + etag, odd)]
    listed = cli("quarantine", "list", "--state-dir", state)
    assert listed.returncode == 0 and "\x1b" not in listed.stdout and "\\x1b" in listed.stdout
    for qid in ids:
        shown = cli("quarantine", "show", qid, "--state-dir", state)
        assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
        assert cli("quarantine", "restore", qid, "--state-dir", state).returncode == 0
    with open(odd, "rb") as fh:
        assert fh.read() == EVIL + b" "
    assert os.readlink(repo + b"/snapshots/" + rev + b"/m\x1b[31m\n.bin") == b"../../blobs/" + etag
