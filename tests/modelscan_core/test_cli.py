"""The `modelscan` command as CI scripts use it: exit codes, JSON, SARIF, settings, bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from modelscan_core.cli import run


class Evil:
    def __reduce__(self):
        return os.system, ("touch /tmp/modelscand-never-run",)


EVIL = pickle.dumps(Evil(), protocol=4)
GOOD = pickle.dumps({"weights": [0.5, 1.5], "name": "tiny"}, protocol=4)
BROKEN = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a"  # cut off mid-stream


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "good.pkl").write_bytes(GOOD)
    (tmp_path / "README.md").write_text("# a model\n")
    return tmp_path


# -- exit codes -------------------------------------------------------------------

def test_clean_scan_exits_0(capsys, tree):
    code, out, _ = cli(capsys, "-p", str(tree))
    assert code == 0
    assert "No issues found." in out


def test_issues_exit_1_and_are_not_masked_by_errors(capsys, tree):
    (tree / "evil.bin").write_bytes(EVIL)
    (tree / "broken.pkl").write_bytes(BROKEN)
    code, out, _ = cli(capsys, "-p", str(tree))
    assert code == 1
    assert "CRITICAL" in out and "evil.bin" in out
    assert "broken.pkl" in out  # the error names its file


def test_unreadable_model_exits_2_and_is_never_clean(capsys, tree):
    (tree / "broken.pkl").write_bytes(BROKEN)
    code, out, _ = cli(capsys, "-p", str(tree), "-r", "json")
    assert code == 2
    report = json.loads(out)
    verdicts = {f["source"]: f["verdict"] for f in report["files"]}
    assert verdicts["broken.pkl"] == "error"
    assert verdicts["good.pkl"] == "clean"
    assert report["errors"][0]["source"] == "broken.pkl"


def test_nothing_supported_exits_3(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, out, _ = cli(capsys, "-p", str(tmp_path))
    assert code == 3
    assert "nothing was scanned" in out


@pytest.mark.parametrize("args", [[], ["-p", "/definitely/not/here"], ["scan", "--bogus"], ["-r", "xml", "-p", "."]])
def test_usage_errors_exit_4(capsys, args):
    code, out, err = cli(capsys, *args)
    assert code == 4
    assert out == ""
    assert "Usage error" in err


def test_scan_is_the_default_command(capsys, tree):
    assert cli(capsys, "scan", "-p", str(tree))[0] == cli(capsys, "-p", str(tree))[0] == 0


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        run(["-v"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("modelscan, version ")


# -- JSON ---------------------------------------------------------------------------

def test_json_report_keeps_modelscans_shape(capsys, tree):
    (tree / "evil.bin").write_bytes(EVIL)
    code, out, _ = cli(capsys, "-p", str(tree), "-r", "json", "--show-skipped")
    report = json.loads(out)
    assert list(report)[:3] == ["summary", "issues", "errors"]
    summary = report["summary"]
    assert list(summary) == ["total_issues_by_severity", "total_issues", "input_path", "absolute_path",
                             "modelscan_version", "timestamp", "scanned", "skipped"]
    assert list(summary["total_issues_by_severity"]) == ["LOW", "MEDIUM", "HIGH", "CRITICAL"]
    assert summary["total_issues_by_severity"]["CRITICAL"] == 1
    assert summary["absolute_path"] == str(tree)
    assert sorted(summary["scanned"]["scanned_files"]) == ["evil.bin", "good.pkl"]
    assert summary["skipped"]["skipped_files"][0]["source"] == "README.md"
    issue = report["issues"][0]
    assert list(issue)[:6] == ["description", "operator", "module", "source", "scanner", "severity"]
    assert issue["module"] == "posix" and issue["operator"] == "system" and issue["source"] == "evil.bin"
    assert issue["rule_id"] == "pickle/unsafe-global"
    assert issue["call"] == "posix.system('touch /tmp/modelscand-never-run')"
    assert isinstance(issue["offset"], int)
    evil = next(f for f in report["files"] if f["source"] == "evil.bin")
    assert evil["format"] == "pickle" and evil["verdict"] == "issues" and evil["size"] == len(EVIL)
    assert len(evil["sha256"]) == 64


def test_json_without_show_skipped_has_no_skipped_key(capsys, tree):
    report = json.loads(cli(capsys, "-p", str(tree), "-r", "json")[1])
    assert "skipped" not in report["summary"]


def test_json_stdout_is_pure_even_with_debug_logging(tree):
    (tree / "evil.bin").write_bytes(EVIL)
    proc = subprocess.run([sys.executable, "-m", "modelscan_core", "-p", str(tree), "-r", "json", "-l", "DEBUG"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    json.loads(proc.stdout)  # nothing but the document


def test_output_file_for_every_format(capsys, tree):
    for fmt in ("console", "json", "sarif"):
        target = tree.parent / f"report.{fmt}"
        code, out, _ = cli(capsys, "-p", str(tree), "-r", fmt, "-o", str(target))
        assert code == 0 and out == ""
        assert target.read_text()
    json.loads((tree.parent / "report.json").read_text())


# -- SARIF --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def sarif_schema() -> dict:
    """The SARIF 2.1.0 schema, from an npm package that ships it (cached between runs)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modelscand-tests"
    schema = cache / "sarif-2.1.0-rtm.5.json"
    if not schema.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is needed once to fetch the SARIF schema")
        cache.mkdir(parents=True, exist_ok=True)
        packed = subprocess.run([npm, "pack", "@microsoft/jest-sarif@1.0.0-beta.0", "--silent"], cwd=cache,
                                capture_output=True, text=True, timeout=300, check=True).stdout.strip().splitlines()[-1]
        with tarfile.open(cache / packed) as tar:
            member = tar.getmember("package/lib/schemas/sarif-2.1.0-rtm.5.json")
            schema.write_bytes(tar.extractfile(member).read())
    return json.loads(schema.read_text())


