"""The quarantine ledger: hash chain, fsync before acting, rotation, tampering seen by verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from modelscand.quarantine.index import Index
from modelscand.quarantine.ledger import GENESIS, Busy, Follower, Ledger, canonical, record_hash


def _ledger(tmp_path, **kw) -> Ledger:
    return Ledger(str(tmp_path / "ledger"), **kw)


def _lines(led: Ledger) -> list[tuple[str, bytes]]:
    out = []
    for seg in led.segments():
        with open(os.path.join(led.dir, seg), "rb") as fh:
            out += [(seg, line) for line in fh.read().splitlines()]
    return out


def _rewrite(led: Ledger, seg: str, lines: list[bytes]) -> None:
    with open(os.path.join(led.dir, seg), "wb") as fh:
        fh.write(b"".join(line + b"\n" for line in lines))


def test_records_chain_and_verify_clean(tmp_path):
    led = _ledger(tmp_path)
    recs = [led.append("quarantine.begin", id=f"Q{i}", sha256="ab" * 32, path="/x\udcff/é\x1b") for i in range(5)]
    assert recs[0]["prev"] == GENESIS and [r["seq"] for r in recs] == [1, 2, 3, 4, 5]
    assert all(b["prev"] == a["hash"] for a, b in zip(recs, recs[1:]))
    assert all(record_hash(r) == r["hash"] for r in recs)
    count, problems = led.verify()
    assert (count, problems) == (5, [])
    raw = open(os.path.join(led.dir, led.segments()[0]), "rb").read()
    assert raw.isascii() and raw.count(b"\n") == 5  # undecodable bytes and controls stay escaped JSON
    assert [r["id"] for r in led.records()] == [f"Q{i}" for i in range(5)]
    assert os.stat(led.dir).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(led.dir, led.segments()[0])).st_mode & 0o777 == 0o600


def test_each_record_is_fsynced_before_append_returns(tmp_path, monkeypatch):
    led = _ledger(tmp_path)
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    rec = led.append("quarantine.begin", id="Q1")
    seg = os.path.join(led.dir, led.segments()[0])
    size = os.path.getsize(seg)
    assert (seg, size) in synced  # the whole line, fsync'd
    assert rec["seq"] == 1


@pytest.mark.parametrize("edit", ["field", "field_and_hash", "delete", "insert", "reorder", "cut_tail", "garbage"])
def test_tampered_ledger_is_detected_by_verify(tmp_path, edit):
    led = _ledger(tmp_path)
    for i in range(6):
        led.append("quarantine.done", id=f"Q{i}", sha256=f"{i:064x}")
    seg, _ = _lines(led)[0]
    lines = [line for _, line in _lines(led)]
    rec = json.loads(lines[2])
    if edit == "field":
        rec["sha256"] = "f" * 64
        lines[2] = canonical(rec)
    elif edit == "field_and_hash":  # a careful forger recomputes the record's own hash
        rec["sha256"] = "f" * 64
        rec["hash"] = record_hash(rec)
        lines[2] = canonical(rec)
    elif edit == "delete":
        del lines[2]
    elif edit == "insert":
        lines.insert(3, lines[2])
    elif edit == "reorder":
        lines[2], lines[3] = lines[3], lines[2]
    elif edit == "cut_tail":
        lines = lines[:-2]
    elif edit == "garbage":
        lines[2] = b'{"oops": '
    _rewrite(led, seg, lines)
    _count, problems = led.verify()
    assert problems, f"{edit} went unnoticed"


def test_rotation_keeps_the_chain_verifiable_across_segments(tmp_path):
    led = _ledger(tmp_path, rotate_bytes=600)
    for i in range(40):
        led.append("quarantine.begin", id=f"Q{i:03d}", sha256=f"{i:064x}")
    segs = led.segments()
    assert len(segs) > 5
    count, problems = led.verify()
    assert problems == [] and count == 40 + len(segs) - 1  # one ledger.segment record per rotation
    with open(os.path.join(led.dir, segs[1]), "rb") as fh:
        first_of_second = json.loads(fh.readline())
    with open(os.path.join(led.dir, segs[0]), "rb") as fh:
        last_of_first = json.loads(fh.read().splitlines()[-1])
    assert first_of_second["type"] == "ledger.segment" and first_of_second["previous"] == segs[0]
    assert first_of_second["prev"] == last_of_first["hash"]
    assert [r["id"] for r in led.records() if r["type"] == "quarantine.begin"] == [f"Q{i:03d}" for i in range(40)]
    # a whole middle segment removed, or an edit inside an old one: verify says so
    os.rename(os.path.join(led.dir, segs[2]), tmp_path / "away")
    assert any("does not chain" in p for p in led.verify()[1])
    os.rename(tmp_path / "away", os.path.join(led.dir, segs[2]))
    assert led.verify()[1] == []
    os.unlink(os.path.join(led.dir, segs[-1]))  # the newest segment deleted: HEAD remembers
    assert any("HEAD" in p for p in led.verify()[1])


def test_torn_record_from_a_crash_is_dropped_by_the_next_writer(tmp_path, capture):
    led = _ledger(tmp_path)
    led.append("quarantine.begin", id="Q1")
    seg = os.path.join(led.dir, led.segments()[0])
    with open(seg, "ab") as fh:
        fh.write(b'{"type":"quarantine.done","id":"Q1","se')  # killed mid-write, never fsync'd
    assert any("cut short" in p for p in led.verify()[1])
    fresh = _ledger(tmp_path)  # the next process
    rec = fresh.append("quarantine.aborted", id="Q1")
    assert rec["seq"] == 3  # after the ledger.repaired record that says what was dropped
    assert [r["type"] for r in fresh.records()] == ["quarantine.begin", "ledger.repaired", "quarantine.aborted"]
    assert fresh.verify() == (3, [])
    events, _lock = capture
    assert any(e["event"] == "ledger.torn_record" and e["level"] == "warning" for e in events)


@pytest.mark.slow
def test_two_processes_append_under_the_lock_and_the_chain_holds(tmp_path):
    code = ("import sys; from modelscand.quarantine.ledger import Ledger\n"
            "led = Ledger(sys.argv[1])\n"
            "for i in range(60): led.append('quarantine.begin', id=f'{sys.argv[2]}{i}')\n")
    d = str(tmp_path / "ledger")
    procs = [subprocess.Popen([sys.executable, "-c", code, d, tag]) for tag in ("A", "B", "C")]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    led = Ledger(d)
    assert led.verify() == (180, [])
    assert len({r["id"] for r in led.records()}) == 180


def test_lock_is_exclusive_across_processes_and_busy_is_reported(tmp_path):
    led = _ledger(tmp_path)
    led.append("quarantine.begin", id="Q1")
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from modelscand.quarantine.ledger import Ledger\n"
                               "led = Ledger(sys.argv[1])\n"
                               "with led.locked():\n    print('held', flush=True); time.sleep(30)\n", led.dir],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Busy, match=f"pid {holder.pid}"):
            with led.locked(timeout=0.3):
                pass
    finally:
        holder.kill()
        holder.wait()
    with led.locked(timeout=5):
        led.append("quarantine.done", id="Q1")


def test_follower_reads_only_new_records_across_rotation(tmp_path):
    led = _ledger(tmp_path, rotate_bytes=400)
    follow = Follower(Ledger(led.dir))
    assert follow.poll() == []
    for i in range(3):
        led.append("quarantine.begin", id=f"Q{i}", sha256="a" * 64)
    assert [r.get("id") for r in follow.poll() if r["type"] != "ledger.segment"] == ["Q0", "Q1", "Q2"]
    assert follow.poll() == []
    for i in range(3, 12):
        led.append("quarantine.begin", id=f"Q{i}", sha256="a" * 64)
    assert [r.get("id") for r in follow.poll() if r["type"] != "ledger.segment"] == [f"Q{i}" for i in range(3, 12)]


def test_index_states_allow_list_and_repeats():
    recs = [
        {"type": "quarantine.begin", "id": "A", "sha256": "s1", "time": 1},
        {"type": "quarantine.done", "id": "A", "time": 2},
        {"type": "quarantine.begin", "id": "B", "sha256": "s1", "time": 3},
        {"type": "quarantine.done", "id": "B", "time": 4},
        {"type": "quarantine.begin", "id": "C", "sha256": "s2", "time": 5},
        {"type": "restore.begin", "id": "A", "time": 6},
        {"type": "purge.begin", "id": "B", "time": 7},
        {"type": "purge.done", "id": "B", "time": 8},
        {"type": "restore.done", "id": "Z", "time": 9},
    ]
    idx = Index.of(recs)
    assert {k: e.state for k, e in idx.entries.items()} == {"A": "restoring", "B": "purged", "C": "quarantining"}
    assert idx.first_by_sha == {"s1": "A"} and idx.times_by_sha["s1"] == 2
    assert idx.allowed_by("s1") == "A" and idx.allowed_by("s2") is None
    assert [e.id for e in idx.unfinished()] == ["A", "C"]
    assert [r["id"] for r in idx.orphans] == ["Z"]
    idx.add({"type": "restore.aborted", "id": "A", "time": 10})
    assert idx.entries["A"].state == "quarantined" and idx.allowed_by("s1") is None


def test_list_digests_come_from_the_summary_and_catch_up_from_the_ledger(tmp_path, monkeypatch):
    led = _ledger(tmp_path, rotate_bytes=2000)
    findings = [{"severity": "low", "rule_id": "a"}, {"severity": "critical", "rule_id": "b", "call": "posix.system('x')"}]
    for i in range(12):
        led.append("quarantine.begin", id=f"Q{i}", sha256=f"{i:064x}", path=f"/r/{i}", findings=findings,
                   hf={"repo_type": "model", "repo_id": "org/m", "etag": "e", "files": [{"revision": "c", "file": "f",
                                                                                          "link": "../../blobs/e"}]})
        led.append("quarantine.done", id=f"Q{i}")
    full = [d for d in led.digests()]
    assert [d["id"] for d in full if d["type"] == "quarantine.begin"] == [f"Q{i}" for i in range(12)]
    begin = next(d for d in full if d["type"] == "quarantine.begin")
    assert begin["findings"] == [findings[1]] and begin["hf"]["files"] == [{"revision": "c", "file": "f"}]
    assert any(d["type"] == "ledger.segment" for d in full)  # rotated: the digests span segments
    summary = os.path.join(led.dir, Ledger.SUMMARY)
    reads = []
    real = Ledger.records

    def spy(self, *a, **kw):
        reads.append(a)
        return real(self, *a, **kw)

    monkeypatch.setattr(Ledger, "records", spy)
    assert Ledger(led.dir).digests() == full and reads == []  # fresh summary: the ledger is not parsed
    lines = open(summary, "rb").read().splitlines(keepends=True)
    open(summary, "wb").write(b"".join(lines[:-5]))  # a crash between a record and its digest
    assert Ledger(led.dir).digests() == full and reads and reads[-1][0] is not None  # caught up from an offset
    open(summary, "wb").write(b"not json\n")
    assert Ledger(led.dir).digests() == full
    os.unlink(summary)
    assert Ledger(led.dir).digests() == full


def test_summary_lines_round_trip_any_text():
    from modelscand.quarantine.index import decode_digest, digest, encode_digest

    rec = {"type": "quarantine.begin", "seq": 7, "hash": "ab" * 32, "id": "Q1", "time": 1.5, "path": "/a\\x09b\\\\c\té",
           "owner": {"uid": 0, "user": None}, "sha256": "0" * 64, "identity": {"size": 3},
           "findings": [{"severity": "high", "rule_id": "r", "call": "f('\t\n\\\\')"}],
           "hf": {"repo_type": "model", "repo_id": "o/m", "files": [{"revision": "c", "file": "a\tb"}]}}
    d = digest(rec, "ledger-000001.jsonl", 99)
    line = encode_digest(d)
    assert b"\n" not in line and line.count(b"\t") == 22
    back = decode_digest(line)
    assert back["path"] == rec["path"] and back["findings"][0]["call"] == "f('\t\n\\\\')"
    assert back["hf"]["files"] == [{"revision": "c", "file": "a\tb"}] and back["owner"] == {"uid": 0, "user": None}
    assert decode_digest(line.replace(b"d1\t", b"d9\t", 1)) is None and decode_digest(b"d1\tx") is None


def test_records_of_one_id_are_read_where_the_digests_point(tmp_path, monkeypatch):
    led = _ledger(tmp_path, rotate_bytes=700)
    for i in range(8):
        led.append("quarantine.begin", id=f"Q{i}", sha256=f"{i:064x}", findings=[{"severity": "high"}] * 3)
    for i in range(8):
        led.append("quarantine.done", id=f"Q{i}", sha256=f"{i:064x}")
    want = [r for r in led.records() if r.get("id") == "Q5"]
    assert [r["type"] for r in want] == ["quarantine.begin", "quarantine.done"]
    full = []
    monkeypatch.setattr(Ledger, "records", lambda self, *a, **kw: full.append(1) or iter(()))
    assert Ledger(led.dir).records_of("Q5") == want and not full  # no full parse
    monkeypatch.undo()
    summary = os.path.join(led.dir, Ledger.SUMMARY)
    text = open(summary).read().replace("\tQ5\t", "\tQ4\t")  # a summary out of step: the ledger decides
    open(summary, "w").write(text)
    assert Ledger(led.dir).records_of("Q5") == want
