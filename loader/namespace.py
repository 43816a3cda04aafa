"""One namespace's entries in the node program set's maps: its configuration (tp_ns, keyed
by the namespace's cookie), its ports, CIDRs and uid rules (by cookie and generation), its
own addresses (tp_ns_addrs, for sk_lookup), its counters and its description (tp_ns_meta,
by registration name). Registering a namespace is map writes only.

A namespace switches to a new configuration at once: its inactive generation is written
first, then its tp_ns value is replaced (one update; tp_ns allocates per element, so a
program still reading the old value reads it whole), and after an RCU grace period the old
generation's entries are deleted.
"""
import contextlib
import ctypes as ct
import ipaddress
import json

from . import __version__, abi, bpfsys, kernel, netinfo, netns, programs, trace
from .config import ConfigError, Settings, read_nameservers
from .node import InstallError


def _log(progress, msg):
    if progress:
        progress(msg)


def netns_inode():
    """The calling thread's network namespace, as link info names it."""
    return netns.current_inode()


def dns_servers(settings):
    """(nameservers DNS capture applies to, warnings). Empty with captureAll (all UDP 53)."""
    if not settings.dns_enabled or settings.dns_capture_all:
        return [], []
    found = read_nameservers(settings.resolv_conf)
    servers, warnings = list(found[4]), []
    families = [4, 6] if settings.ipv6 else [4]
    if settings.ipv6:
        servers += found[6]
    for ip in found[6] if settings.ipv6 else []:
        if ipaddress.ip_address(ip).is_link_local:
            warnings.append(f"nameserver {ip} is link-local: queries sent to it with "
                            "sendto() (musl) cannot be redirected and go to it directly")
    for fam in families:
        if not found[fam]:
            warnings.append(f"{settings.resolv_conf} has no IPv{fam} nameserver: IPv{fam} DNS "
                            "is not captured (use --redirect-all-dns-traffic to capture all "
                            "UDP 53)")
    return servers, warnings


def local_set(local_nets, ipv6):
    """The namespace's local networks as install registers them, in order."""
    local_nets = set(local_nets)
    if ipv6:
        # Install adds Kuma's ::6/128 to lo (rule 4c) after recording that it will: it is
        # one of the namespace's addresses from the start, whether there yet or not.
        local_nets.add(f"{netinfo.KUMA_LO_V6}/128")
    return sorted(local_nets, key=lambda n: (ipaddress.ip_network(n).version,
                                             ipaddress.ip_network(n)))


def local_digest(local_list):
    """A digest of local_set's list: the description keeps it whole, where it shortens a
    long list, so the agent can tell whether the local networks changed."""
    import hashlib
    return hashlib.sha256(json.dumps(local_list).encode()).hexdigest()[:16]


def plan(settings: Settings, local_nets, instance_ips, cgroup_path, netns_cookie):
    """Everything install would write, as data (printed by --dry-run, stored as meta)."""
    local_nets = local_set(local_nets, settings.ipv6)
    ip4 = settings.instance_ip4 or instance_ips[0]
    ip6 = settings.instance_ip6 or instance_ips[1]
    nets = [ipaddress.ip_network(n) for n in local_nets]
    for given in filter(None, (settings.instance_ip4, settings.instance_ip6)):
        ip = ipaddress.ip_address(given)
        if not any(ip in n for n in nets if n.version == ip.version):
            raise ConfigError(f"--ebpf-instance-ip: {given} is not an address of this network "
                              "namespace; give one of its addresses (ip addr) or leave it "
                              "out to use the default")
    return {
        "name": settings.name,
        "version": __version__,
        "abi": abi.TP_ABI_VERSION,
        "cgroup": cgroup_path,
        "bpffs": settings.bpffs_path,
        "netns_cookie": netns_cookie,
        "netns_inode": netns_inode(),
        "instance_ip4": ip4,
        "instance_ip6": ip6 if settings.ipv6 else "",
        "local_networks": list(local_nets),
        "local_digest": local_digest(local_nets),
        "dns_servers": dns_servers(settings)[0],
        "dp_uid": settings.dp_uid,
        "config": settings.kuma_view(),
        "ns_addresses": own_addresses(local_nets),
        "programs": [{"name": p.name, "hook": p.hook,
                      "attach": _target_description(p, cgroup_path)}
                     for p in programs.PROGRAMS],
    }


