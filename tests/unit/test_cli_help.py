"""Every user-facing command has --help with an example (no root needed)."""
import pytest
from click.testing import CliRunner

from loader.cli import main


@pytest.mark.parametrize("cmd", [[], ["check"], ["install"], ["status"], ["uninstall"],
                                 ["agent"], ["cni", "install"], ["cni", "uninstall"],
                                 ["validate"], ["demo"], ["trace"]])
def test_help_has_an_example(cmd):
    r = CliRunner().invoke(main, cmd + ["--help"])
    assert r.exit_code == 0
    assert "Example:" in r.output and "ebpf-tproxy" in r.output


def test_kuma_flags_are_accepted_by_name():
    r = CliRunner().invoke(main, ["install", "--help"])
    for flag in ("--kuma-dp-user", "--redirect-outbound-port", "--redirect-inbound-port",
                 "--exclude-outbound-ports", "--exclude-outbound-ips",
                 "--exclude-outbound-ports-for-uids", "--ip-family-mode", "--config",
                 "--dry-run", "--verbose", "--ebpf-cgroup-path", "--ebpf-bpffs-path",
                 "--ebpf-instance-ip", "--ebpf-enabled", "--name", "--netns"):
        assert flag in r.output, flag


@pytest.mark.parametrize("args,cause", [
    (["--timeout", "soon"], "--timeout"),
    (["--timeout", "-1"], "--timeout"),
    (["--validation-server-port", "0"], "--validation-server-port"),
    (["--validation-server-port", "70000"], "--validation-server-port"),
    (["--ip-family-mode", "ipv5"], "--ip-family-mode"),
])
def test_validate_refuses_bad_input_in_one_line(args, cause):
    r = CliRunner().invoke(main, ["validate", *args])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and cause in lines[0], r.output
