"""Helpers for the quarantine tests: stores on temp dirs, planted files, the invariant check,
a real tmpfs mount where root may mount one, and a forked child the kill tests SIGKILL right
after a named step of a move, restore or purge (`mover.STEP_HOOK`)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import signal
import subprocess
from pathlib import Path

import pytest

from modelscand.quarantine import mover, review
from modelscand.quarantine.store import Store
from tests.modelscand.conftest import EVIL, Evil

REPO = Path(__file__).resolve().parents[2]
#: > 2 MiB, so a copy has a "copying" step between its first chunk and its end
EVIL_BIG = pickle.dumps((Evil(), b"\x00" * (5 << 19)))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_store(tmp_path, name: str = "state", **kw) -> Store:
    state = tmp_path / name
    state.mkdir(mode=0o700, exist_ok=True)
    return Store(str(state), **kw)


def plant(root, rel: str, data: bytes = EVIL) -> str:
    path = Path(root) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def accounted(store: Store, originals: dict[str, bytes]) -> None:
    """The invariant: no file both gone and unrecorded, no record without its file.

    Every original is either still at its path with its bytes, or recorded by an entry
    (quarantined: its file exists with those bytes; or purged by an operator); every entry that claims a file has it (verify),
    and no quarantine directory holds a file no entry claims."""
    result = review.verify(store)
    assert result["problems"] == [], result["problems"]
    index = store.index()
    assert not index.unfinished(), [(e.id, e.state) for e in index.unfinished()]
    for path, data in originals.items():
        try:
            with open(path, "rb") as fh:
                here = fh.read()
        except FileNotFoundError:
            here = None
        if here == data:
            continue
        held = [e for e in index.entries.values() if e.state in ("quarantined", "purged") and e.sha256 == sha(data)
                and mover.original_path(e.begin) == path]
        assert held, f"{path} is gone (now {here[:40] if here else None!r}) and no quarantined entry holds it"


@contextlib.contextmanager
def no_rename_across(monkeypatch):
    """Make the quarantine's renames fail with EXDEV, as across filesystems or bind mounts."""
    def exdev(*_args):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(mover, "rename_noreplace", exdev)
    yield


def mounted_tmpfs(path, options: str):
    """A real tmpfs mounted at `path` (created) while the generator is suspended; skips the
    test where it cannot be mounted (not root, no permission)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the simulated-EXDEV tests cover the copy path)")
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    """A real 64 MB tmpfs mounted under tmp_path (root only)."""
    yield from mounted_tmpfs(tmp_path / "tmpfs", "size=64m,mode=1777")


def run_killed(spec: dict) -> int:
    """Run one operation in a forked child that SIGKILLs itself right after spec['kill_at'];
    the child's wait status (a real process, a real SIGKILL, nothing cleaned up)."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            _child(spec)
            code = 0  # the step was never reached: the caller's assertion says so
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _child(spec: dict) -> None:
    def hook(step: str) -> None:
        if step == spec["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)

    mover.STEP_HOOK = hook
    store = Store(spec["state"], per_filesystem=spec.get("per_filesystem", True))
    if spec.get("exdev"):
        def exdev(*_args):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

        mover.rename_noreplace = exdev
    if spec["op"] == "quarantine":
        mover.quarantine(store, mover.Subject(spec["root"], spec["path"]), {"verdict": "issues", "severity": "critical"})
    elif spec["op"] == "restore":
        mover.restore(store, spec["id"])
    elif spec["op"] == "purge":
        mover.purge(store, spec["id"], reason="test")