def _target_description(prog, cgroup_path):
    if prog.target == "cgroup":
        return cgroup_path
    if prog.target == "netns":
        return f"network namespace (inode {netns_inode()})"
    if prog.target == "none":
        return "none (run by the loader for a moment, to learn a namespace's cookie)"
    return f"map {prog.target.split(':', 1)[1]}"


def own_addresses(local_nets):
    """The namespace's own addresses by which sk_lookup recognises it (tp_ns_addrs): every
    single address of local_nets but loopback, link-local and Kuma's ::6 on lo, which every
    namespace has alike."""
    out = []
    for n in local_nets:
        net = ipaddress.ip_network(n)
        if net.num_addresses != 1:
            continue
        ip = net.network_address
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or \
                str(ip) == netinfo.KUMA_LO_V6:
            continue
        out.append(str(ip))
    return out


def map_contents(settings, p):
    """What install writes into the maps (generation-independent), for --dry-run."""
    return {
        "tp_config": {"flags": [n for n, f in _flags(settings) if f],
                      "dp_uid": settings.dp_uid, "outbound_port": settings.outbound_port,
                      "inbound_port": settings.inbound_port,
                      "netns_cookie": p["netns_cookie"], "instance_ip4": p["instance_ip4"],
                      "instance_ip6": p["instance_ip6"]},
        "tp_ns_addrs": list(p["ns_addresses"]) if settings.inbound_enabled else [],
        "tp_ports": {"exclude_outbound": list(settings.outbound_exclude_ports),
                     "include_outbound": list(settings.outbound_include_ports),
                     "exclude_inbound": list(settings.inbound_exclude_ports),
                     "include_inbound": list(settings.inbound_include_ports)},
        "tp_cidrs": {"dns_servers": list(p["dns_servers"]),
                     "exclude_outbound": list(settings.outbound_exclude_ips),
                     "exclude_inbound": list(settings.inbound_exclude_ips),
                     "local": list(p["local_networks"])},
        "tp_uid_rules": [r.describe() for r in settings.uid_rules],
    }


def _flags(settings):
    """(name, set?) for each tp_config flag, in TP_F_* order."""
    return (("outbound", settings.outbound_enabled), ("ipv6", settings.ipv6),
            ("outbound_include_ports", bool(settings.outbound_include_ports)),
            ("inbound", settings.inbound_enabled),
            ("inbound_include_ports", bool(settings.inbound_include_ports)),
            ("dns", settings.dns_enabled and not settings.dns_capture_all),
            ("dns_capture_all", settings.dns_capture_all),
            ("accelerate", settings.accelerate))


def _config_struct(settings, p, gen, ns_index):
    bits = (abi.TP_F_OUTBOUND, abi.TP_F_IPV6, abi.TP_F_OUT_INCLUDE, abi.TP_F_INBOUND,
            abi.TP_F_IN_INCLUDE, abi.TP_F_DNS, abi.TP_F_DNS_ALL, abi.TP_F_ACCELERATE)
    flags = sum(bit for bit, (_, on) in zip(bits, _flags(settings)) if on)
    cfg = abi.TpConfig(flags=flags, dp_uid=kernel.kernel_uid(settings.dp_uid),
                       outbound_port=settings.outbound_port,
                       inbound_port=settings.inbound_port,
                       dns_port=settings.dns_port,
                       n_uid_rules=len(settings.uid_rules), gen=gen, ns_index=ns_index,
                       netns_cookie=p["netns_cookie"])
    if p["instance_ip4"]:
        cfg.instance_ip4 = abi.addr16(p["instance_ip4"])
    if p["instance_ip6"]:
        cfg.instance_ip6 = abi.addr16(p["instance_ip6"])
    return cfg


