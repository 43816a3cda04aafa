"""One test per Kuma outbound rule (../shared/reference/kuma-transparent-proxy.md), each
checked for IPv4 and IPv6 on real sockets in a lab. The reply line says which listener a
connection reached: "out" (15001), "in" (15006), "local" (a service beside the app) or
"remote" (the other host), with the proxy's SO_ORIGINAL_DST answer as orig=."""
import sys

import pytest

from loader.lab import APP_IP4, APP_IP6, REMOTE_IP4, REMOTE_IP6

from .conftest import APP_UID, DP_UID, OTHER_UID, install, listeners, reached, requires

NEIGHBOURS_TOO = True   # also in a node already serving other namespaces (conftest)

FAMILIES = [
    pytest.param(dict(remote=REMOTE_IP4, own=APP_IP4, lo="127.0.0.1", lo_other="127.0.0.5",
                      passthrough="127.0.0.6", fmt="{}:{}"), id="ipv4"),
    pytest.param(dict(remote=REMOTE_IP6, own=APP_IP6, lo="::1", lo_other=None,
                      passthrough="::6", fmt="[{}]:{}"), id="ipv6"),
]


def addr(f, host, port):
    return f["fmt"].format(host, port)


@pytest.fixture
def captured(lab):
    listeners(lab)
    return lab


@pytest.mark.kernel_ci
def test_default_redirects_to_outbound_port_with_original_destination(captured):
    install(captured)
    for f in (FAMILIES[0].values[0], FAMILIES[1].values[0]):
        r = reached(captured, f["remote"], 8000)
        line = r["line"]
        assert line.startswith("out "), line
        assert f"orig={addr(f, f['remote'], 8000)}" in line
        # The proxy sees the host's own address as the source, as behind iptables; over
        # IPv6 ::1, as the connection stays on loopback (tproxy_redirect.h says why).
        source = f["own"] if f["remote"] == REMOTE_IP4 else f["lo"]
        assert f"peer={addr(f, source, '')}" in line
        # ... and the application still sees where it was going (getpeername hook).
        assert r["getpeername"] == addr(f, f["remote"], 8000)


@pytest.mark.parametrize("f", FAMILIES)
def test_rule1_exclude_outbound_ports_for_uids(captured, f):
    install(captured, "--exclude-outbound-ports-for-uids", f"tcp:8000:{OTHER_UID}")
    assert reached(captured, f["remote"], 8000, user=OTHER_UID)["line"].startswith("remote ")
    # other port, same uid: captured; same port, other uid: captured
    assert reached(captured, f["remote"], 8001, user=OTHER_UID)["line"].startswith("out ")
    assert reached(captured, f["remote"], 8000, user=APP_UID)["line"].startswith("out ")


@pytest.mark.parametrize("f", FAMILIES)
def test_rule1_udp_only_entry_does_not_exclude_tcp(captured, f):
    install(captured, "--exclude-outbound-ports-for-uids", f"udp:8000:{OTHER_UID}")
    assert reached(captured, f["remote"], 8000, user=OTHER_UID)["line"].startswith("out ")


@pytest.mark.parametrize("f", FAMILIES)
def test_rule2_exclude_outbound_ips(captured, f):
    net = f"{f['remote']}/{32 if '.' in f['remote'] else 128}"
    install(captured, "--exclude-outbound-ips", f"203.0.113.0/24,{net}")
    assert reached(captured, f["remote"], 8000)["line"].startswith("remote ")


def test_rule2_cidr_that_does_not_cover_is_captured(captured):
    install(captured, "--exclude-outbound-ips", "198.18.0.128/25,fd00:7470::100/120")
    assert reached(captured, REMOTE_IP4, 8000)["line"].startswith("out ")
    assert reached(captured, REMOTE_IP6, 8000)["line"].startswith("out ")


def test_rule2_ipv6_catch_all_leaves_ipv4_alone(captured):
    # ::/0 is an ip6tables rule: it never matches IPv4 traffic.
    install(captured, "--exclude-outbound-ips", "::/0")
    assert reached(captured, REMOTE_IP6, 8000)["line"].startswith("remote ")
    assert reached(captured, REMOTE_IP4, 8000)["line"].startswith("out ")


