"""Every user-facing command has --help with an example (no root needed)."""
import pytest
from click.testing import CliRunner

from loader.cli import main


@pytest.mark.parametrize("cmd", [[], ["check"], ["install"], ["status"], ["uninstall"],
                                 ["demo"]])
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