def _shorten_lists(obj, limit=32):
    """The description kept in tp_meta names long lists (10,000 excluded CIDRs) by their
    size and first entries; the entries themselves are in the maps."""
    if isinstance(obj, dict):
        return {k: _shorten_lists(v, limit) for k, v in obj.items()}
    if isinstance(obj, list) and len(obj) > limit:
        return {"count": len(obj), "first": obj[:8]}
    return obj




class NodeMaps:
    """The node set's maps, opened from userspace (no compiler)."""

    def __init__(self, paths):
        def m(name, k, v, **kw):
            return bpfsys.PinnedMap(paths.map(name), k, v, **kw)
        self.paths = paths
        self.ns = m("tp_ns", ct.c_uint64, abi.TpConfig, max_entries=abi.TP_MAX_NS)
        self.ns_addrs = m("tp_ns_addrs", abi.TpAddrKey, ct.c_uint64,
                          max_entries=abi.TP_NS_ADDRS_MAX)
        self.uid_rules = m("tp_uid_rules", abi.TpUidRuleKey, abi.TpUidRule)
        self.ports = m("tp_ports", abi.TpPortKey, ct.c_uint8, max_entries=abi.TP_PORTS_MAX)
        self.cidrs = m("tp_cidrs", abi.TpCidrKey, ct.c_uint8, max_entries=abi.TP_CIDRS_MAX)
        self.conns = m("tp_conns", abi.TpConnKey, abi.TpConn, max_entries=abi.TP_CONN_MAX)
        self.counters = m("tp_counters", ct.c_uint64, abi.TpNsCounters, percpu=True,
                          max_entries=abi.TP_MAX_NS)
        self.meta = m("tp_ns_meta", abi.TpName, abi.TpMeta, max_entries=abi.TP_MAX_NS)

    def close(self):
        for k, v in vars(self).items():
            if isinstance(v, bpfsys.PinnedMap):
                v.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- descriptions
    def read_meta(self, name):
        try:
            v = self.meta.lookup(abi.name_key(name))
        except ValueError:
            return None
        if not v or not v.len:
            return None
        try:
            return json.loads(bytes(v.json[:v.len]).decode())
        except ValueError:
            return None

    def write_meta(self, name, p):
        raw = json.dumps(_shorten_lists(p), separators=(",", ":")).encode()
        if len(raw) > abi.TP_META_SIZE:
            raise InstallError(f"the namespace description is {len(raw)} bytes, over "
                               f"{abi.TP_META_SIZE}; shorten the exclusion lists (use CIDRs "
                               "and port ranges)")
        self.meta.update(abi.name_key(name), abi.TpMeta(len(raw), raw))

    def names(self):
        return sorted(k.name.decode() for k in self.meta.keys())

    def registrations(self):
        """{name: description} of every registered namespace."""
        out = {}
        for n in self.names():
            m = self.read_meta(n)
            if m is not None:
                out[n] = m
        return out

    # ---------------------------------------------------------------- generations
    def config(self, cookie):
        return self.ns.lookup(ct.c_uint64(cookie))

    def clear_gen(self, cookie, gen):
        for k in self.ports.keys():
            if k.netns_cookie == cookie and k.gen == gen:
                self.ports.delete(k)
        lo, hi = cookie & 0xFFFFFFFF, cookie >> 32
        for k in self.cidrs.keys():
            if (k.netns_lo, k.netns_hi, k.gen) == (lo, hi, gen):
                self.cidrs.delete(k)
        for i in range(abi.TP_MAX_UID_RULES):
            self.uid_rules.delete(abi.TpUidRuleKey(cookie, gen * abi.TP_MAX_UID_RULES + i))

    def write_gen(self, cookie, gen, settings, p):
        one = ct.c_uint8(1)
        for kind, ports in ((abi.TP_PORT_EXCLUDE_OUT, settings.outbound_exclude_ports),
                            (abi.TP_PORT_INCLUDE_OUT, settings.outbound_include_ports),
                            (abi.TP_PORT_EXCLUDE_IN, settings.inbound_exclude_ports),
                            (abi.TP_PORT_INCLUDE_IN, settings.inbound_include_ports)):
            for port in ports:
                self.ports.update(abi.TpPortKey(cookie, gen, kind, port), one)
        for kind, nets in ((abi.TP_CIDR_EXCLUDE_OUT, settings.outbound_exclude_ips),
                           (abi.TP_CIDR_EXCLUDE_IN, settings.inbound_exclude_ips),
                           (abi.TP_CIDR_DNS_SERVER, p["dns_servers"]),
                           (abi.TP_CIDR_LOCAL, p["local_networks"])):
            for net in nets:
                self.cidrs.update(abi.cidr_key(cookie, gen, kind, net), one)
        for i, r in enumerate(settings.uid_rules):
            lo, hi = kernel.kernel_uid(r.uid_lo), kernel.kernel_uid(r.uid_hi)
            if hi - lo != r.uid_hi - r.uid_lo:
                raise ConfigError(f"--exclude-outbound-ports-for-uids: uids {r.uid_lo}-"
                                  f"{r.uid_hi} span several user-namespace mappings; split "
                                  "the range")
            rule = abi.TpUidRule(uid_lo=lo, uid_hi=hi, protos=r.protos, n_ranges=len(r.ports))
            for j, (plo, phi) in enumerate(r.ports):
                rule.ranges[j] = abi.TpPortRange(plo, phi)
            self.uid_rules.update(abi.TpUidRuleKey(cookie, gen * abi.TP_MAX_UID_RULES + i),
                                  rule)

    # ---------------------------------------------------------------- counters
    def ensure_counters(self, cookie):
        if self.counters.lookup(ct.c_uint64(cookie)) is None:
            zero = (abi.TpNsCounters * self.counters.ncpu)()
            self.counters.update(ct.c_uint64(cookie), zero)

    def counters_total(self, cookie):
        vals = self.counters.lookup(ct.c_uint64(cookie))
        out = {}
        for i, (_, name) in enumerate(abi.REASONS):
            if name.startswith("unused_"):
                continue
            out[name] = sum(v.reason[i] for v in vals) if vals is not None else 0
        for i, (_, name) in enumerate(abi.ACCEL_COUNTERS):
            out[name] = sum(v.accel[i] for v in vals) if vals is not None else 0
        return out