@pytest.mark.parametrize("f", FAMILIES)
def test_rule4a_outbound_disabled(captured, f, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("redirect:\n  outbound:\n    enabled: false\n")
    install(captured, "--config", str(cfg))
    assert reached(captured, f["remote"], 8000)["line"].startswith("remote ")


@pytest.mark.parametrize("f", FAMILIES)
def test_rule4b_exclude_outbound_ports(captured, f):
    install(captured, "--exclude-outbound-ports", "7,8000")
    assert reached(captured, f["remote"], 8000)["line"].startswith("remote ")
    assert reached(captured, f["remote"], 8001)["line"].startswith("out ")


@pytest.mark.parametrize("f", FAMILIES)
def test_rule4c_passthrough_source_to_local_goes_direct(captured, f):
    install(captured)
    # Envoy's inbound passthrough: bound to 127.0.0.6 (::6), to the app's own address.
    # As the DP user this would otherwise be the 4d hairpin.
    r = reached(captured, f["own"], 8000, user=DP_UID, bind=f["passthrough"])
    assert r["line"].startswith("local "), r


@pytest.mark.parametrize("f", FAMILIES)
def test_rule4d_dp_user_to_own_address_goes_to_inbound_port(captured, f):
    install(captured)
    line = reached(captured, f["own"], 8000, user=DP_UID)["line"]
    assert line.startswith("in "), line
    assert f"orig={addr(f, f['own'], 8000)}" in line


@pytest.mark.parametrize("f", FAMILIES)
def test_rule4e_app_to_local_address_goes_direct(captured, f):
    install(captured)
    for host in filter(None, (f["own"], f["lo"], f["lo_other"])):
        assert reached(captured, host, 8000)["line"].startswith("local "), host


@pytest.mark.parametrize("unspecified", ["0.0.0.0", "::"])
def test_connect_to_the_unspecified_address_is_local(captured, unspecified):
    # The kernel sends connect(0.0.0.0) to loopback, so iptables sees 127.0.0.1 there.
    install(captured)
    assert reached(captured, unspecified, 8000)["line"].startswith("local ")
    assert reached(captured, unspecified, 8000, user=DP_UID)["line"].startswith("local ")


@pytest.mark.parametrize("f", FAMILIES)
def test_rule4f_dp_user_upstream_goes_direct(captured, f):
    install(captured)
    assert reached(captured, f["remote"], 8000, user=DP_UID)["line"].startswith("remote ")


@pytest.mark.parametrize("f", FAMILIES)
def test_rule4g_dp_user_to_loopback_goes_direct(captured, f):
    install(captured)
    # 127.0.0.1 / ::1 is excluded from the 4d hairpin and reaches the service directly.
    assert reached(captured, f["lo"], 8000, user=DP_UID)["line"].startswith("local ")


@pytest.mark.parametrize("f", FAMILIES)
def test_rule4h_include_ports(captured, f, tmp_path):
    cfg = tmp_path / "c.yaml"
    # includePorts wins over excludePorts (Kuma writes no exclude rules then).
    cfg.write_text("redirect:\n  outbound:\n    includePorts: [8001]\n"
                   "    excludePorts: [8001]\n")
    install(captured, "--config", str(cfg))
    assert reached(captured, f["remote"], 8000)["line"].startswith("remote ")
    assert reached(captured, f["remote"], 8001)["line"].startswith("out ")


def test_ipv4_family_mode_leaves_ipv6_alone(captured):
    install(captured, "--ip-family-mode", "ipv4")
    assert reached(captured, REMOTE_IP6, 8000)["line"].startswith("remote ")
    assert reached(captured, REMOTE_IP4, 8000)["line"].startswith("out ")


def test_v4_mapped_address_on_ipv6_socket_follows_ipv4_rules(captured):
    install(captured, "--ip-family-mode", "ipv4")
    r = reached(captured, f"::ffff:{REMOTE_IP4}", 8000)
    assert r["line"].startswith("out "), r
    assert f"orig={REMOTE_IP4}:8000" in r["line"]
    assert r["getpeername"] == f"{REMOTE_IP4}:8000"


@requires("instance netns cookie")
@pytest.mark.kernel_ci
def test_sockets_in_another_netns_are_not_touched(captured):
    # cgroup hooks follow the cgroup, not the netns: a process of the cgroup that lives in
    # another namespace must not be redirected to a proxy that is not there. (Port 8000
    # is excluded from inbound capture, which would otherwise take this connection.)
    install(captured, "--exclude-inbound-ports", "8000")
    r = reached(captured, APP_IP4, 8000, ns=captured.remote_ns)
    assert r["line"].startswith("local "), r


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_kuma_validator_lands_on_inbound_port(lab, ipv6):
    """kumactl install transparent-proxy-validator: as the DP user, listen on
    127.0.0.1:15006 (::1) and connect from 127.0.0.1 to 127.0.0.6:<20000-29999> (::6)."""
    install(lab)
    r = lab.run([sys.executable, "-m", "loader.lab.servers", "validator"] +
                (["--ipv6"] if ipv6 else []), user=DP_UID)
    assert r.returncode == 0, r.stdout + r.stderr
