"""Differential tests: the same connection attempts in two fresh labs, one with the
iptables rules Kuma would write (loader.iptables_oracle), one with ebpf-tproxy; every
outcome must agree: which listener accepted (the proxy's 15001 or 15006, the service
itself, or refused), the proxy's SO_ORIGINAL_DST answer, the source the proxy saw, and
the application's getpeername().

Deliberate differences (README, "Differences from iptables"), normalized here:
  - inbound: iptables REDIRECT gives the proxy's socket the local address
    <pod IP>:15006; sk_lookup gives it the address the client dialed. SO_ORIGINAL_DST is
    the same, so only that and the listener are compared for inbound attempts.
  - SO_ORIGINAL_DST on a connection nobody redirected: conntrack answers it for every
    tracked connection with the connection's own destination; ebpf-tproxy only answers
    for connections it redirected (without conntrack the kernel's ENOENT stands
    otherwise). Proxies fall back to getsockname() then, which is that same address; so
    orig= is compared only where the proxy accepted the connection.
  - the source of a redirected IPv6 connection: iptables leaves the pod's address, the
    eBPF redirect keeps ::1 (a kernel quirk otherwise leaves the proxy's socket in
    LAST_ACK when the application closes first: tproxy_redirect.h, test_ipv6_close.py);
    a proxy-accepted IPv6 connection's peer from the pod's address or ::1 is compared as
    "peer=<pod>".
The eBPF side runs twice, in a clean lab and in one with conntrack active.
"""
import contextlib
import itertools
import json
import os
import sys
import tempfile

import pytest

from loader import config, iptables_oracle
from loader.lab import APP_IP4, APP_IP6, REMOTE_IP4, REMOTE_IP6, Lab

from .conftest import DP_UID, DP_USER, NEIGHBOURS_ALWAYS, OTHER_UID, serving_neighbours, sh_in

LS = [sys.executable, "-m", "loader.lab.servers"]
USERS = [0, DP_UID, OTHER_UID]
DESTS = [REMOTE_IP4, APP_IP4, "127.0.0.1", "127.0.0.5", REMOTE_IP6, APP_IP6, "::1"]
PORTS = [8000, 8001]

# (name, ebpf-tproxy install arguments / Kuma flags as config keys)
CONFIGS = [
    ("default", {}),
    ("exclude-outbound-ports", {"redirect.outbound.excludePorts": "8001"}),
    ("exclude-outbound-ips", {"redirect.outbound.excludePortsForIPs":
                              [f"{REMOTE_IP4}/32", f"{REMOTE_IP6}/128"]}),
    ("ports-for-uids", {"redirect.outbound.excludePortsForUIDs": [f"tcp:8000:{OTHER_UID}"]}),
    ("include-ports", {"redirect.outbound.includePorts": "8001",
                       "redirect.inbound.includePorts": "8001"}),
    ("exclude-inbound", {"redirect.inbound.excludePorts": "8000",
                         "redirect.inbound.excludePortsForIPs": [f"{REMOTE_IP6}/128"]}),
    ("ipv4-only", {"ipFamilyMode": "ipv4"}),
    ("outbound-off", {"redirect.outbound.enabled": "false"}),
    ("inbound-off", {"redirect.inbound.enabled": "false"}),
]


if os.environ.get("EBPF_TPROXY_DIFFERENTIAL") == "large":
    # make differential: every combination of a few settings, not just one at a time.
    OPTIONS = {
        "redirect.outbound.excludePorts": [None, "8001"],
        "redirect.outbound.excludePortsForIPs": [None, [f"{REMOTE_IP4}/32"]],
        "redirect.outbound.excludePortsForUIDs": [None, [f"tcp:8000:{OTHER_UID}"]],
        "redirect.inbound.excludePorts": [None, "8001"],
        "redirect.inbound.excludePortsForIPs": [None, [f"{REMOTE_IP4}/32"]],
        "ipFamilyMode": [None, "ipv4"],
    }
    for combo in itertools.product(*OPTIONS.values()):
        flags = {k: v for k, v in zip(OPTIONS, combo) if v is not None}
        if flags:
            CONFIGS.append(("+".join(k.rsplit(".", 1)[-1] for k in flags), flags))


