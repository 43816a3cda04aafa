"""DNS capture (Kuma's DNS rules) with real resolvers: glibc (getent, Python's
getaddrinfo) and dig, plus connected and unconnected UDP sockets, IPv4 and IPv6.

The lab: kuma-dp's DNS server on the DNS port in the app namespace answers every name with
240.0.0.1 ("mesh"); the real upstream resolver on the remote host answers 198.18.0.99.
The answer therefore says which server was reached."""
import json
import sys

import pytest

from loader.lab import REMOTE_IP4, REMOTE_IP6

from .conftest import APP_UID, DP_UID, OTHER_UID, install

# A clean lab and one with conntrack active, as on hosts with Docker, kube-proxy or
# firewalld: SO_ORIGINAL_DST must be ours in both.
CONNTRACK_BOTH = True
NEIGHBOURS_TOO = True   # also in a node already serving other namespaces (conftest)

MESH, UPSTREAM = "240.0.0.1", "198.18.0.99"
OTHER_RESOLVER = "198.18.0.4"     # a second resolver on the remote host, not in resolv.conf
LS = [sys.executable, "-m", "loader.lab.servers"]


@pytest.fixture
def dns(lab):
    lab.ip(lab.remote_ns, "addr", "add", f"{OTHER_RESOLVER}/24", "dev", lab.veth[1])
    lab.spawn(LS + ["dns", "53", "--a", UPSTREAM, "--aaaa", "fd00:7470::99"],
              ns=lab.remote_ns, in_cgroup=False)
    lab.spawn(LS + ["dns", "15053", "--a", MESH, "--aaaa", "fd00::240"], user=DP_UID)
    lab.resolv = lab.shared_file("resolv.conf",
                                 f"nameserver {REMOTE_IP4}\nnameserver {REMOTE_IP6}\n")
    lab.config = lab.shared_file("dns.yaml",
                                 f"redirect:\n  dns:\n    resolvConfigPath: {lab.resolv}\n")
    return lab


def query(lab, server, connected=False, user=APP_UID):
    r = lab.py("query", server, "demo.mesh", *(["--connected"] if connected else []),
               user=user)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def getent(lab, user=APP_UID):
    r = lab.run(["getent", "ahostsv4", "demo.mesh"], user=user, resolv=lab.resolv)
    return r.stdout.split()[0] if r.returncode == 0 else f"failed: {r.returncode}"


def test_glibc_and_python_resolvers_get_the_mesh_answer(dns):
    install(dns, "--redirect-dns", "--config", dns.config)
    assert getent(dns) == MESH
    r = dns.run([sys.executable, "-c", "import socket; print(socket.getaddrinfo("
                 "'demo.mesh', 80, socket.AF_INET)[0][4][0])"], resolv=dns.resolv)
    assert r.stdout.strip() == MESH, r.stderr


def test_the_dp_users_queries_reach_the_upstream_resolver(dns):
    install(dns, "--redirect-dns", "--config", dns.config)
    assert getent(dns, user=DP_UID) == UPSTREAM
    assert getent(dns) == MESH


def test_dig_accepts_the_answer(dns):
    install(dns, "--redirect-dns", "--config", dns.config)
    r = dns.run(["dig", "+short", "+tries=1", "+time=3", f"@{REMOTE_IP4}", "demo.mesh", "A"])
    assert r.stdout.strip() == MESH, r.stdout + r.stderr
    # dig warns about a reply from an address it did not ask; the source was restored.
    assert "unexpected source" not in r.stdout + r.stderr


# make kernels-ci takes two of the four: sendmsg4 and connect6 (each family's hooks once).
CI = pytest.mark.kernel_ci


@pytest.mark.parametrize("connected,server", [
    pytest.param(False, REMOTE_IP4, id="sendto-ipv4", marks=CI),
    pytest.param(False, REMOTE_IP6, id="sendto-ipv6"),
    pytest.param(True, REMOTE_IP4, id="connect-ipv4"),
    pytest.param(True, REMOTE_IP6, id="connect-ipv6", marks=CI)])
def test_udp_sockets_connected_and_not(dns, server, connected):
    install(dns, "--redirect-dns", "--config", dns.config)
    r = query(dns, server, connected)
    host = f"[{server}]" if ":" in server else server
    assert r.get("answer") == MESH, r
    assert r["from"] == f"{host}:53"            # recvmsg shows the server that was asked
    if connected:
        assert r["getpeername"] == f"{host}:53"


