"""Inbound capture (Kuma's nat PREROUTING -> 15006) with sk_lookup: connections from
another host of the lab land on the proxy's inbound listener with the address the client
dialed as SO_ORIGINAL_DST and getsockname(), unless a Kuma rule says otherwise."""
import json
import select
import subprocess
import sys

import pytest

from loader.lab import APP_IP4, APP_IP6, REMOTE_IP4

from .conftest import DP_UID, haproxy_config, install
from .residue import cgroup_attachments, pins, snapshot, wait_back_to

# A clean lab and one with conntrack active, as on hosts with Docker, kube-proxy or
# firewalld: SO_ORIGINAL_DST must be ours in both.
CONNTRACK_BOTH = True
NEIGHBOURS_TOO = True   # also in a node already serving other namespaces (conftest)

LS = [sys.executable, "-m", "loader.lab.servers"]


def from_remote(lab, host, port):
    """A connection from the remote host; the reply line says who accepted it."""
    r = lab.py("connect", host, str(port), ns=lab.remote_ns, in_cgroup=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["line"]


@pytest.fixture
def pod(lab):
    """The proxy's listeners (DP user) and the application's services (root) beside it."""
    lab.proxy = lab.spawn(LS + ["listen", "out:15001", "in:15006"], user=DP_UID)
    lab.spawn(LS + ["listen", "app:8080", "app:8081", "ssh:22"])
    return lab


def fmt(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@pytest.mark.parametrize("host", [APP_IP4, APP_IP6], ids=["ipv4", "ipv6"])
@pytest.mark.kernel_ci
def test_connections_from_another_host_land_on_the_inbound_listener(pod, host):
    install(pod)
    for port in (8080, 8081, 9999):
        line = from_remote(pod, host, port)
        # orig= is SO_ORIGINAL_DST, local= is getsockname(): both the dialed address.
        assert line.startswith(f"in orig={fmt(host, port)} "), line
        assert line.endswith(f" local={fmt(host, port)}"), line


def test_ssh_port_is_excluded_by_default(pod):
    install(pod)
    assert from_remote(pod, APP_IP4, 22).startswith("ssh ")


def test_explicit_exclude_ports_replace_the_default(pod):
    install(pod, "--exclude-inbound-ports", "8080")
    assert from_remote(pod, APP_IP4, 8080).startswith("app ")
    assert from_remote(pod, APP_IP4, 22).startswith("in ")      # 22 no longer excluded
    assert from_remote(pod, APP_IP4, 8081).startswith("in ")


def test_excluded_source_cidr_goes_direct(pod):
    install(pod, "--exclude-inbound-ips", f"203.0.113.0/24,{REMOTE_IP4}/32")
    assert from_remote(pod, APP_IP4, 8080).startswith("app ")
    assert from_remote(pod, APP_IP6, 8080).startswith("in ")    # the remote's IPv6 is not


def test_include_ports_capture_only_those(pod, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("redirect:\n  inbound:\n    includePorts: [8081]\n")
    install(pod, "--config", str(cfg))
    assert from_remote(pod, APP_IP4, 8080).startswith("app ")
    assert from_remote(pod, APP_IP4, 8081).startswith("in ")


def test_redirect_inbound_false_leaves_inbound_alone(pod):
    install(pod, "--redirect-inbound=false")
    assert from_remote(pod, APP_IP4, 8080).startswith("app ")
    assert from_remote(pod, APP_IP6, 8081).startswith("app ")
    # outbound capture is still in force
    r = pod.py("connect", REMOTE_IP4, "15001")
    assert json.loads(r.stdout)["line"].startswith("out ")


def test_ipv4_family_mode_leaves_ipv6_inbound_alone(pod):
    install(pod, "--ip-family-mode", "ipv4")
    assert from_remote(pod, APP_IP6, 8080).startswith("app ")
    assert from_remote(pod, APP_IP4, 8080).startswith("in ")


def test_local_connections_are_not_inbound(pod):
    # The application calling its own address is handled by the outbound rules (4e):
    # nat PREROUTING never sees it.
    install(pod)
    r = pod.py("connect", APP_IP4, "8080")
    assert json.loads(r.stdout)["line"].startswith("app ")


def test_no_proxy_means_refused_and_a_restart_is_picked_up_at_listen(lab):
    lab.spawn(LS + ["listen", "app:8080"])
    install(lab)
    # No proxy listening yet: refused, never delivered around the proxy.
    assert from_remote(lab, APP_IP4, 8080) == "REFUSED"
    proxy = lab.spawn(LS + ["listen", "in:15006"], user=DP_UID)
    # Registered by sock_ops at listen(), before "ready": the first connection is captured.
    assert from_remote(lab, APP_IP4, 8080).startswith("in ")
    proxy.kill()
    proxy.wait()
    assert from_remote(lab, APP_IP4, 8080) == "REFUSED"
    lab.spawn(LS + ["listen", "in:15006"], user=DP_UID)
    assert from_remote(lab, APP_IP4, 8080).startswith("in ")
    assert from_remote(lab, APP_IP6, 8080).startswith("in ")


def test_proxy_listening_before_install_is_registered_by_install(pod):
    install(pod)   # the pod fixture's proxy was listening before this
    st = json.loads(pod.tproxy("status", "--output", "json").stdout)[0]
    assert st["inbound_listeners"], st
    assert from_remote(pod, APP_IP4, 8080).startswith("in ")


def test_established_connection_survives_install_and_uninstall(lab):
    lab.spawn(LS + ["echo", "8082"])
    lab.spawn(LS + ["listen", "in:15006"], user=DP_UID)
    hold = lab.spawn(LS + ["hold", APP_IP4, "8082"], ns=lab.remote_ns, in_cgroup=False,
                     stdin=subprocess.PIPE)

    def echo(word):
        hold.stdin.write(word.encode() + b"\n")
        hold.stdin.flush()
        ready, _, _ = select.select([hold.stdout], [], [], 10)
        return hold.stdout.readline().decode().strip() if ready else "no echo in 10 s"

    assert echo("before") == "before"
    install(lab)
    assert from_remote(lab, APP_IP4, 8082).startswith("in ")   # new ones are captured
    assert echo("during") == "during"
    assert lab.tproxy("uninstall").returncode == 0
    assert echo("after") == "after"


def test_uninstall_releases_inbound_and_leaves_nothing(pod):
    before = snapshot()
    install(pod)
    assert from_remote(pod, APP_IP4, 8080).startswith("in ")
    assert pod.tproxy("uninstall").returncode == 0
    assert from_remote(pod, APP_IP4, 8080).startswith("app ")
    assert cgroup_attachments(pod.cgroup) == [] and pins(pod.bpffs) == []
    assert wait_back_to(before) == {}


def test_haproxy_inbound_passthrough(lab, conntrack):
    lab.spawn(LS + ["listen", "app:8080"])
    # 0.0.0.0:0: the original destination; source 127.0.0.6 is how Envoy's inbound
    # passthrough reaches the application without being captured again (Kuma rule 4c).
    cfg = lab.shared_file("haproxy-in.cfg",
                          haproxy_config(15006, "app 0.0.0.0:0 source 127.0.0.6"))
    install(lab)
    proc = lab.spawn(["haproxy", "-db", "-f", cfg], user=DP_UID, ready=None)
    lab.wait_listening(15006, proc=proc)
    line = from_remote(lab, APP_IP4, 8080)
    # The application answered, through HAProxy, seeing the passthrough source. (The
    # application's own SO_ORIGINAL_DST: nothing without conntrack; with it, the kernel's
    # answer for a connection nobody redirected, its own address, as behind iptables.)
    orig = f"{APP_IP4}:8080" if conntrack else "-"
    assert line.startswith(f"app orig={orig} peer=127.0.0.6:"), line
    assert line.endswith(f"local={APP_IP4}:8080")


def test_a_loopback_listener_never_displaces_the_proxy(lab):
    # Kuma's validator listens on 127.0.0.1:15006 as the DP user. Beside a proxy that
    # listens on the pod's address, it must not take (or, closing, empty) its place.
    lab.spawn(LS + ["listen", "in:15006", "--host", APP_IP4], user=DP_UID)
    lab.spawn(LS + ["listen", "app:8080"])
    install(lab)
    assert from_remote(lab, APP_IP4, 8080).startswith("in ")
    r = lab.run(LS + ["validator"], user=DP_UID)
    assert r.returncode == 0, r.stdout + r.stderr
    assert from_remote(lab, APP_IP4, 8080).startswith("in ")
