"""The CNI plugin in a chain driven as containerd drives it (cni_driver.py): Debian's
reference bridge + host-local plugins make each pod's interface and address in a "node"
network namespace made by the test, then `ebpf-tproxy` registers the pod's namespace in the
node program set the agent holds. A real HAProxy, as Kuma's sidecar uid 5678, proves what is
captured."""
import json
import os
import subprocess
import sys

import pytest

from loader.cni import plugin as cni_plugin
from loader.lab import PYTHON, sh

from . import residue
from .cni_driver import REFERENCE_PLUGINS, CNIFailure, Runtime
from .cni_node import ANNOTATIONS_CAP, INJECTED, SIDECAR_UID, Node
from .conftest import haproxy_config

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(REFERENCE_PLUGINS, "bridge")),
                                reason="make setup installs containernetworking-plugins")


@pytest.fixture
def node(lab):
    n = Node(lab)
    lab.start_agent("--cni-socket", n.socket)
    return n


def test_chain_captures_a_pods_outbound_and_inbound_through_haproxy(node):
    lab = node.lab
    app = node.add(INJECTED, name="app")
    other = node.add({}, name="other")   # not injected: not captured
    assert node.registration(other) is None
    reg = node.registration(app)
    assert reg and reg["meta"]["labels"]["pod"] == "default/app", node.registrations()
    assert reg["meta"]["config"]["kumaDPUser"] == str(SIDECAR_UID)
    assert "registered by cni: " in lab.tproxy("status").stdout and "pod default/app" in \
        lab.tproxy("status").stdout
    # The sidecar (uid 5678) and the application's server, in the pod (and the cgroup).
    # Inbound, the sidecar passes the connection on from 127.0.0.6, as Envoy does (Kuma's
    # rule: -s 127.0.0.6 -o lo RETURN); from the pod's own address it would be captured
    # again, behind iptables as here.
    cfg = lab.shared_file("haproxy.cfg", haproxy_config(15001, "orig 0.0.0.0:0")
                          + "frontend inbound\n    bind 0.0.0.0:15006\n"
                            "    default_backend inbound_passthrough\n"
                            "backend inbound_passthrough\n"
                            "    server app 0.0.0.0:0 source 127.0.0.6\n")
    proxy = lab.spawn(["haproxy", "-db", "-f", cfg], ns=app.ns, user=SIDECAR_UID, ready=None)
    lab.wait_listening(15006, ns=app.ns, proc=proxy)
    lab.spawn([sys.executable, "-m", "loader.lab.servers", "http", "8080"], ns=app.ns)
    lab.spawn([sys.executable, "-m", "loader.lab.servers", "http", "8080"], ns=other.ns,
              in_cgroup=False)
    # Outbound: the application's request to the other pod goes through the sidecar, which
    # learns the original destination.
    r = lab.run(["curl", "-sS", "-m", "10", f"http://{other.ip}:8080/"], ns=app.ns)
    assert r.returncode == 0, r.stderr
    assert f"server={other.ip}:8080" in r.stdout
    counters = node.registration(app)["counters"]
    assert counters["redirected_outbound"] == 1 and counters["orig_dst_answered"] >= 1
    # Inbound: the other pod's request to the application lands on the sidecar's 15006.
    r = lab.run(["curl", "-sS", "-m", "10", f"http://{app.ip}:8080/"], ns=other.ns,
                in_cgroup=False)
    assert r.returncode == 0, r.stderr
    # The application saw the sidecar's passthrough address: the request went through it.
    assert r.stdout.startswith("client=127.0.0.6:") and f"server={app.ip}:8080" in r.stdout
    assert node.registration(app)["counters"]["redirected_inbound"] == 1
    node.delete(app)
    assert node.registration(app) is None


