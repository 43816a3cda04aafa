"""The node model: one program set per bpffs, each network namespace a set of map entries.
Programs are loaded once; installs after the first need no compiler; namespaces with
different settings capture side by side without cross-talk; uninstalling one leaves the
others capturing; a namespace deleted without uninstall is found and cleaned; a previous
layout's pins are refused with one line and removed by uninstall --all."""
import ctypes as ct
import json
import os
import subprocess
import sys

import pytest

from loader import abi
from loader.lab import REMOTE_IP4

from .conftest import CGROUP_HOOKS, DP_USER, install, listeners, own, pod_netns, reached
from .residue import cgroup_attachments, pins, snapshot, wait_back_to

# A destination routed out of each extra namespace's own veth pair (nothing answers
# there): what counts is how connect() was decided, which the namespace's counters say.
FAR = "198.51.100.77"


def status(lab, name=None):
    """status's entries for the test's own namespaces (not a neighbours lab's)."""
    r = lab.tproxy("status", "--output", "json", *(["--name", name] if name else []))
    assert r.returncode == 0, r.stderr
    return own(json.loads(r.stdout))


pod = pod_netns


def install_in(lab, ns, name, *args, env=None):
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--name", name, "--netns",
                   f"/run/netns/{ns}", "--redirect-inbound=false", *args, netns=False,
                   **({"env": env} if env else {}))
    assert r.returncode == 0, r.stderr
    return r


def try_connect(lab, ns, port):
    """One connect() from the namespace (in the lab's cgroup); its outcome is not asked."""
    code = ("import socket\ns = socket.socket()\ns.settimeout(0.3)\n"
            f"try:\n    s.connect(({FAR!r}, {port}))\nexcept OSError:\n    pass\n")
    r = lab.run([sys.executable, "-c", code], ns=ns)
    assert r.returncode == 0, r.stderr


def our_prog_ids(lab):
    """The ids of the programs of the lab's node set: attached at its cgroup (what bpftool
    cgroup list shows) and pinned. Other BPF users of the machine do not count."""
    from loader import bpfsys, node
    paths = node.NodePaths(lab.bpffs)
    meta = node.read_meta(paths)
    pinned = []
    for name in meta["programs"]:
        fd = bpfsys.obj_get(paths.prog(meta["digest"], name))
        try:
            pinned.append(bpfsys.prog_info(fd)["id"])
        finally:
            os.close(fd)
    return sorted(cgroup_attachments(lab.cgroup)), sorted(pinned)


def test_programs_are_loaded_once_and_installs_after_the_first_need_no_compiler(lab, tmp_path):
    listeners(lab)
    install(lab)
    first = our_prog_ids(lab)
    # A bcc that cannot be imported: every later install must get by without it.
    fake = tmp_path / "nobcc" / "bcc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('bcc imported on the fast path')\n")
    env = dict(lab.env(), PYTHONPATH=f"{fake.parent}:{lab.env().get('PYTHONPATH', '')}")
    for i in range(19):
        install_in(lab, lab.add_netns(), f"ns{i}", env=env)
    again = install(lab, "--exclude-outbound-ports", "8000")
    assert again.returncode == 0
    assert our_prog_ids(lab) == first
    st = status(lab)
    assert len(st) == 20 and all(not e["problems"] for e in st), st
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("remote ")   # new config
    assert reached(lab, REMOTE_IP4, 8001)["line"].startswith("out ")


@pytest.mark.kernel_ci
def test_namespaces_side_by_side_each_decide_by_their_own_settings(lab):
    listeners(lab)
    install(lab, "--exclude-outbound-ports", "8001")
    pods = [pod(lab) for _ in range(3)]
    for i, ns in enumerate(pods):
        install_in(lab, ns, f"pod{i}", "--exclude-outbound-ports", str(9000 + i))
    for i, ns in enumerate(pods):
        for j in range(3):
            try_connect(lab, ns, 9000 + j)
    # The lab's own namespace keeps its settings next to them.
    assert reached(lab, REMOTE_IP4, 8001)["line"].startswith("remote ")
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")
    by_name = {e["name"]: e["counters"] for e in status(lab)}
    for i in range(3):
        c = by_name[f"pod{i}"]
        assert (c["excluded_port"], c["redirected_outbound"]) == (1, 2), (i, c)
    assert (by_name["default"]["excluded_port"], by_name["default"]["redirected_outbound"]) \
        == (1, 1)