def test_resolv_conf_mode_leaves_other_resolvers_alone(dns):
    install(dns, "--redirect-dns", "--config", dns.config)
    assert query(dns, OTHER_RESOLVER)["answer"] == UPSTREAM


def test_capture_all_takes_every_udp_53(dns):
    install(dns, "--redirect-all-dns-traffic", "--config", dns.config)
    assert query(dns, OTHER_RESOLVER)["answer"] == MESH
    assert query(dns, REMOTE_IP4)["answer"] == MESH


def test_no_dns_capture_without_the_flag(dns):
    install(dns, "--config", dns.config)
    assert query(dns, REMOTE_IP4)["answer"] == UPSTREAM


def test_excluded_ip_applies_to_dns(dns):
    install(dns, "--redirect-dns", "--config", dns.config, "--exclude-outbound-ips",
            f"{REMOTE_IP4}/32")
    assert query(dns, REMOTE_IP4)["answer"] == UPSTREAM
    assert query(dns, REMOTE_IP6)["answer"] == MESH


def test_udp_uid_exclusion_applies_to_dns_tcp_one_does_not(dns):
    install(dns, "--redirect-dns", "--config", dns.config,
            "--exclude-outbound-ports-for-uids", f"udp:53:{OTHER_UID}",
            "--exclude-outbound-ports-for-uids", f"tcp:53:{APP_UID}")
    assert query(dns, REMOTE_IP4, user=OTHER_UID)["answer"] == UPSTREAM
    assert query(dns, REMOTE_IP4, user=APP_UID)["answer"] == MESH


def test_tcp_53_from_the_application_goes_direct(dns):
    dns.spawn(LS + ["listen", "remote:53"], ns=dns.remote_ns, in_cgroup=False)
    dns.spawn(LS + ["listen", "out:15001"], user=DP_UID)
    install(dns, "--redirect-dns", "--config", dns.config)
    r = json.loads(dns.py("connect", REMOTE_IP4, "53").stdout)
    assert r["line"].startswith("remote "), r
    r = json.loads(dns.py("connect", REMOTE_IP4, "54").stdout)
    assert r["line"].startswith("out "), r    # other ports are still captured


def test_a_family_without_nameserver_is_not_captured_and_install_says_so(dns):
    v4only = dns.shared_file("resolv4.conf", f"nameserver {REMOTE_IP4}\n")
    cfg = dns.shared_file("dns4.yaml", f"redirect:\n  dns:\n    resolvConfigPath: {v4only}\n")
    r = install(dns, "--redirect-dns", "--config", cfg)
    assert "no IPv6 nameserver" in r.stderr
    assert query(dns, REMOTE_IP6)["answer"] == UPSTREAM
    assert query(dns, REMOTE_IP4)["answer"] == MESH


def test_ipv4_family_mode_leaves_ipv6_dns_alone(dns):
    install(dns, "--redirect-dns", "--config", dns.config, "--ip-family-mode", "ipv4")
    assert query(dns, REMOTE_IP6)["answer"] == UPSTREAM
    assert query(dns, REMOTE_IP4)["answer"] == MESH


def test_status_shows_dns_and_counts_it(dns):
    install(dns, "--redirect-dns", "--config", dns.config)
    query(dns, REMOTE_IP4)
    st = json.loads(dns.tproxy("status", "--output", "json").stdout)[0]
    assert st["counters"]["redirected_dns"] == 1
    assert st["counters"]["dns_reply_source_restored"] == 1
    assert st["meta"]["dns_servers"] == [REMOTE_IP4, REMOTE_IP6]


def test_v4_mapped_query_on_an_ipv6_socket_follows_the_ipv4_rules(dns):
    # The kernel hands a sendmsg() to ::ffff:a.b.c.d on an AF_INET6 socket to the IPv4
    # path (and the sendmsg4 hook) itself; the reply comes back through recvmsg6.
    install(dns, "--redirect-dns", "--config", dns.config, "--ip-family-mode", "ipv4")
    r = dns.run([sys.executable, "-c", "import socket;"
                 "from loader.lab.servers import _dns_query, fmt;"
                 "s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM);s.settimeout(3);"
                 f"s.sendto(_dns_query('demo.mesh'),('::ffff:{REMOTE_IP4}',53));"
                 "d,p=s.recvfrom(4096);"
                 "print(socket.inet_ntop(socket.AF_INET,d[-4:]), fmt(p))"])
    assert r.stdout.split() == [MESH, f"{REMOTE_IP4}:53"], r.stdout + r.stderr