def _free_index(regs):
    used = {m.get("ns_index") for m in regs.values()}
    for i in range(abi.TP_MAX_NS):
        if i not in used:
            return i
    raise InstallError(f"the node serves {abi.TP_MAX_NS} namespaces, its limit; uninstall "
                       "some (ebpf-tproxy status lists them)")


def _addresses_taken(maps, cookie, addrs):
    """Addresses of ours that another registered namespace already has in tp_ns_addrs."""
    out = []
    for ip in addrs:
        v = maps.ns_addrs.lookup(abi.TpAddrKey(abi.addr16(ip)))
        if v is not None and v.value != cookie:
            out.append(ip)
    return out


def check(maps, settings: Settings, p):
    """Refuse what register could not do, before anything is written: this namespace under
    another name, this name for another namespace, an address another namespace has.
    Returns the namespace's row (ns_index): its own if registered, else the first free."""
    cookie = p["netns_cookie"]
    regs = maps.registrations()
    mine = regs.get(settings.name)
    for other, m in regs.items():
        if other != settings.name and m.get("netns_cookie") == cookie:
            raise InstallError(f"this network namespace is already registered as {other!r}; "
                               f"install with --name {other}, or uninstall it first")
    if mine and mine.get("netns_cookie") != cookie:
        raise InstallError(f"{settings.name!r} is registered for another network namespace "
                           f"(inode {mine.get('netns_inode')}); uninstall it first or choose "
                           "another --name")
    addrs = p["ns_addresses"] if settings.inbound_enabled else []
    taken = _addresses_taken(maps, cookie, addrs)
    if taken:
        raise InstallError(f"{', '.join(taken)} is also an address of another registered "
                           "namespace; inbound capture finds a namespace by the address a "
                           "connection arrives at, so each needs its own (or install with "
                           "--redirect-inbound=false)")
    _check_room(maps, settings, p, regs)
    ns_index = (mine or {}).get("ns_index")
    return ns_index if ns_index is not None else _free_index(regs)


