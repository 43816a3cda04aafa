"""What the network namespace looks like, read over netlink (pyroute2).

"Local address" in Kuma's rules is iptables' `-o lo`: the route to the destination goes
through loopback, i.e. the destination is in the kernel's local routing table (table 255,
route type "local"). That table lists every address of the namespace, every 127/8 address
and ::1, which is exactly the set the BPF programs need.
"""
import ipaddress


def IPRoute():
    """pyroute2's IPRoute, imported on first use: importing pyroute2 loads all of it
    (~0.1 s here, seconds under emulation), which status, uninstall and --help never need."""
    from pyroute2 import IPRoute as _IPRoute
    return _IPRoute()


RT_TABLE_LOCAL = 255
RTN_LOCAL = 2
IFF_LOOPBACK = 0x8


def local_networks():
    """The destinations routed to loopback, as CIDR strings (both families)."""
    nets = set()
    with IPRoute() as ipr:
        for family in (2, 10):
            for r in ipr.get_routes(family=family, table=RT_TABLE_LOCAL):
                if r["type"] != RTN_LOCAL:
                    continue
                dst = r.get_attr("RTA_DST")
                if dst:
                    nets.add(str(ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False)))
        # Every address of the namespace too: an IPv6 address's local route appears only
        # when its (asynchronous) DAD work has run, even on lo, a moment after it is added.
        for a in ipr.get_addr():
            ip = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            if ip:
                nets.add(str(ipaddress.ip_network(ip)))
    # lo may be down in a fresh netns; these are local by definition all the same.
    nets.update({"127.0.0.0/8", "::1/128"})
    return sorted(nets, key=lambda n: (ipaddress.ip_network(n).version, n))


def default_instance_ips():
    """(ipv4, ipv6): the namespace's own address per family, preferring the interface
    of the default route, else the first global address; '' where there is none."""
    out = {}
    with IPRoute() as ipr:
        # Addresses on loopback (Kuma's ::6, 127.0.0.6) are never the host's own address.
        loopback = {ln["index"] for ln in ipr.get_links() if ln["flags"] & IFF_LOOPBACK}
        for family, key in ((2, 4), (10, 6)):
            oif = None
            for r in ipr.get_default_routes(family=family):
                oif = r.get_attr("RTA_OIF")
                break
            best = ""
            for a in ipr.get_addr(family=family):
                if a["scope"] != 0 or a["index"] in loopback:   # global, not link-local
                    continue
                ip = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
                if not ip:
                    continue
                if oif is not None and a["index"] == oif:
                    best = ip
                    break
                best = best or ip
            out[key] = best
    return out[4], out[6]


KUMA_LO_V6 = "::6"   # Envoy binds ::6 as the source of its IPv6 inbound passthrough


def _lo_index(ipr):
    return [ln["index"] for ln in ipr.get_links() if ln["flags"] & IFF_LOOPBACK][0]


def _on_lo(ipr, lo, address):
    return any(a.get_attr("IFA_ADDRESS") == address for a in ipr.get_addr(family=10, index=lo))


def has_lo_address(address=KUMA_LO_V6):
    with IPRoute() as ipr:
        return _on_lo(ipr, _lo_index(ipr), address)


def ensure_lo_address(address=KUMA_LO_V6, prefixlen=128):
    """Add address/128 to lo, as Kuma does, unless it is there.
    Returns (added by this call, a warning if it could not be added)."""
    with IPRoute() as ipr:
        lo = _lo_index(ipr)
        if _on_lo(ipr, lo, address):
            return False, None
        try:
            ipr.addr("add", index=lo, address=address, prefixlen=prefixlen)
        except Exception as e:   # pyroute2's NetlinkError: IPv6 disabled in this namespace
            return False, (f"cannot add {address}/{prefixlen} to lo ({e}): IPv6 looks "
                           "disabled here; use --ip-family-mode ipv4")
        return True, None


def remove_lo_address(address=KUMA_LO_V6, prefixlen=128):
    with IPRoute() as ipr:
        lo = _lo_index(ipr)
        try:
            ipr.addr("del", index=lo, address=address, prefixlen=prefixlen)
        except Exception:   # already gone: nothing to do
            pass
