"""Issue 17: no unprivileged user and no typo turns into a bypass or a deletion.

The attacker steps run as `nobody` (setpriv) against a bpffs made by the test (the lab's,
mounted with the kernel's default mode 1777, or an empty directory install mounts itself);
everything is removed afterwards, also when a test fails."""
import json
import os
import stat
import subprocess
import sys

import pytest

from loader import kernel
from loader.lab import REMOTE_IP4
from loader.node import NodePaths

from .conftest import DP_USER, install, killed_at, listeners, own, pod_netns, reached
from .residue import cgroup_attachments, pins, snapshot, wait_back_to

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def as_nobody(*cmd):
    return subprocess.run([*NOBODY, *cmd], capture_output=True, text=True, timeout=60)


def mounts_at(path):
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == path)


def one_line_refusal(r, needle, code=2):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ebpf-tproxy: error: "), r.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture
def own_bpffs(lab, tmp_path):
    """An empty directory for install to mount bpffs on; unmounted and removed after."""
    d = tmp_path / "bpffs"
    d.mkdir()
    path = str(d)
    yield path
    from loader import lifecycle
    while kernel.is_bpffs(path):
        lifecycle.uninstall(path, everything=True)
        if kernel.is_bpffs(path):
            subprocess.run(["umount", path], check=False)


def tree_modes(bpffs):
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(bpffs, "ebpf-tproxy")):
        for n in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            st = os.lstat(n)
            out[n] = (st.st_uid, stat.S_IMODE(st.st_mode), stat.S_ISDIR(st.st_mode))
    return out


def test_install_mounts_bpffs_0700_and_makes_a_root_only_tree_under_any_umask(lab, own_bpffs):
    listeners(lab)
    # umask 000: what install creates must not depend on the caller's umask.
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--ebpf-bpffs-path", own_bpffs,
                   preexec_fn=lambda: os.umask(0))
    assert r.returncode == 0, r.stderr
    assert kernel.is_bpffs(own_bpffs) and mounts_at(own_bpffs) == 1
    # (bpffs always adds the sticky bit to its root: 1700)
    assert stat.S_IMODE(os.stat(own_bpffs).st_mode) & 0o777 == 0o700
    modes = tree_modes(own_bpffs)
    assert modes and all(uid == 0 for uid, _, _ in modes.values()), modes
    assert all(mode == 0o700 for _, mode, d in modes.values() if d), modes
    assert all(mode & 0o077 == 0 for _, mode, d in modes.values() if not d), modes
    # nobody can neither list the tree nor unlink a link pin: capture stays.
    link = next(p for p in modes if p.endswith("/connect4"))
    assert as_nobody("rm", "-f", link).returncode != 0 and os.path.exists(link)
    assert as_nobody("mkdir", os.path.join(own_bpffs, "mine")).returncode != 0
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")
    r = lab.tproxy("uninstall", "--ebpf-bpffs-path", own_bpffs)
    assert r.returncode == 0, r.stderr
    assert not kernel.is_bpffs(own_bpffs)


def _blocked_on_flock(pid):
    """Whether pid waits for a flock (a '->' line of /proc/locks names the waiters)."""
    with open("/proc/locks") as f:
        for ln in f:
            parts = ln.split()   # "1: -> FLOCK  ADVISORY  WRITE <pid> <dev:inode> 0 EOF"
            if "->" in parts and "FLOCK" in parts and \
                    parts[parts.index("FLOCK") + 3] == str(pid):
                return True
    return False