def entry_counts(settings, p):
    """How many entries the namespace's generation takes in each shared map."""
    c = map_contents(settings, p)
    return {"tp_ports": sum(len(v) for v in c["tp_ports"].values()),
            "tp_cidrs": sum(len(set(v)) for v in c["tp_cidrs"].values()),
            "tp_ns_addrs": len(c["tp_ns_addrs"])}


def _check_room(maps, settings, p, regs):
    """The shared maps must hold this namespace's new generation beside everything already
    there (its old generation goes only after the switch): said now, by name, rather than
    as ENOSPC halfway through. Each description records its entry counts, so the maps are
    only walked when even twice every namespace's count (a generation left by a killed
    install) plus this one's would not fit: never on a node of ordinary configurations."""
    need = entry_counts(settings, p)
    p["map_entries"] = need
    for name, m, limit in (("tp_ports", maps.ports, abi.TP_PORTS_MAX),
                           ("tp_cidrs", maps.cidrs, abi.TP_CIDRS_MAX),
                           ("tp_ns_addrs", maps.ns_addrs, abi.TP_NS_ADDRS_MAX)):
        if not need[name]:
            continue
        bound = sum(2 * (r.get("map_entries") or {}).get(name, limit) for r in regs.values())
        if bound + need[name] <= limit:
            continue
        used = sum(1 for _ in m.keys())
        if used + need[name] > limit:
            raise InstallError(f"{name} is full: this configuration needs {need[name]} "
                               f"entries and {used} of {limit} are in use by the registered "
                               "namespaces; shorten its port or IP lists (ranges and CIDRs "
                               "instead of single values) or uninstall unused namespaces")


def _addresses_of(maps, cookie):
    """The addresses tp_ns_addrs holds for the namespace (exact, unlike its description,
    which shortens long lists)."""
    out = set()
    for k in maps.ns_addrs.keys():
        v = maps.ns_addrs.lookup(k)
        if v is not None and v.value == cookie:
            out.add(str(abi.addr_from16(k.addr)))
    return out


def register(maps, settings: Settings, p, progress=None):
    """Write (or rewrite) one namespace's entries of the inactive generation; the returned
    switch makes them the namespace's configuration at once. p is the plan
    (namespace.plan) with its netns_cookie and ns_index (from check)."""
    cookie, ns_index = p["netns_cookie"], p["ns_index"]
    addrs = p["ns_addresses"] if settings.inbound_enabled else []
    old_addrs = _addresses_of(maps, cookie)
    current = maps.config(cookie)
    old = current.gen if current is not None else None
    new = (old ^ 1) if old is not None else 0
    _log(progress, f"writing configuration generation {new} of namespace {cookie}")
    maps.clear_gen(cookie, new)
    maps.write_gen(cookie, new, settings, p)
    maps.ensure_counters(cookie)
    for ip in addrs:
        maps.ns_addrs.update(abi.TpAddrKey(abi.addr16(ip)), ct.c_uint64(cookie))
    p["generation"] = new
    p["registered_addresses"] = list(addrs)
    cfg = _config_struct(settings, p, new, ns_index)
    # A trace watching the namespace keeps watching it through the new configuration.
    if current is not None and current.flags & abi.TP_F_TRACE and \
            trace.lease_alive(maps.paths.bpffs):
        cfg.flags |= abi.TP_F_TRACE
    return _Switch(maps, cookie, old, new, cfg, set(addrs), old_addrs)