def test_sarif_validates_and_names_rules(capsys, tree, sarif_schema):
    import jsonschema

    (tree / "evil.bin").write_bytes(EVIL)
    sub = tree / "sub dir"
    sub.mkdir()
    (sub / "broken.pkl").write_bytes(BROKEN)
    code, out, _ = cli(capsys, "-p", str(tree), "-r", "sarif")
    assert code == 1
    doc = json.loads(out)
    jsonschema.validate(doc, sarif_schema)
    run_ = doc["runs"][0]
    assert [r["id"] for r in run_["tool"]["driver"]["rules"]] == ["pickle/unsafe-global"]
    result = run_["results"][0]
    assert result["ruleId"] == "pickle/unsafe-global" and result["level"] == "error"
    uri = result["locations"][0]["physicalLocation"]["artifactLocation"]
    assert uri == {"uri": "evil.bin", "uriBaseId": "SCANROOT"}
    notes = run_["invocations"][0]["toolExecutionNotifications"]
    assert notes[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "sub%20dir/broken.pkl"


# -- settings -----------------------------------------------------------------------

def test_settings_file_round_trip(capsys, tmp_path, tree):
    target = tmp_path / "settings.toml"
    assert cli(capsys, "create-settings-file", "-l", str(target))[0] == 0
    text = target.read_text()
    assert text.startswith("#") and "[unsafe_globals.CRITICAL]" in text
    assert cli(capsys, "create-settings-file", "-l", str(target))[0] == 1  # refuses to overwrite
    assert cli(capsys, "create-settings-file", "-l", str(target), "-f")[0] == 0
    (tree / "evil.bin").write_bytes(EVIL)
    with_file = json.loads(cli(capsys, "-p", str(tree), "-r", "json", "--settings-file", str(target))[1])
    defaults = json.loads(cli(capsys, "-p", str(tree), "-r", "json")[1])
    assert with_file["issues"] == defaults["issues"]


def test_settings_merge_over_defaults(capsys, tmp_path):
    model = tmp_path / "m.pkl"
    model.write_bytes(b"\x80\x02cmy_tools\nhelper\n)R." + EVIL)
    settings = tmp_path / "s.toml"
    settings.write_text('[unsafe_globals.LOW]\nposix = ["system"]\n[unsafe_globals.CRITICAL]\nmy_tools = "*"\n')
    report = json.loads(cli(capsys, "-p", str(model), "-r", "json", "--settings-file", str(settings))[1])
    severities = {(i["module"], i["operator"]): i["severity"] for i in report["issues"]}
    assert severities[("my_tools", "helper")] == "CRITICAL"
    assert severities[("posix", "system")] == "LOW"  # the user's entry decides that name


def test_settings_disable_a_scanner(capsys, tmp_path):
    (tmp_path / "m.pkl").write_bytes(EVIL)
    settings = tmp_path / "s.toml"
    settings.write_text('[scanners."modelscan.scanners.PickleUnsafeOpScan"]\nenabled = false\n')
    code, out, _ = cli(capsys, "-p", str(tmp_path), "--settings-file", str(settings), "--show-skipped")
    assert code == 3
    assert "disabled" in out


def test_settings_file_is_never_read_from_cwd(capsys, tmp_path, monkeypatch):
    (tmp_path / "modelscan-settings.toml").write_text('[unsafe_globals.LOW]\nposix = ["system"]\n')
    (tmp_path / "m.pkl").write_bytes(EVIL)
    monkeypatch.chdir(tmp_path)
    report = json.loads(cli(capsys, "-p", "m.pkl", "-r", "json")[1])
    assert report["issues"][0]["severity"] == "CRITICAL"


@pytest.mark.parametrize("text", ["not = [valid", '[unsafe_globals.SEVERE]\nos = "*"\n', '[limits]\nmax_depth = -1\n'])
def test_bad_settings_are_a_usage_error(capsys, tmp_path, tree, text):
    settings = tmp_path / "bad.toml"
    settings.write_text(text)
    code, out, err = cli(capsys, "-p", str(tree), "--settings-file", str(settings))
    assert code == 4 and out == "" and "settings" in err


# -- bad input ----------------------------------------------------------------------

def test_bad_inputs_each_get_a_clear_error_and_the_rest_is_scanned(capsys, tmp_path):
    (tmp_path / "evil.pkl").write_bytes(EVIL)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096).replace(b"\x80", b"\x00"))
    os.mkfifo(tmp_path / "pipe.pkl")
    (tmp_path / "loop").mkdir()
    os.symlink("..", tmp_path / "loop" / "back")
    (tmp_path / "dangling.pkl").symlink_to(tmp_path / "missing")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.sock"))
    try:
        code, out, err = cli(capsys, "-p", str(tmp_path), "-r", "json")
    finally:
        sock.close()
    assert code == 1  # the malicious file is still found
    assert "Traceback" not in err
    report = json.loads(out)
    errors = {e["source"]: e["description"] for e in report["errors"]}
    assert "FIFO" in errors["pipe.pkl"]
    assert "socket" in errors["s.sock"]
    assert "loop" in errors[os.path.join("loop", "back")]
    assert "broken symlink" in errors["dangling.pkl"]
    assert "empty" in errors["empty.pt"]
    assert "garbage.pt" in errors
    assert "empty.txt" not in errors
    assert report["issues"][0]["source"] == "evil.pkl"


