"""Lifecycle: capture outlives the loader, install is idempotent and updates in place
without a gap, a loader killed mid-install is recovered, uninstall leaves zero residue."""
import json
import signal
import subprocess
import sys

import pytest

from loader.lab import REMOTE_IP4

from .conftest import CGROUP_HOOKS, DP_USER, install, listeners, reached
from .residue import cgroup_attachments, pins, snapshot, wait_back_to


def status(lab):
    r = lab.tproxy("status", "--output", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.kernel_ci
def test_capture_survives_the_loader_and_uninstall_leaves_nothing(lab):
    listeners(lab)
    before = snapshot()
    install(lab)   # a separate process, which has exited by now
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")
    assert len(cgroup_attachments(lab.cgroup)) == CGROUP_HOOKS
    r = lab.tproxy("uninstall")
    assert r.returncode == 0 and "uninstalled" in r.stdout, r.stderr
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("remote ")
    assert cgroup_attachments(lab.cgroup) == []
    assert pins(lab.bpffs) == []
    assert wait_back_to(before) == {}
    # twice is fine
    r = lab.tproxy("uninstall")
    assert r.returncode == 0 and "nothing to uninstall" in r.stdout


def test_install_twice_gives_the_same_state(lab):
    listeners(lab)
    install(lab, "--exclude-outbound-ports", "22")
    first = status(lab)[0]
    install(lab, "--exclude-outbound-ports", "22")
    second = status(lab)[0]
    assert {k: v["link_id"] for k, v in first["links"].items()} == \
        {k: v["link_id"] for k, v in second["links"].items()}
    for key in ("config", "cgroup", "local_networks", "instance_ip4", "instance_ip6"):
        assert first["meta"][key] == second["meta"][key]
    assert len(cgroup_attachments(lab.cgroup)) == CGROUP_HOOKS


def test_update_in_place_has_no_gap(lab):
    """A client connecting in a loop while install runs with other configurations: every
    connection reaches the proxy with the right original destination."""
    listeners(lab)
    install(lab)
    client = subprocess.Popen(
        lab.command([sys.executable, "-m", "loader.labservers", "connect", REMOTE_IP4, "8000",
                     "--count", "4000"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=lab.env(),
        preexec_fn=lab._preexec(True))
    try:
        for ports in ("1", "2,3", "4"):
            install(lab, "--exclude-outbound-ports", ports)
        out, err = client.communicate(timeout=300)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    results = json.loads(out)["results"]
    assert list(results) == [f"out orig={REMOTE_IP4}:8000 local=127.0.0.1:15001"], results
    assert status(lab)[0]["meta"]["config"]["redirect"]["outbound"]["excludePorts"] == "4"


def _killed_mid_install(lab):
    p = subprocess.Popen(
        [sys.executable, "-m", "loader.cli", "install", "--kuma-dp-user", DP_USER,
         "--netns", lab.app_ns, "--ebpf-bpffs-path", lab.bpffs, "--ebpf-cgroup-path",
         lab.cgroup], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env=dict(lab.env(), EBPF_TPROXY_TEST_PAUSE="after-link"))
    try:
        # Read until the pause is announced (or install ends without reaching it: EOF).
        seen = []
        for line in p.stderr:
            seen.append(line)
            if "paused at after-link" in line:
                break
        assert "paused at after-link" in seen[-1], "".join(seen)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stderr.close()


def test_loader_killed_mid_install_then_install_recovers(lab):
    listeners(lab)
    _killed_mid_install(lab)
    st = status(lab)
    assert st and st[0]["problems"], st   # the half-done instance is visible as such
    install(lab)
    assert status(lab)[0]["problems"] == []
    assert len(cgroup_attachments(lab.cgroup)) == CGROUP_HOOKS
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")


def test_loader_killed_mid_install_then_uninstall_recovers(lab):
    listeners(lab)
    before = snapshot()
    _killed_mid_install(lab)
    r = lab.tproxy("uninstall")
    assert r.returncode == 0, r.stderr
    assert cgroup_attachments(lab.cgroup) == []
    assert pins(lab.bpffs) == []
    assert wait_back_to(before) == {}
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("remote ")


def test_another_cgroup_for_the_same_name_is_refused(lab, tmp_path):
    install(lab)
    other = lab.cgroup + "-other"
    import os
    os.mkdir(other)
    try:
        r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--ebpf-cgroup-path", other)
        assert r.returncode == 1 and "uninstall it first" in r.stderr
        assert cgroup_attachments(other) == []
    finally:
        os.rmdir(other)


def test_bpffs_mounted_by_install_is_unmounted_by_uninstall(lab, tmp_path):
    # An empty directory stands for a fresh host's unmounted /sys/fs/bpf.
    from loader import kernel
    d = tmp_path / "bpf"
    d.mkdir()
    install(lab, "--ebpf-bpffs-path", str(d))
    assert kernel.is_bpffs(str(d))
    r = lab.tproxy("uninstall", "--ebpf-bpffs-path", str(d))
    assert r.returncode == 0, r.stderr
    assert not kernel.is_bpffs(str(d))
    assert cgroup_attachments(lab.cgroup) == []


def test_install_failing_halfway_rolls_back_everything(lab, tmp_path):
    """A fresh install that fails after its first link is attached (forced through the
    EBPF_TPROXY_TEST_FAIL seam) detaches it, removes its pins and unmounts the bpffs it
    mounted."""
    from loader import kernel
    d = tmp_path / "bpf"
    d.mkdir()
    before = snapshot()
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--ebpf-bpffs-path", str(d),
                   env=dict(lab.env(), EBPF_TPROXY_TEST_FAIL="after-link"))
    assert r.returncode == 1 and "failing at after-link" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not kernel.is_bpffs(str(d))
    assert cgroup_attachments(lab.cgroup) == []
    assert wait_back_to(before) == {}


def test_failed_upgrade_restores_the_previous_programs(lab):
    listeners(lab)
    install(lab, "--exclude-outbound-ports", "1")
    first = status(lab)[0]
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--exclude-outbound-ports", "8000",
                   env=dict(lab.env(), EBPF_TPROXY_TEST_FAIL="after-link"))
    assert r.returncode == 1, r.stderr
    after = status(lab)[0]
    assert after["problems"] == []
    assert {k: v["prog_id"] for k, v in after["links"].items()} == \
        {k: v["prog_id"] for k, v in first["links"].items()}
    assert after["meta"]["config"] == first["meta"]["config"]
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")   # 8000 not excluded


def test_recreated_cgroup_is_reported_and_reinstall_reattaches(lab):
    import os
    cg = lab.cgroup + "-re"
    os.mkdir(cg)
    try:
        install(lab, "--ebpf-cgroup-path", cg, "--name", "re")
        os.rmdir(cg)          # the kernel detaches the links of a removed cgroup
        os.mkdir(cg)
        st = json.loads(lab.tproxy("status", "--name", "re", "--output", "json").stdout)[0]
        assert any("detached" in p for p in st["problems"]), st["problems"]
        install(lab, "--ebpf-cgroup-path", cg, "--name", "re")
        st = json.loads(lab.tproxy("status", "--name", "re", "--output", "json").stdout)[0]
        assert st["problems"] == []
        assert len(cgroup_attachments(cg)) == CGROUP_HOOKS
    finally:
        lab.tproxy("uninstall", "--name", "re")
        os.rmdir(cg)


def test_kuma_loopback_address_is_added_and_removed(lab):
    def lo_addrs():
        return lab.ip(lab.app_ns, "-6", "addr", "show", "dev", "lo").stdout
    assert "::6/128" not in lo_addrs()
    install(lab)
    assert "::6/128" in lo_addrs()
    install(lab)                              # an update keeps it, and still owns it
    assert lab.tproxy("uninstall").returncode == 0
    assert "::6/128" not in lo_addrs()
    # One that was there before install is left alone.
    lab.ip(lab.app_ns, "-6", "addr", "add", "::6/128", "dev", "lo")
    install(lab)
    assert lab.tproxy("uninstall").returncode == 0
    assert "::6/128" in lo_addrs()
    # ipFamilyMode ipv4 does not touch IPv6 at all.
    lab.ip(lab.app_ns, "-6", "addr", "del", "::6/128", "dev", "lo")
    install(lab, "--ip-family-mode", "ipv4")
    assert "::6/128" not in lo_addrs()
