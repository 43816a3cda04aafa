"""The agent's pieces that need no root: its log lines, its metrics address, the systemd
unit (verified by systemd-analyze) and the notify protocol, the program-info layout."""
import io
import json
import os
import shutil
import socket
import subprocess

import pytest

from loader import agent, bpfsys, metrics, systemd
from loader.config import ConfigError


def test_json_log_lines_parse_and_text_lines_are_one_line():
    out = io.StringIO()
    log = agent.Log("json", out)
    log("applied", "'pod1' (SIGHUP)", netns="/run/netns/pod1", generation=1)
    log("state-error", 'file "x": not JSON')
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["event"] == "applied" and first["generation"] == 1 and "time" in first
    assert json.loads(lines[1])["msg"] == 'file "x": not JSON'
    out = io.StringIO()
    agent.Log("text", out)("gc", "removed 'pod1'", stored=True)
    assert out.getvalue().count("\n") == 1 and "gc: removed 'pod1' (stored=True)" in out.getvalue()


@pytest.mark.parametrize("value, want", [("127.0.0.1:9590", ("127.0.0.1", 9590)),
                                         ("[::1]:9590", ("::1", 9590)),
                                         ("0.0.0.0:0", ("0.0.0.0", 0))])
def test_metrics_address(value, want):
    assert metrics.parse_address(value) == want


@pytest.mark.parametrize("value", ["9590", "localhost:9590", "127.0.0.1:70000",
                                   "127.0.0.1:http", ":9590"])
def test_a_bad_metrics_address_is_one_line(value):
    with pytest.raises(ConfigError, match="--metrics-address") as e:
        metrics.parse_address(value)
    assert "\n" not in str(e.value)


def test_the_unit_runs_this_agent_with_the_given_options(tmp_path):
    path = systemd.install_unit(["--state-dir", "/var/lib/x y", "--log-format", "json"],
                                str(tmp_path))
    text = open(path).read()
    exec_start = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    assert exec_start.endswith("agent --state-dir '/var/lib/x y' --log-format json")
    assert "Type=notify" in text and "Restart=always" in text and "@" not in exec_start
    assert systemd.remove_unit(str(tmp_path)) == path and not os.path.exists(path)
    assert systemd.remove_unit(str(tmp_path)) is None


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (make setup installs systemd)")
def test_systemd_analyze_verify_passes_on_the_installed_unit(tmp_path):
    path = systemd.install_unit(["--metrics-address", "127.0.0.1:9590"], str(tmp_path))
    r = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True)
    # verify exits 0 on unknown keys too, and says so on stderr: both must be clean.
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    # ... and it does catch a broken unit (the check can fail).
    with open(path, "a") as f:
        f.write("[Service]\nNoSuchKey=1\n")
    r = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True)
    assert "NoSuchKey" in r.stderr


def test_notify_sends_one_datagram_to_notify_socket(tmp_path, monkeypatch):
    addr = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(addr)
        monkeypatch.setenv("NOTIFY_SOCKET", addr)
        assert systemd.notify("READY=1\nSTATUS=serving 2 namespaces")
        assert s.recv(256) == b"READY=1\nSTATUS=serving 2 namespaces"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert systemd.notify("READY=1") is False


def test_prog_info_layout_matches_uapi():
    # struct bpf_prog_info offsets (uapi/linux/bpf.h): name at 64, run_time_ns at 192,
    # run_cnt at 200.
    assert bpfsys._ProgInfo.name.offset == 64
    assert bpfsys._ProgInfo.nr_map_ids.offset == 52
    assert (bpfsys._ProgInfo.run_time_ns.offset, bpfsys._ProgInfo.run_cnt.offset) == (192, 200)