def test_unreadable_file_is_an_error(capsys, tmp_path, monkeypatch):
    target = tmp_path / "secret.pkl"
    target.write_bytes(GOOD)
    (tmp_path / "ok.pkl").write_bytes(GOOD)
    real_open = os.open

    def deny(path, flags, *args, **kwargs):
        if str(path) == str(target):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    code, out, _ = cli(capsys, "-p", str(tmp_path), "-r", "json")
    report = json.loads(out)
    assert code == 2
    assert report["errors"] == [{"category": "PATH", "description": "cannot open: Permission denied",
                                 "source": "secret.pkl", "incomplete": False}]
    assert report["summary"]["scanned"]["scanned_files"] == ["ok.pkl"]


def test_console_errors_name_their_file(capsys, tmp_path):
    (tmp_path / "broken.pkl").write_bytes(BROKEN)
    code, out, _ = cli(capsys, "-p", str(tmp_path))
    assert code == 2
    assert "broken.pkl: [PICKLE_GENOPS, error]" in out
    assert "NOT known to be safe" in out


def test_custom_report_module_from_settings(capsys, tmp_path, tree):
    settings = tmp_path / "s.toml"
    settings.write_text('[reporting]\nmodule = "modelscan.reports.JSONReport"\n')
    code, out, _ = cli(capsys, "-p", str(tree), "-r", "custom", "--settings-file", str(settings))
    assert code == 0
    assert json.loads(out)["summary"]["total_issues"] == 0