def test_two_first_installs_at_once_mount_bpffs_once(lab, own_bpffs):
    """The first install is held just before it mounts; a second one, started then, must
    wait for it (it used to mount a second bpffs on top: 3 rounds in 14)."""
    listeners(lab)
    other = pod_netns(lab)
    first = subprocess.Popen(
        [sys.executable, "-m", "loader.cli", "install", "--kuma-dp-user", DP_USER, "--netns",
         lab.app_ns, "--ebpf-bpffs-path", own_bpffs, "--ebpf-cgroup-path", lab.cgroup],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env=dict(lab.env(), EBPF_TPROXY_TEST_HOLD="1"))
    second = None
    try:
        assert "held at before-mount" in first.stderr.readline()
        second = subprocess.Popen(
            [sys.executable, "-m", "loader.cli", "install", "--kuma-dp-user", DP_USER,
             "--name", "other", "--netns", f"/run/netns/{other}", "--redirect-inbound=false",
             "--ebpf-bpffs-path", own_bpffs, "--ebpf-cgroup-path", lab.cgroup],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=lab.env())
        lab.wait_for(lambda: _blocked_on_flock(second.pid) or second.poll() is not None,
                     "the second install to wait for the first one's lock")
        assert second.poll() is None and not kernel.is_bpffs(own_bpffs)
        first.stdin.close()   # every later hold of the first install reads EOF: go on
        assert first.wait(timeout=120) == 0, first.stderr.read()
        assert second.wait(timeout=120) == 0, second.stderr.read()
    finally:
        for p in (first, second):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait()
                p.stderr.close()
    assert mounts_at(own_bpffs) == 1
    r = lab.tproxy("uninstall", "--all", "--ebpf-bpffs-path", own_bpffs)
    assert r.returncode == 0, r.stderr
    assert mounts_at(own_bpffs) == 0


@pytest.mark.alone("plants directories where the node set's tree is made: before it exists")
def test_directories_planted_by_another_user_are_refused(lab):
    """The lab's bpffs is mode 1777 (the kernel's default): nobody may make directories in
    it. Install must not put root's pins into them."""
    listeners(lab)
    before = snapshot()
    root = NodePaths(lab.bpffs).root
    for planted in (root, os.path.join(root, "node")):
        r = as_nobody("mkdir", "-p", planted)
        assert r.returncode == 0, r.stderr
        r = install(lab, ok=False)
        one_line_refusal(r, f"refusing to use {root}")
        assert "owned by uid 65534" in r.stderr
        assert cgroup_attachments(lab.cgroup) == [] and wait_back_to(before) == {}
        for cmd in (["status"], ["uninstall"], ["uninstall", "--all"]):
            one_line_refusal(lab.tproxy(*cmd), "owned by uid 65534")
        subprocess.run(["rm", "-r", root], check=True)
        if planted == root:
            continue
        # A root directory others may write in is refused as well.
        os.mkdir(root, 0o777)
        os.chmod(root, 0o777)
        one_line_refusal(install(lab, ok=False), "others may write in it (mode 0777)")
        os.rmdir(root)
    install(lab)
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")


@pytest.mark.alone("plants a symlink where the node set's tree is made: before it exists")
def test_a_planted_symlink_is_never_followed(lab, tmp_path):
    listeners(lab)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("root's file")
    root = NodePaths(lab.bpffs).root
    # In place of our directory (made by nobody: the mount is 1777)...
    r = as_nobody("ln", "-s", str(victim), root)
    assert r.returncode == 0, r.stderr
    one_line_refusal(install(lab, ok=False), "it is a symlink")
    one_line_refusal(lab.tproxy("uninstall", "--all"), "it is a symlink")
    assert (victim / "keep").read_text() == "root's file"
    os.unlink(root)
    # ... and inside our tree (as a tree made by an earlier, careless version could hold).
    install(lab)
    planted = os.path.join(root, "node", "netns", "evil")
    os.symlink(str(victim), planted)
    for cmd in (["status"], ["uninstall"], ["uninstall", "--all"]):
        one_line_refusal(lab.tproxy(*cmd), f"refusing to use {planted}: it is a symlink")
    assert (victim / "keep").read_text() == "root's file"
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")   # untouched
    os.unlink(planted)
    r = lab.tproxy("uninstall")
    assert r.returncode == 0, r.stderr
    assert cgroup_attachments(lab.cgroup) == [] and pins(lab.bpffs) == []


def lo_has_v6_6(lab):
    r = subprocess.run(["ip", "-n", lab.app_ns, "-6", "addr", "show", "dev", "lo"],
                       capture_output=True, text=True, check=True)
    return "inet6 ::6/128" in r.stdout


