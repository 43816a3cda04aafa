"""Lifecycle: capture outlives the loader, install is idempotent and updates in place
without a gap, a loader killed mid-install is recovered, uninstall leaves zero residue."""
import json
import os
import subprocess
import sys

import pytest

from loader.lab import REMOTE_IP4

from .conftest import (CGROUP_HOOKS, DP_UID, DP_USER, install, killed_at, listeners,
                       reached)
from .residue import cgroup_attachments, pins, snapshot, wait_back_to

LS = [sys.executable, "-m", "loader.lab.servers"]


def status(lab, rc=0):
    """status --output json; rc 1 when it reports a problem."""
    r = lab.tproxy("status", "--output", "json")
    assert r.returncode == rc, (r.returncode, r.stdout, r.stderr)
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
    """An upgrade that changes the configuration (port 8001 excluded from then on), held
    at each step: after each link swap and before the flip, a new connection is captured
    under the old configuration; after the flip it goes direct; connections opened before
    the upgrade carry data through the proxy all along; and the old generation's entries
    are gone afterwards."""
    log = lab.shared_file("proxy.log", "")
    os.chmod(log, 0o666)
    lab.spawn(LS + ["listen", "remote:8001"], ns=lab.remote_ns, in_cgroup=False)
    lab.spawn(LS + ["echo", "8002"], ns=lab.remote_ns, in_cgroup=False)
    lab.spawn(LS + ["proxy", "--port", "15001", "--log", log], user=DP_UID)
    install(lab)
    from loader import node
    links = len(node.link_infos(node.NodePaths(lab.bpffs)))   # and a neighbours lab's
    held = [lab.spawn(LS + ["hold", REMOTE_IP4, "8002"], stdin=subprocess.PIPE)
            for _ in range(3)]

    def captured_now():
        """One new connection to port 8001: did it go through the proxy (and with the
        right original destination)? The proxy logs before it connects upstream."""
        mark = f"original destination {REMOTE_IP4}:8001"
        before = open(log).read().count(mark)
        assert reached(lab, REMOTE_IP4, 8001)["line"].startswith("remote "), "no reply"
        text = open(log).read()
        assert "PROXY ERROR" not in text, text
        return text.count(mark) - before

    def echoes(i):
        for h in held:
            h.stdin.write(f"step {i}\n".encode())
            h.stdin.flush()
            assert h.stdout.readline().strip() == f"step {i}".encode()
        return len(held)

    # New code (a build tag changes what the node set is built from) and a new
    # configuration in one install: every link is swapped, then the namespace flips.
    upgrade = subprocess.Popen(
        [sys.executable, "-m", "loader.cli", "install", "--kuma-dp-user", DP_USER,
         "--exclude-outbound-ports", "8001", "--netns", lab.app_ns, "--ebpf-bpffs-path",
         lab.bpffs, "--ebpf-cgroup-path", lab.cgroup], stdin=subprocess.PIPE,
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env=dict(lab.env(), EBPF_TPROXY_TEST_HOLD="1", EBPF_TPROXY_TEST_BUILD_TAG="1"))
    steps, echoed = [], 0   # (step, captured then): a hook's swap at each attach point
    try:
        for line in upgrade.stderr:
            if not line.startswith("held at "):
                continue
            step = line[len("held at "):].strip()
            steps.append((step, captured_now()))
            echoed += echoes(len(steps))
            upgrade.stdin.write("\n")
            upgrade.stdin.flush()
        assert upgrade.wait(timeout=120) == 0
    finally:
        if upgrade.poll() is None:
            upgrade.kill()
            upgrade.wait()
    swaps = [(s, n) for s, n in steps if s.startswith("after-link ")]
    # Every link of the node set: each cgroup hook at each attach point, each namespace's
    # sk_lookup (the lab's alone: CGROUP_HOOKS + 1).
    assert len(swaps) == links >= CGROUP_HOOKS + 1, steps
    assert [s for s, _ in steps[len(swaps):]] == ["before-flip", "after-flip"], steps
    assert all(n == 1 for _, n in steps[:-1]), steps   # captured by the old configuration
    assert steps[-1][1] == 0, steps                     # direct after the switch
    assert echoed == 3 * len(steps) and captured_now() == 0
    # Only the generation in force has entries left.
    from loader import namespace
    with namespace.NodeMaps(node.NodePaths(lab.bpffs)) as maps:
        cookie = maps.read_meta("default")["netns_cookie"]
        gen = maps.config(cookie).gen
        assert {k.gen for k in maps.ports.keys() if k.netns_cookie == cookie} == {gen}
        assert {k.gen for k in maps.cidrs.keys()
                if (k.netns_hi << 32 | k.netns_lo) == cookie} == {gen}


def test_loader_killed_mid_install_then_install_recovers(lab):
    listeners(lab)
    killed_at(lab, "after-link")
    st = status(lab, rc=1)
    assert st and st[0]["problems"], st   # the half-done instance is visible as such
    install(lab)
    assert status(lab)[0]["problems"] == []
    assert len(cgroup_attachments(lab.cgroup)) == CGROUP_HOOKS
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")


def test_loader_killed_mid_install_then_uninstall_recovers(lab):
    listeners(lab)
    before = snapshot()
    killed_at(lab, "after-link")
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
    # New code (build tag) fails after its first link swap: every link goes back.
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--exclude-outbound-ports", "8000",
                   env=dict(lab.env(), EBPF_TPROXY_TEST_FAIL="after-link",
                            EBPF_TPROXY_TEST_BUILD_TAG="1"))
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
        r = lab.tproxy("status", "--name", "re", "--output", "json")
        assert r.returncode == 1, (r.stdout, r.stderr)
        st = json.loads(r.stdout)[0]
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
