"""Kuma's iptables rules for a configuration: the test oracle and the benchmark baseline.

`rules(settings, family, dns_servers)` writes the nat table that `kumactl install
transparent-proxy` would, in iptables-restore format: the same chains, in the same order,
rule for rule (checked against the rule sets of ../shared/reference/kuma-transparent-proxy.md
by tests/unit/test_iptables_oracle.py). The differential tests apply it in one lab and
ebpf-tproxy in another and compare what every connection does; `install --dry-run
--explain` prints it beside the eBPF plan.
"""
import ipaddress



def _ports(ranges):
    """[(53, 53), (3000, 5000)] -> "53,3000:5000" (multiport syntax)."""
    return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in ranges)


def _uids(lo, hi):
    return str(lo) if lo == hi else f"{lo}-{hi}"


def rules(s, family=4, dns_servers=(), dp_uid=None):
    """The nat table for IPv4 (family 4, iptables) or IPv6 (6, ip6tables)."""
    dp = s.dp_uid if dp_uid is None else dp_uid
    host = "/32" if family == 4 else "/128"
    loopback = "127.0.0.1" if family == 4 else "::1"
    passthrough = "127.0.0.6" if family == 4 else "::6"

    def mine(cidr):
        return ipaddress.ip_network(cidr, strict=False).version == family

    out = ["*nat"]
    chains = ["KUMA_MESH_INBOUND", "KUMA_MESH_INBOUND_REDIRECT", "KUMA_MESH_OUTBOUND",
              "KUMA_MESH_OUTBOUND_REDIRECT"]
    out += [f":{c} - [0:0]" for c in chains]
    rule = out.append

    if s.inbound_enabled:
        rule("-A PREROUTING -p tcp -j KUMA_MESH_INBOUND")
    # OUTPUT: rule 1 (ports for uids), 2 (excluded IPs), 3 (DNS), then the mesh chain.
    for r in s.uid_rules:
        for proto, bit in (("tcp", 1), ("udp", 2)):
            if not r.protos & bit:
                continue
            ports = "" if r.ports == ((1, 65535),) else \
                f" -m multiport --dports {_ports(r.ports)}"
            rule(f"-A OUTPUT -p {proto}{ports} -m owner --uid-owner "
                 f"{_uids(r.uid_lo, r.uid_hi)} -j RETURN")
    for cidr in s.outbound_exclude_ips:
        if mine(cidr):
            rule(f"-A OUTPUT -d {ipaddress.ip_network(cidr, strict=False)} -j RETURN")
    if s.dns_enabled:
        rule(f"-A OUTPUT -p udp --dport 53 -m owner --uid-owner {dp} -j RETURN")
        if s.dns_capture_all:
            rule(f"-A OUTPUT -p udp --dport 53 -j REDIRECT --to-ports {s.dns_port}")
        else:
            for ns in dns_servers:
                if ipaddress.ip_address(ns).version == family:
                    rule(f"-A OUTPUT -d {ns}{host} -p udp --dport 53 -j REDIRECT "
                         f"--to-ports {s.dns_port}")
        rule(f"-A OUTPUT -p tcp --dport 53 -m owner ! --uid-owner {dp} -j RETURN")
    if s.outbound_enabled:
        rule("-A OUTPUT -p tcp -j KUMA_MESH_OUTBOUND")

    # KUMA_MESH_INBOUND
    for cidr in s.inbound_exclude_ips:
        if mine(cidr):
            rule(f"-A KUMA_MESH_INBOUND -s {ipaddress.ip_network(cidr, strict=False)} "
                 "-j RETURN")
    if s.inbound_include_ports:
        for port in s.inbound_include_ports:
            rule(f"-A KUMA_MESH_INBOUND -p tcp --dport {port} -j KUMA_MESH_INBOUND_REDIRECT")
    else:
        for port in s.inbound_exclude_ports:
            rule(f"-A KUMA_MESH_INBOUND -p tcp --dport {port} -j RETURN")
        rule("-A KUMA_MESH_INBOUND -p tcp -j KUMA_MESH_INBOUND_REDIRECT")
    rule(f"-A KUMA_MESH_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports {s.inbound_port}")

    # KUMA_MESH_OUTBOUND (rules 4b-4h)
    if not s.outbound_include_ports:
        for port in s.outbound_exclude_ports:
            rule(f"-A KUMA_MESH_OUTBOUND -p tcp --dport {port} -j RETURN")
    rule(f"-A KUMA_MESH_OUTBOUND -s {passthrough}{host} -o lo -j RETURN")
    rule(f"-A KUMA_MESH_OUTBOUND ! -d {loopback}{host} -o lo -p tcp -m owner --uid-owner {dp} "
         "-j KUMA_MESH_INBOUND_REDIRECT")
    rule(f"-A KUMA_MESH_OUTBOUND -o lo -p tcp -m owner ! --uid-owner {dp} -j RETURN")
    rule(f"-A KUMA_MESH_OUTBOUND -m owner --uid-owner {dp} -j RETURN")
    rule(f"-A KUMA_MESH_OUTBOUND -d {loopback}{host} -j RETURN")
    if s.outbound_include_ports:
        for port in s.outbound_include_ports:
            rule(f"-A KUMA_MESH_OUTBOUND -p tcp --dport {port} -j KUMA_MESH_OUTBOUND_REDIRECT")
    else:
        rule("-A KUMA_MESH_OUTBOUND -j KUMA_MESH_OUTBOUND_REDIRECT")
    rule(f"-A KUMA_MESH_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports {s.outbound_port}")
    out.append("COMMIT")
    return "\n".join(out) + "\n"