@pytest.mark.parametrize("then", ["uninstall", "install-then-uninstall"])
def test_loader_killed_after_adding_lo_address_leaves_nothing(lab, then):
    listeners(lab)
    before = snapshot()
    assert not lo_has_v6_6(lab)
    killed_at(lab, "after-lo-address")
    assert lo_has_v6_6(lab)
    r = lab.tproxy("status", "--output", "json")
    assert r.returncode == 1, (r.stdout, r.stderr)   # a problem, said with a non-zero exit
    st = json.loads(r.stdout)
    assert any("did not finish" in p for p in st[0]["problems"]), st
    assert not any("detached" in p for p in st[0]["problems"]), st
    if then == "install-then-uninstall":
        install(lab)
        r = lab.tproxy("status")
        assert r.returncode == 0 and "PROBLEM" not in r.stdout, r.stdout
    r = lab.tproxy("uninstall")
    assert r.returncode == 0, r.stderr
    assert not lo_has_v6_6(lab)
    assert cgroup_attachments(lab.cgroup) == [] and pins(lab.bpffs) == []
    assert wait_back_to(before) == {}


def test_commands_as_a_user_without_privileges_say_so(lab):
    install(lab)
    for cmd in (["uninstall"], ["uninstall", "--all"], ["status"],
                ["install", "--kuma-dp-user", DP_USER]):
        r = as_nobody(sys.executable, "-m", "loader.cli", *cmd, "--ebpf-bpffs-path",
                      lab.bpffs)
        one_line_refusal(r, "missing CAP_BPF")
    assert len(cgroup_attachments(lab.cgroup)) > 0   # still installed


def test_namespaces_on_a_parent_and_a_child_cgroup_each_get_their_own_answers(lab):
    """Issue 17's overlap (two instances on a cgroup and its child returned garbage to
    SO_ORIGINAL_DST): with the node program set it is one mechanism, and each namespace's
    connections are answered from its own entries."""
    listeners(lab)
    install(lab)
    child = lab.child_cgroup("inner")
    other = pod_netns(lab)
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--name", "inner", "--netns",
                   f"/run/netns/{other}", "--redirect-inbound=false",
                   "--exclude-outbound-ports", "8000", "--ebpf-cgroup-path", child, netns=False)
    assert r.returncode == 0, r.stderr
    # The lab's application, in the parent cgroup and in the child: its own namespace's
    # settings either way (8000 captured: "inner" excludes it in its namespace only), and
    # the proxy's SO_ORIGINAL_DST is exactly the address it dialed.
    for cg in (lab.cgroup, child):
        r = lab.py("connect", REMOTE_IP4, "8000", in_cgroup=cg)
        line = json.loads(r.stdout)["line"]
        assert line.startswith("out ") and f"orig={REMOTE_IP4}:8000 " in line, (cg, line)
    entries = own(json.loads(lab.tproxy("status", "--output", "json").stdout))
    st = {e["name"]: e for e in entries}
    assert set(st) == {"default", "inner"} and not any(e["problems"] for e in st.values())


def test_seventy_thousand_excluded_cidrs_install_and_a_full_map_is_named(lab, tmp_path):
    """Issue 17: 70,000 excluded CIDRs failed with 'No space left on device' (exit 1). They
    fit; and a registration that would overfill a shared map is refused by name before
    anything is written (the first namespace keeps capturing as it was)."""
    import yaml
    listeners(lab)
    many = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(70_000)]
    f = tmp_path / "many.yaml"
    f.write_text(yaml.safe_dump({"redirect": {"outbound": {
        "excludePortsForIPs": many + [f"{REMOTE_IP4}/32"]}}}))
    install(lab, "--config", str(f))
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("remote ")   # excluded: direct
    # Half of tp_cidrs per namespace at most; two such namespaces cannot both fit.
    half = [f"11.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(500_000)]
    g = tmp_path / "half.json"   # JSON: a long list parses in a fraction of YAML's time
    g.write_text(json.dumps({"redirect": {"outbound": {"excludePortsForIPs": half}}}))
    other = pod_netns(lab)
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--name", "big", "--netns",
                   f"/run/netns/{other}", "--redirect-inbound=false", "--config", str(g),
                   netns=False)
    assert r.returncode == 0, r.stderr
    third = pod_netns(lab)
    before = {e["name"] for e in own(json.loads(lab.tproxy("status", "--output",
                                                              "json").stdout))}
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--name", "bigger", "--netns",
                   f"/run/netns/{third}", "--redirect-inbound=false", "--config", str(g),
                   netns=False)
    one_line_refusal(r, "tp_cidrs is full: this configuration needs 500", code=1)
    after = {e["name"] for e in own(json.loads(lab.tproxy("status", "--output",
                                                             "json").stdout))}
    assert before == after == {"default", "big"}
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("remote ")