def attempts():
    out = []
    for dst, port in itertools.product(DESTS, PORTS):
        out.append([dst, port, None])
    # Envoy's inbound passthrough source, to the application's own address
    out += [[APP_IP4, 8000, "127.0.0.6"], [APP_IP6, 8000, "::6"]]
    return out


INBOUND = [[APP_IP4, 8000, None], [APP_IP4, 8001, None], [APP_IP4, 22, None],
           [APP_IP6, 8000, None], [APP_IP6, 8001, None]]


def normalize(result, inbound):
    line = result["line"]
    words = line.split()
    if not words or words[0] in ("REFUSED", "ERROR"):
        return line
    proxy = words[0] in ("out", "in")
    keep = [words[0]] + [w for w in words[1:] if w.startswith("orig=") and proxy]
    if not inbound:
        peer = next(w for w in words if w.startswith("peer="))
        peer = peer.rsplit(":", 1)[0]                            # port differs per run
        if proxy and peer in (f"peer=[{APP_IP6}]", "peer=[::1]"):
            peer = "peer=<pod>"                                  # see the module doc
        keep.append(peer)
        keep += [w for w in words if w.startswith("local=")]
        keep.append(f"getpeername={result['getpeername']}")
    return " ".join(keep)


def settings_for(flags):
    flags = dict(flags, kumaDPUser=DP_USER)
    return config.load([], environ={}, flags=flags)[0]


def config_file(flags):
    """The same configuration as a Kuma config file, for `ebpf-tproxy install --config`."""
    doc = {}
    for path, value in flags.items():
        node = doc
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(doc, f)
    f.close()
    return f.name


def run_attempts(lab):
    results = {}
    for uid in USERS:
        r = lab.py("probe", json.dumps(attempts()), user=uid, timeout=300)
        assert r.returncode == 0, r.stderr
        for a, res in zip(attempts(), json.loads(r.stdout)):
            results[("out", uid, *a)] = normalize(res, inbound=False)
    r = lab.py("probe", json.dumps(INBOUND), ns=lab.remote_ns, in_cgroup=False, timeout=300)
    assert r.returncode == 0, r.stderr
    for a, res in zip(INBOUND, json.loads(r.stdout)):
        results[("in", *a)] = normalize(res, inbound=True)
    return results


def start_services(lab):
    lab.spawn(LS + ["listen", "out:15001", "in:15006"], user=DP_UID)
    lab.spawn(LS + ["listen", "local:8000", "local:8001", "ssh:22"])
    lab.spawn(LS + ["listen", "remote:8000", "remote:8001"], ns=lab.remote_ns, in_cgroup=False)


@pytest.mark.parametrize("name, flags", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_ebpf_and_iptables_decide_every_connection_alike(name, flags):
    s = settings_for(flags)
    # iptables needs conntrack for its NAT anyway; eBPF is run with and without it (on
    # hosts with Docker or kube-proxy it is active, and answers SO_ORIGINAL_DST too).
    with Lab("ipt") as ipt, Lab("ebpf") as ebpf, Lab("ebct", conntrack=True) as ebct, \
            contextlib.ExitStack() as stack:
        # Kuma adds ::6/128 to lo in dual-stack mode; ebpf-tproxy install does the same.
        if s.ipv6:
            ipt.ip(ipt.app_ns, "-6", "addr", "add", "::6/128", "dev", "lo")
        for family, tool in ((4, "iptables-restore"), (6, "ip6tables-restore")):
            if family == 6 and not s.ipv6:
                continue
            sh_in(ipt.app_ns, tool, input=iptables_oracle.rules(s, family=family))
        start_services(ipt)
        want = run_attempts(ipt)
        got = {}
        for lab in (ebpf, ebct):
            if NEIGHBOURS_ALWAYS:
                stack.enter_context(serving_neighbours(lab))
            start_services(lab)
            r = lab.tproxy("install", "--config",
                           config_file(dict(flags, kumaDPUser=DP_USER)))
            assert r.returncode == 0, r.stderr
            got[lab.conntrack] = run_attempts(lab)
    assert len(want) >= 40
    mismatches = {(ct, *k): (want[k], got[ct][k]) for ct in got for k in want
                  if want[k] != got[ct][k]}
    assert not mismatches, json.dumps({str(k): v for k, v in mismatches.items()}, indent=1)
