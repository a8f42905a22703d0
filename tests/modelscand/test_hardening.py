"""Red-team round 3: path escapes, forged identities, stale temp files, held writers, log
injection, an untrusted state dir. Each test asserts what a user sees (events, verdicts, files)."""

from __future__ import annotations

import json
import os
import stat

from tests.modelscand.conftest import BENIGN, EVIL
from tests.modelscand.test_cli import cli, events


def _state(tmp_path, name="state"):
    d = tmp_path / name
    d.mkdir(mode=0o700)
    return str(d)


def test_control_and_bidi_characters_in_file_names_are_escaped_in_both_formats(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    name = "evil.pkl\x1b[2K\x1b]0;pwned\x07\u202egpj\u009b2J\u2066.pkl"
    (root / name).write_bytes(EVIL)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[log]\nformat = "console"\n')
    out = cli("run", "--once", "--config", str(cfg), "--root", str(root), "--state-dir", _state(tmp_path))
    assert out.returncode == 1, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "evil.pkl" in ln and "scan.finding" in ln)
    for raw in ("\x1b", "\x07", "\u202e", "\u009b", "\u2066"):
        assert raw not in out.stdout
    assert "\\x1b[2K" in line and "\\u202e" in line and "\\x9b" in line
    out = cli("run", "--once", "--root", str(root), "--state-dir", _state(tmp_path, "s2"))
    assert not any(ch in out.stdout for ch in ("\x1b", "\x07", "\u202e", "\u009b", "\u2066"))
    ev = next(e for e in events(out.stdout) if e["event"] == "scan.finding")
    assert ev["path"] == str(root) + "/evil.pkl\\x1b[2K\\x1b]0;pwned\\x07\\u202egpj\\x9b2J\\u2066.pkl"