def test_uninstalling_one_namespace_leaves_the_others_capturing(lab):
    listeners(lab)
    before = snapshot()
    install(lab)
    other = pod(lab)
    install_in(lab, other, "other")
    r = lab.tproxy("uninstall", "--name", "other")
    assert r.returncode == 0, r.stderr
    assert [e["name"] for e in status(lab)] == ["default"]
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")
    assert len(cgroup_attachments(lab.cgroup)) == CGROUP_HOOKS
    r = lab.tproxy("uninstall", "--name", "default")   # the last one: everything goes
    assert r.returncode == 0, r.stderr
    assert cgroup_attachments(lab.cgroup) == [] and pins(lab.bpffs) == []
    assert wait_back_to(before) == {}


def test_a_namespace_deleted_without_uninstall_is_cleaned_up(lab):
    listeners(lab)
    install(lab)
    gone = pod(lab)
    install_in(lab, gone, "gone", "--exclude-outbound-ports", "4444")
    cookie = next(e for e in status(lab) if e["name"] == "gone")["meta"]["netns_cookie"]
    lab.ip(gone, "link", "del", "d0")
    subprocess.run(["ip", "netns", "del", gone], check=True)
    lab.extra_ns.remove(gone)
    st = status(lab)
    assert [e["name"] for e in st if not e.get("removed")] == ["default"], st
    assert any(e["name"] == "gone" and e.get("removed") for e in st), st
    from loader import namespace, node
    with namespace.NodeMaps(node.NodePaths(lab.bpffs)) as maps:
        assert maps.config(cookie) is None
        assert not [k for k in maps.ports.keys() if k.netns_cookie == cookie]
        assert not [k for k in maps.cidrs.keys()
                    if (k.netns_hi << 32 | k.netns_lo) == cookie]
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")


def test_an_address_of_another_registered_namespace_is_refused_for_inbound(lab):
    listeners(lab)
    install(lab)
    twin = lab.add_netns()
    lab.ip(twin, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
    app_addrs = status(lab)[0]["meta"]["registered_addresses"]
    assert app_addrs, "the lab's app namespace registered no address for sk_lookup"
    lab.ip(twin, "addr", "add", f"{app_addrs[0]}/32", "dev", "d0")   # the app's address
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--name", "twin", "--netns",
                   f"/run/netns/{twin}", netns=False)
    assert r.returncode == 1 and "another registered namespace" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert [e["name"] for e in status(lab)] == ["default"]


LEGACY_REV = "1418651"   # the last commit of the layout with a program set per instance


def test_the_previous_layout_is_refused_and_removed_by_uninstall_all(lab, tmp_path):
    """Pins of the previous commit's layout (installed by that commit's own loader) make
    install refuse with one line that says what to run; uninstall --all removes them."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", repo, "archive", LEGACY_REV, "loader", "bpf"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    listeners(lab)
    before = snapshot()
    env = dict(lab.env(), PYTHONPATH=str(old))
    r = subprocess.run([sys.executable, "-m", "loader.cli", "install", "--kuma-dp-user",
                        DP_USER, "--netns", lab.app_ns, "--ebpf-bpffs-path", lab.bpffs,
                        "--ebpf-cgroup-path", lab.cgroup], env=env, cwd=str(old),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")
    r = install(lab, ok=False)
    assert r.returncode == 1 and "uninstall --all" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = lab.tproxy("uninstall", "--all")
    assert r.returncode == 0, r.stderr
    assert cgroup_attachments(lab.cgroup) == [] and pins(lab.bpffs) == []
    assert wait_back_to(before) == {}
    install(lab)
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")


def test_250_namespaces_each_decide_by_their_own_settings(lab):
    """A node of 250 pods (Kubernetes allows 110 by default): every namespace registered
    with settings of its own; a sample of them decide by theirs, none by a neighbour's."""
    listeners(lab)
    install(lab, "--exclude-outbound-ports", "8001")
    pods = []
    for i in range(249):
        ns = pod(lab)
        install_in(lab, ns, f"pod{i:03d}", "--exclude-outbound-ports", str(9000 + i % 7))
        pods.append(ns)
    st = status(lab)
    assert len(st) == 250 and all(not e["problems"] for e in st)
    sample = [0, 1, 6, 100, 248]
    for i in sample:
        for port in (9000 + i % 7, 9000 + (i + 1) % 7):
            try_connect(lab, pods[i], port)
    by_name = {e["name"]: e["counters"] for e in status(lab)}
    for i in sample:
        c = by_name[f"pod{i:03d}"]
        assert (c["excluded_port"], c["redirected_outbound"]) == (1, 1), (i, c)
    untouched = [n for n, c in by_name.items() if n.startswith("pod") and
                 int(n[3:]) not in sample and (c["excluded_port"] or c["redirected_outbound"])]
    assert untouched == []
    assert reached(lab, REMOTE_IP4, 8001)["line"].startswith("remote ")
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")