# Each annotation and the one key of the registered configuration it must change (and
# nothing else): Kuma's legacy CNI annotations (06ed988556^:app/cni/pkg/cni/
# annotations_linux.go) and the control plane's injector names.
ANNOTATION_EFFECTS = [
    ("traffic.kuma.io/exclude-inbound-ports", "8080,9000-9002",
     ("redirect", "inbound", "excludePorts"), "8080,9000-9002"),
    ("traffic.kuma.io/exclude-outbound-ports", "443", ("redirect", "outbound", "excludePorts"),
     "443"),
    ("traffic.kuma.io/exclude-inbound-ips", "10.0.0.0/8",
     ("redirect", "inbound", "excludePortsForIPs"), ["10.0.0.0/8"]),
    ("traffic.kuma.io/exclude-outbound-ips", "10.1.0.0/16,fd00::/8",
     ("redirect", "outbound", "excludePortsForIPs"), ["10.1.0.0/16", "fd00::/8"]),
    ("traffic.kuma.io/exclude-outbound-ports-for-uids", "tcp:22:1000;udp:*:1001",
     ("redirect", "outbound", "excludePortsForUIDs"), ["tcp:22:1000", "udp:1-65535:1001"]),
    ("kuma.io/sidecar-uid", "1234", ("kumaDPUser",), "1234"),
    ("kuma.io/transparent-proxying-inbound-port", "15016", ("redirect", "inbound", "port"),
     15016),
    ("kuma.io/transparent-proxying-outbound-port", "15011", ("redirect", "outbound", "port"),
     15011),
    ("kuma.io/transparent-proxying-ip-family-mode", "ipv4", ("ipFamilyMode",), "ipv4"),
    ("kuma.io/builtin-dns", "disabled", ("redirect", "dns", "captureAll"), False),
    ("kuma.io/builtin-dns-port", "15054", ("redirect", "dns", "port"), 15054),
    ("kuma.io/gateway", "enabled", ("redirect", "inbound", "enabled"), False),
    ("kuma.io/application-probe-proxy-port", "9002", ("redirect", "inbound", "excludePorts"),
     "9002"),
]


def _leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_each_annotation_changes_exactly_its_setting(node):
    base = node.registration(node.add(INJECTED, name="base"))["meta"]["config"]
    assert base["redirect"]["inbound"]["excludePorts"] == "9001"   # Kuma's probe proxy port
    assert base["redirect"]["dns"]["captureAll"] is True            # Kuma's built-in DNS
    for key, value, path, expected in ANNOTATION_EFFECTS:
        pod = node.add(dict(INJECTED, **{key: value}))
        cfg = node.registration(pod)["meta"]["config"]
        changed = {p for p, v in _leaves(cfg) if dict(_leaves(base)).get(p) != v}
        if key == "traffic.kuma.io/exclude-inbound-ports":
            expected = "8080,9000-9002"   # 9001, the probe port, is inside the range
        if key == "kuma.io/builtin-dns":
            assert changed == {("redirect", "dns", "captureAll"),
                               ("redirect", "dns", "enabled")}, key
        elif key == "kuma.io/gateway":
            # A gateway has no inbound redirect, so no probe port is kept out of it either.
            assert changed == {path, ("redirect", "inbound", "excludePorts")}, key
        else:
            assert changed == {path}, (key, changed)
        got = cfg
        for p in path:
            got = got[p]
        assert got == expected, (key, got)
        node.delete(pod)


@pytest.mark.parametrize("key,value", [
    ("traffic.kuma.io/exclude-inbound-ports", "70000"),
    ("traffic.kuma.io/exclude-outbound-ips", "10.0.0.0/33"),
    ("kuma.io/sidecar-uid", "kuma-dp-nobody-knows"),
    ("kuma.io/gateway", "maybe"),
    ("traffic.kuma.io/transparent-proxy-config", "redirect: [unclosed"),
])
def test_a_bad_annotation_fails_add_naming_it_and_leaves_nothing(node, key, value):
    before = node.registrations()
    with pytest.raises(CNIFailure) as e:
        node.add(dict(INJECTED, **{key: value}))
    assert e.value.plugin == cni_plugin.PLUGIN_TYPE
    assert e.value.code == 100, e.value.stdout
    assert key in e.value.msg, e.value.msg
    assert node.registrations() == before


def test_del_succeeds_when_the_entry_or_the_namespace_is_gone(node):
    pod = node.add(INJECTED)
    node.delete(pod)
    node.delete(pod)   # the entry is gone (and no cached result): DEL again succeeds
    gone = node.add(INJECTED)
    sh("ip", "netns", "del", gone.ns)
    node.lab.extra_ns.remove(gone.ns)
    node.delete(gone)  # the namespace is gone: DEL still succeeds and removes the entry
    assert node.registration(gone) is None


def test_check_passes_then_fails_when_the_annotations_changed(node):
    pod = node.add(INJECTED)
    node.runtime.check(pod.container_id, pod.netns, args=pod.args,
                       capability_args={ANNOTATIONS_CAP: pod.annotations})
    changed = dict(INJECTED, **{"traffic.kuma.io/exclude-outbound-ports": "443"})
    with pytest.raises(CNIFailure) as e:
        node.runtime.check(pod.container_id, pod.netns, args=pod.args,
                           capability_args={ANNOTATIONS_CAP: changed})
    assert e.value.code == 102 and "differs" in e.value.msg


def test_excluded_kubernetes_namespace_is_not_captured(node):
    pod = node.add(INJECTED, pod_ns="kube-system")
    assert node.registration(pod) is None


