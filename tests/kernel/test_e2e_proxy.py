"""End to end: curl in the application's cgroup, through a real unmodified proxy that
asks SO_ORIGINAL_DST, to an HTTP server on another host of the lab."""
import json
import shutil
import sys

import pytest

from loader.lab import APP_IP4, APP_IP6, REMOTE_IP4, REMOTE_IP6

from .conftest import DP_UID, haproxy_config, install

# A clean lab and one with conntrack active, as on hosts with Docker, kube-proxy or
# firewalld: SO_ORIGINAL_DST must be ours in both.
CONNTRACK_BOTH = True
NEIGHBOURS_TOO = True   # also in a node already serving other namespaces (conftest)


def curl(lab, url):
    r = lab.run(["curl", "-sS", "-m", "10", "-g", "-w", "\\n%{remote_ip} %{remote_port}", url])
    assert r.returncode == 0, r.stderr
    body, _, peer = r.stdout.rpartition("\n")
    return body, peer


@pytest.fixture
def server(lab):
    lab.spawn([sys.executable, "-m", "loader.lab.servers", "http", "8080"], ns=lab.remote_ns,
              in_cgroup=False)
    return lab


@pytest.mark.kernel_ci
def test_haproxy_debian_package_learns_original_destination(server):
    lab = server
    assert shutil.which("haproxy"), "make setup installs haproxy"
    cfg = lab.shared_file("haproxy.cfg", haproxy_config(15001, "orig 0.0.0.0:0"))
    install(lab)
    proc = lab.spawn(["haproxy", "-db", "-f", cfg], user=DP_UID, ready=None)
    lab.wait_listening(15001, proc=proc)
    body, peer = curl(lab, f"http://{REMOTE_IP4}:8080/")
    # The server saw the application's address (the proxy's upstream leaves from it) ...
    assert body.startswith(f"client={APP_IP4}:"), body
    assert f"server={REMOTE_IP4}:8080" in body
    # ... and curl's view of its peer is the original destination, not 127.0.0.1:15001.
    assert peer == f"{REMOTE_IP4} 8080"
    st = json.loads(lab.tproxy("status", "--output", "json").stdout)
    assert st[0]["counters"]["orig_dst_answered"] == 1


def test_ipv6_end_to_end_through_the_lab_proxy(server):
    # HAProxy 2.6 asks SO_ORIGINAL_DST for IPv4 only; the IPv6 path is shown with the
    # lab's proxy, which asks SOL_IPV6/IP6T_SO_ORIGINAL_DST like Envoy does.
    lab = server
    install(lab)
    lab.spawn([sys.executable, "-m", "loader.lab.servers", "proxy", "--port", "15001"],
              user=DP_UID)
    body, peer = curl(lab, f"http://[{REMOTE_IP6}]:8080/")
    assert body.startswith(f"client=[{APP_IP6}]:"), body
    assert peer == f"{REMOTE_IP6} 8080"


@pytest.mark.parametrize("app_ip", [APP_IP4, APP_IP6], ids=["ipv4", "ipv6"])
def test_inbound_end_to_end_through_the_lab_proxy(lab, app_ip):
    # A client on the remote host calls the application's HTTP server; the proxy's
    # inbound side learns the address it dialed and passes the request on from 127.0.0.6
    # (::6), as Envoy's inbound passthrough does.
    lab.spawn([sys.executable, "-m", "loader.lab.servers", "http", "8080"])
    install(lab)
    lab.spawn([sys.executable, "-m", "loader.lab.servers", "proxy", "--port", "15006",
               "--passthrough"], user=DP_UID)
    host = f"[{app_ip}]" if ":" in app_ip else app_ip
    r = lab.run(["curl", "-sS", "-g", "-m", "10", f"http://{host}:8080/"], ns=lab.remote_ns,
                in_cgroup=False)
    assert r.returncode == 0, r.stderr
    passthrough = "[::6]" if ":" in app_ip else "127.0.0.6"
    assert r.stdout.startswith(f"client={passthrough}:"), r.stdout
    assert f"server={host}:8080" in r.stdout
