from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedct.common.cli import COMMANDS, main
from fedct.common.processes import free_port, start, stop_group
from tests.conftest import groups_alive, process_groups_under, write_tiny_site


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in {c.path[0] for c in COMMANDS}:
        assert name in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("fedct ")


def test_help_does_not_import_heavy_packages() -> None:
    code = (
        "import sys; from common.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'pydicom', 'flwr', 'opacus') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_data_inspect_reports_and_writes_json(
    tiny_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tiny_site / "junk.dcm").write_bytes(b"garbage")
    report = tmp_path / "report.json"
    code = main(["data", "inspect", str(tiny_site), "--json", str(report), "--image-size", "32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "junk.dcm: not a DICOM file" in out
    assert "ready to join a federation" in out
    data = json.loads(report.read_text())
    assert data["slices"] > 0
    assert data["skipped"] == [{"path": "junk.dcm", "reason": "not a DICOM file"}]
    assert "SYNTHETIC^" not in report.read_text()  # no patient names in the report
    assert "SYN0" not in report.read_text()  # nor patient IDs


def test_data_inspect_fails_on_unusable_site(tmp_path: Path) -> None:
    (tmp_path / "normal").mkdir()
    (tmp_path / "normal" / "a.dcm").write_bytes(b"garbage")
    assert main(["data", "inspect", str(tmp_path), "--image-size", "32"]) == 1


def test_data_synth_writes_sites(tmp_path: Path) -> None:
    assert main(["data", "synth", "--sites", "1", "--scale", "0.05", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "hospital-a" / "labels.csv").is_file()
    assert main(["data", "synth", "--sites", "1", "--out", str(tmp_path)]) == 1  # not empty


def test_pretrain_writes_weights_and_rejects_bad_arguments(
    tiny_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "public.safetensors"
    args = ["pretrain", str(tiny_site), "--out", str(out), "--epochs", "1"]
    assert main([*args, "--set", "image-size=32"]) == 0
    assert out.is_file()
    printed = capsys.readouterr().out
    assert f"pretrained={out.resolve()}" in printed
    assert "lesion loss on layer1" in printed  # the tiny site outlines its nodules
    assert main([*args, "--set", "image-size=32", "--lesion-weight", "0"]) == 0
    assert "no lesion loss" in capsys.readouterr().out
    assert main([*args, "--set", "image-size=32", "--lesion-weight", "-1"]) == 1
    assert main(["pretrain", str(tiny_site), "--out", str(tmp_path / "w.pth")]) == 1
    assert main(["pretrain", str(tmp_path / "absent"), "--out", str(out)]) == 1


@pytest.mark.slow
def test_a_client_started_in_the_background_of_a_script_stops_on_sigint(tmp_path: Path) -> None:
    """A shell starts `fedct client ... &` with SIGINT ignored; the client (and its SuperNode
    and executor) must still stop on the SIGINT that Ctrl-C or stop_group sends, not only on
    the SIGTERM stop_group sends 10 s later."""
    data = write_tiny_site(tmp_path / "data", matrix=48)
    args = [sys.executable, "-m", "fedct.common.cli", "client", "--site", "alpha"]
    args += ["--data", str(data), "--state", str(tmp_path / "state"), "--insecure"]
    args += ["--superlink", f"127.0.0.1:{free_port()}", "--runtime-port", str(free_port())]
    log_path = tmp_path / "client.log"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as the shell does for `... &`
    try:
        with log_path.open("wb") as log:
            child = start(args, log=log)
    finally:
        signal.signal(signal.SIGINT, previous)
    groups = {child.pid}
    try:
        deadline = time.monotonic() + 120
        # nobody listens: the SuperNode is up and keeps trying to connect
        while b"Connection attempt failed" not in log_path.read_bytes():
            assert child.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        groups = process_groups_under({child.pid})  # its SuperNode and executor: own groups
        os.killpg(child.pid, signal.SIGINT)  # only the client's group, as Ctrl-C would
        assert child.wait(timeout=30.0) == 130, log_path.read_text()
        assert not groups_alive(groups), "the client stopped, its children did not"
    finally:
        stop_group(child)
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