def test_fifty_pods_added_and_deleted_leave_no_residue(node, capsys):
    """Also the ADD latency of the plugin alone (reported, never asserted)."""
    lab = node.lab
    first = node.add(INJECTED)   # the node set's links exist from here on
    node.delete(first)
    before = residue.snapshot()
    pins_before = sorted(os.listdir(os.path.join(lab.bpffs, "ebpf-tproxy")))
    node.runtime.timings.clear()
    pods = [node.add(dict(INJECTED, **({"kuma.io/gateway": "enabled"} if i % 2 else {})))
            for i in range(50)]
    assert len(node.registrations()) == 50
    for pod in pods:
        node.delete(pod)
    assert node.registrations() == {}
    assert residue.wait_back_to(before) == {}
    assert sorted(os.listdir(os.path.join(lab.bpffs, "ebpf-tproxy"))) == pins_before
    adds = sorted(t for p, verb, t in node.runtime.timings
                  if p == cni_plugin.PLUGIN_TYPE and verb == "ADD")
    with capsys.disabled():
        print(f"\n  ebpf-tproxy ADD over {len(adds)} pods: p50 {adds[len(adds) // 2]:.3f} s, "
              f"p99 {adds[min(len(adds) - 1, int(len(adds) * 0.99))]:.3f} s")


@pytest.mark.parametrize("via", ["shim", "direct"])
def test_add_without_the_agent_fails_try_again_later_and_never_compiles(lab, via):
    node = Node(lab, via)   # no agent: nothing loaded the node program set
    with pytest.raises(CNIFailure) as e:
        node.add(INJECTED)
    assert e.value.code == 11 and "agent" in e.value.msg, e.value.msg
    assert not os.path.exists(os.path.join(lab.bpffs, "ebpf-tproxy", "node"))


def test_the_plugin_in_its_own_process_registers_and_removes(lab):
    """ebpf-tproxy-cni (no shim): the node set loaded, no agent running."""
    from loader import lifecycle
    node = Node(lab, "direct")
    lifecycle.load_node(lab.bpffs)
    keep = node.add(INJECTED)      # the node set stays while one namespace is registered
    pod = node.add(INJECTED)
    assert node.registration(pod)["meta"]["labels"]["container_id"] == pod.container_id
    node.delete(pod)
    assert node.registration(pod) is None and node.registration(keep) is not None


def test_status_and_gc_at_spec_1_1(node):
    entry = dict(node.entry)
    rt = Runtime(node.ns, node.bin_dir, {"cniVersion": "1.1.0", "name": "tp-pods",
                                         "plugins": [entry]}, env=node.lab.env())
    assert rt.status(entry) is None
    keep, drop = node.add(INJECTED), node.add(INJECTED)
    rt.gc(entry, [(keep.container_id, "eth0")])
    assert node.registration(keep) is not None
    assert node.registration(drop) is None


def test_version_lists_the_spec_versions(node):
    out = node.runtime.exec_plugin(node.entry, "VERSION", {"cniVersion": "1.0.0"})
    assert out == {"cniVersion": "1.0.0",
                   "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


def _kuma_init(lab, pod_ns, cfg):
    """kuma-init's command inside the pod (its network namespace, the node's bpffs): Kuma's
    config file, no --name, the API server's variables set as in every pod."""
    argv = lab.command([PYTHON, "-m", "loader.cli", "install", "--config", cfg,
                        "--ebpf-bpffs-path", lab.bpffs, "--ebpf-cgroup-path", lab.cgroup],
                       ns=pod_ns)
    return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env=dict(lab.env(), KUBERNETES_SERVICE_HOST="10.96.0.1"))


@pytest.mark.parametrize("agent", [True, False], ids=["agent", "no-agent"])
def test_kuma_init_registers_its_pod_by_namespace(lab, agent):
    from loader import lifecycle, netns
    if agent:
        lab.start_agent()
    else:
        lifecycle.load_node(lab.bpffs)
    # Kuma's generated config: the sidecar's uid, which this host's user database lacks.
    cfg = lab.shared_file("config.yaml", "kumaDPUser: '5678'\nredirect:\n  dns:\n"
                                         "    enabled: true\n    captureAll: true\n")
    pods = [lab.add_netns(), lab.add_netns()]
    for ns in pods:
        r = _kuma_init(lab, ns, cfg)
        assert r.returncode == 0, r.stderr
        assert ("no ebpf-tproxy agent serves" in r.stderr) is not agent, r.stderr
    names = {n: s for n, s in ((s["name"], s) for s in json.loads(
        lab.tproxy("status", "--output", "json").stdout))}
    for ns in pods:
        reg = names[f"pod-{netns.inode_of('/run/netns/' + ns)}"]
        assert reg["meta"]["config"]["kumaDPUser"] == "5678"