class _Switch:
    """The last step of register: replace the namespace's tp_ns value, then clear what the
    old generation left (ports, CIDRs, uid rules, addresses no longer ours)."""

    def __init__(self, maps, cookie, old, new, cfg, addrs, old_addrs):
        self.maps, self.cookie, self.old, self.new = maps, cookie, old, new
        self.cfg, self.addrs, self.old_addrs = cfg, addrs, old_addrs
        self.flipped = False

    def flip(self):
        self.maps.ns.update(ct.c_uint64(self.cookie), self.cfg)
        self.flipped = True

    def clear_old(self):
        # The old generation may still be in use by a program that read tp_ns a moment ago;
        # programs run inside RCU read-side sections, so once a grace period has passed
        # none is. Where the kernel offers no grace-period wait, the next install clears it
        # before writing it again.
        if self.old is not None and bpfsys.synchronize_rcu():
            self.maps.clear_gen(self.cookie, self.old)
        for ip in self.old_addrs - self.addrs:
            key = abi.TpAddrKey(abi.addr16(ip))
            v = self.maps.ns_addrs.lookup(key)
            if v is not None and v.value == self.cookie:
                self.maps.ns_addrs.delete(key)

    def undo(self):
        """A failure before flip(): drop what was written for the new generation, and the
        addresses that were not the namespace's before."""
        self.maps.clear_gen(self.cookie, self.new)
        for ip in self.addrs - self.old_addrs:
            self.maps.ns_addrs.delete(abi.TpAddrKey(abi.addr16(ip)))


def unregister(maps, name):
    """Remove every entry of one namespace. Returns what was removed (empty if none)."""
    m = maps.read_meta(name)
    if m is None:
        return []
    cookie = m["netns_cookie"]
    removed = [f"namespace {name!r} (cookie {cookie})"]
    if any(o != name and om.get("netns_cookie") == cookie
           for o, om in maps.registrations().items()):
        # Only a description left by an install that was refused or killed: the entries
        # under this cookie are another registration's.
        maps.meta.delete(abi.name_key(name))
        return removed
    # Its tp_ns entry first: from then on every program leaves the namespace alone.
    maps.ns.delete(ct.c_uint64(cookie))
    bpfsys.synchronize_rcu()
    for gen in (0, 1):
        maps.clear_gen(cookie, gen)
    for k in maps.ns_addrs.keys():
        v = maps.ns_addrs.lookup(k)
        if v is not None and v.value == cookie:
            maps.ns_addrs.delete(k)
    for k in maps.conns.keys():
        if k.netns_cookie == cookie:
            maps.conns.delete(k)
    maps.counters.delete(ct.c_uint64(cookie))
    _clear_listener_row(maps.paths.map("tp_listeners"), m.get("ns_index"))
    maps.meta.delete(abi.name_key(name))
    return removed


def _clear_listener_row(pin, ns_index):
    if ns_index is None:
        return
    base = ns_index * 2 * abi.TP_LISTENER_SLOTS
    with bpfsys.PinnedMap(pin, ct.c_uint32, ct.c_uint64) as sockmap:
        for key in range(base, base + 2 * abi.TP_LISTENER_SLOTS):
            if sockmap.lookup(ct.c_uint32(key)) is not None:
                # An empty sockmap slot answers a delete with EINVAL, not ENOENT.
                with contextlib.suppress(OSError):
                    sockmap.delete(ct.c_uint32(key))

