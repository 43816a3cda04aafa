"""Bad input: one line naming the cause and the fix, exit 2, and the kernel untouched
(no link, program or map created, nothing pinned, nothing attached to the cgroup)."""
import pytest

from .conftest import DP_USER
from .residue import cgroup_attachments, pins, snapshot, wait_back_to

CASES = [
    (["--redirect-outbound-port", "0"], "0 is not a valid port"),
    (["--redirect-outbound-port", "70000"], "70000 is not a valid port"),
    (["--redirect-inbound-port", "70000"], "70000 is not a valid port"),
    (["--exclude-outbound-ports", "22,99999"], "99999 is not a valid port"),
    (["--exclude-outbound-ips", "10.0.0.0/40"], "not an IP address or CIDR"),
    (["--exclude-outbound-ips", "not-an-ip"], "not an IP address or CIDR"),
    (["--exclude-outbound-ports-for-uids", "tcp:22:9-1"], "uid range"),
    (["--exclude-outbound-ports-for-uids", "sctp:22:1"], "is not tcp, udp or *"),
    (["--ip-family-mode", "ipv5"], "unknown ip family mode"),
    (["--ebpf-instance-ip", "300.1.1.1"], "not an IP address"),
    (["--ebpf-cgroup-path", "/tmp"], "is not a directory in the cgroup2 mount"),
    (["--ebpf-cgroup-path", "/nonexistent/cg"], "is not a directory in the cgroup2 mount"),
    (["--vnet", "docker0:172.17.0.0/16"], "--vnet"),
    (["--redirect-dns", "--redirect-all-dns-traffic"], "exclusive"),
    (["--redirect-dns-port", "15006"], "both 15006"),
    (["--ebpf-instance-ip", "203.0.113.9"], "is not an address of this network namespace"),
]


def _assert_refused(lab, r, needle, before):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert lines[0].startswith("ebpf-tproxy: error: ")
    assert cgroup_attachments(lab.cgroup) == []
    assert pins(lab.bpffs) == []
    assert wait_back_to(before) == {}


@pytest.mark.parametrize("args, needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_flag_is_refused_and_nothing_changes(lab, args, needle):
    before = snapshot()
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, *args)
    _assert_refused(lab, r, needle, before)


def test_unknown_user(lab):
    before = snapshot()
    r = lab.tproxy("install", "--kuma-dp-user", "no-such-user-7f3a")
    _assert_refused(lab, r, "no user 'no-such-user-7f3a'", before)


def test_config_file_that_does_not_parse(lab, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("redirect:\n  outbound: {port: [\n")
    before = snapshot()
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--config", str(bad))
    _assert_refused(lab, r, "does not parse as YAML or JSON", before)


def test_bad_value_in_environment_names_the_variable(lab):
    before = snapshot()
    env = dict(lab.env(), KUMA_TRANSPARENT_PROXY_REDIRECT_OUTBOUND_PORT="0")
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, env=env)
    _assert_refused(lab, r, "KUMA_TRANSPARENT_PROXY_REDIRECT_OUTBOUND_PORT: 0", before)


@pytest.mark.parametrize("command", ["install", "check"])
@pytest.mark.kernel_ci
def test_kernel_below_5_7_is_refused_with_a_fake_uname(lab, command):
    # Ubuntu 20.04's 5.4: the floor is checked before anything touches the kernel.
    import os
    import subprocess
    import sys
    before = snapshot()
    wrapper = os.path.join(os.path.dirname(__file__), "fake_uname.py")
    args = [sys.executable, wrapper, "5.4.0-150-generic", command,
            "--ebpf-bpffs-path", lab.bpffs, "--ebpf-cgroup-path", lab.cgroup]
    if command == "install":
        args += ["--kuma-dp-user", DP_USER, "--netns", lab.app_ns]
    r = subprocess.run(args, capture_output=True, text=True, env=lab.env(), timeout=120)
    assert r.returncode != 0, r.stdout
    if command == "install":
        _assert_refused(lab, r, "need Linux 5.7 or newer", before)
    else:
        line = [ln for ln in r.stdout.splitlines() if "kernel >= 5.7" in ln]
        assert line and line[0].startswith("✗") and "running 5.4.0-150-generic" in line[0]
        assert "need Linux 5.7 or newer" in r.stdout + r.stderr
        assert pins(lab.bpffs) == [] and wait_back_to(before) == {}