def test_directory_scan_shows_progress_on_a_terminal_only(tree):
    import pty

    for i in range(3):
        (tree / f"m{i}.pkl").write_bytes(GOOD)
    env = dict(os.environ, MODELSCAN_PROGRESS_AFTER="0")
    cmd = [sys.executable, "-m", "modelscan_core", "-p", str(tree), "-r", "json"]
    primary, secondary = pty.openpty()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=secondary, env=env, timeout=60)
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(primary)
    assert b"scanning file" in shown
    json.loads(proc.stdout)  # progress never reaches stdout
    piped = subprocess.run(cmd, capture_output=True, env=env, timeout=60)
    assert b"scanning file" not in piped.stderr


def test_a_modelscan_088_settings_file_still_works(capsys, tmp_path):
    settings = tmp_path / "modelscan-settings.toml"
    settings.write_text(
        'modelscan_version = "0.8.8"\nsupported_zip_extensions = [".zip", ".npz"]\n'
        '[scanners."modelscan.scanners.PickleUnsafeOpScan"]\nenabled = true\n'
        'supported_extensions = [".pkl", ".pickle", ".joblib", ".dill", ".dat", ".data"]\n'
        '[scanners."modelscan.scanners.SavedModelTensorflowOpScan"]\nenabled = true\nsupported_extensions = [".pb"]\n'
        '[scanners."modelscan.scanners.SavedModelTensorflowOpScan".unsafe_tf_operators]\nReadFile = "HIGH"\n'
        '[middlewares."modelscan.middlewares.FormatViaExtensionMiddleware".formats]\npytorch = [".bin", ".pt"]\n'
        '[unsafe_globals.CRITICAL]\n__builtin__ = ["eval", "compile", "getattr", "apply", "exec", "open"]\nos = "*"\n'
        '[unsafe_globals.HIGH]\nwebbrowser = "*"\n[unsafe_globals.MEDIUM]\n[unsafe_globals.LOW]\n'
        '[reporting]\nmodule = "modelscan.reports.ConsoleReport"\n[reporting.settings]\n'
    )
    (tmp_path / "m.pkl").write_bytes(EVIL)
    (tmp_path / "w.pkl").write_bytes(b"\x80\x02cwebbrowser\nopen\nX\x01\x00\x00\x00x\x85R.")
    report = json.loads(cli(capsys, "-p", str(tmp_path), "-r", "json", "--settings-file", str(settings))[1])
    severities = {i["source"]: i["severity"] for i in report["issues"]}
    assert severities == {"m.pkl": "CRITICAL", "w.pkl": "HIGH"}


def test_text_with_a_model_extension_is_skipped_not_an_error(capsys, tmp_path):
    (tmp_path / "tutor.pt").write_bytes("Lição de português\n".encode("latin-1") * 50)
    (tmp_path / "notes.pkl").write_text("these are notes, not a pickle\n")
    code, out, _ = cli(capsys, "-p", str(tmp_path), "-r", "json", "--show-skipped")
    report = json.loads(out)
    assert code == 3 and report["errors"] == []
    assert {s["description"] for s in report["summary"]["skipped"]["skipped_files"]} == {"text, not a model format"}


def test_npy_header_with_python2_longs(capsys, tmp_path):
    header = b"{'descr': '<i8', 'fortran_order': False, 'shape': (2L, 3L), }"
    header += b" " * (64 - 10 - len(header) - 1) + b"\n"
    (tmp_path / "old.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x00" * 48)
    code, out, _ = cli(capsys, "-p", str(tmp_path), "-r", "json")
    assert code == 0, out