def test_a_node_set_of_another_map_layout_is_refused_not_silently_replaced(lab):
    """New maps could hold neither the namespaces the old ones register nor the answers in
    flight: install refuses with one line, and uninstall --all clears the node."""
    listeners(lab)
    before = snapshot()
    install(lab)
    from loader import node
    os.mkdir(os.path.join(node.NodePaths(lab.bpffs).node, "maps-v99"))   # a later layout's
    r = install(lab, ok=False)
    assert r.returncode == 1 and "maps-v99" in r.stderr and "uninstall --all" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")   # still capturing
    r = lab.tproxy("uninstall", "--all")
    assert r.returncode == 0, r.stderr
    assert cgroup_attachments(lab.cgroup) == [] and pins(lab.bpffs) == []
    assert wait_back_to(before) == {}


def test_a_refused_install_leaves_the_namespace_registered_before_it_alone(lab):
    """The same namespace under a second name is refused before anything is written: the
    first registration keeps its configuration and keeps capturing."""
    listeners(lab)
    install(lab)
    r = install(lab, "--name", "again", ok=False)
    assert r.returncode == 1 and "already registered as 'default'" in r.stderr, r.stderr
    assert [e["name"] for e in status(lab)] == ["default"]
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")
    r = lab.tproxy("uninstall", "--name", "again")
    assert r.returncode == 0 and "nothing to uninstall" in r.stdout
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")


@pytest.mark.parametrize("name", ["..", ".", "a/b", "node/../.."])
def test_uninstall_refuses_a_name_that_is_not_one(lab, name):
    listeners(lab)
    install(lab)
    before = pins(lab.bpffs)
    r = lab.tproxy("uninstall", "--name", name)
    assert r.returncode != 0 and "--name" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert pins(lab.bpffs) == before
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")


def test_a_pinned_map_of_another_size_is_refused_never_read_into_a_short_buffer(lab):
    """A map whose value is larger than this version's type (another layout's) would make
    the kernel write past the buffer given to it: the loader refuses to read it, and
    uninstall --all still removes everything."""
    listeners(lab)
    before = snapshot()
    install(lab)
    from loader import bpfsys, node
    pin = node.NodePaths(lab.bpffs).map("tp_node")
    os.unlink(pin)
    bigger = bpfsys.libbpf()
    bigger.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32,
                                      ct.c_uint32, ct.c_void_p]
    fd = bigger.bpf_map_create(2, b"tp_node", 4, 2 * (abi.TP_META_SIZE + 4), 1, None)
    assert fd >= 0
    bpfsys.obj_pin(fd, pin)
    os.close(fd)
    for cmd in (["status"], ["uninstall", "--name", "default"]):
        r = lab.tproxy(*cmd)
        assert "another layout" in (r.stdout + r.stderr), (cmd, r.stdout, r.stderr)
    r = install(lab, ok=False)
    assert r.returncode == 1 and "another layout" in r.stderr, r.stderr
    assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out ")   # left as it was
    r = lab.tproxy("uninstall", "--all")
    assert r.returncode == 0, r.stderr
    assert cgroup_attachments(lab.cgroup) == [] and pins(lab.bpffs) == []
    assert wait_back_to(before) == {}
