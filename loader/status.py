"""status: every registered namespace with its configuration, counters, listeners, links
and the map memory it holds, plus the node program set they share. Reads pinned maps and
links only (no compiler); namespaces found deleted are removed on the way (lifecycle)."""
import ctypes as ct
import os

from . import abi, bpfsys, kernel, listeners, namespace, node, pinfs
from .node import NodePaths

# Rough kernel bytes per element (struct htab_elem and allocator rounding; an LPM trie
# node likewise), for the memory estimate: the order of magnitude, not an exact figure.
ELEM_OVERHEAD = 64


def _elem(key, value):
    return ELEM_OVERHEAD + ct.sizeof(key) + ct.sizeof(value)


def _count(m, pred):
    return sum(1 for k in m.keys() if pred(k))


def map_memory(maps, cookie, meta):
    """Estimated kernel memory of one namespace's entries, in bytes, by map."""
    lo, hi = cookie & 0xFFFFFFFF, cookie >> 32
    ports = _count(maps.ports, lambda k: k.netns_cookie == cookie)
    cidrs = _count(maps.cidrs, lambda k: (k.netns_lo, k.netns_hi) == (lo, hi))
    rules = _count(maps.uid_rules, lambda k: k.netns_cookie == cookie)
    addrs = len(meta.get("registered_addresses") or [])
    return {
        "tp_ns": _elem(ct.c_uint64, abi.TpConfig),
        "tp_ports": ports * _elem(abi.TpPortKey, ct.c_uint64),
        "tp_cidrs": cidrs * _elem(abi.TpCidrKey, ct.c_uint64),
        "tp_uid_rules": rules * _elem(abi.TpUidRuleKey, abi.TpUidRule),
        "tp_ns_addrs": addrs * _elem(abi.TpAddrKey, ct.c_uint64),
        "tp_counters": ELEM_OVERHEAD + maps.counters.ncpu * ct.sizeof(abi.TpNsCounters),
        "tp_ns_meta": _elem(abi.TpName, abi.TpMeta),
    }


def _node_summary(paths):
    meta = node.read_meta(paths) or {}
    return {"digest": meta.get("digest"), "version": meta.get("version"),
            "abi": meta.get("abi"), "features": meta.get("features", []),
            "programs": meta.get("programs", []), "unavailable": meta.get("unavailable", {}),
            "cgroups": sorted(node.attach_points(paths).values()),
            "built_at": meta.get("built_at")}


def status(bpffs, name=None):
    """[{name, meta, links, counters, tracked_connections, problems, ...}] for each
    registered namespace (and each instance of the earlier layout, as a problem)."""
    from . import lifecycle
    paths = NodePaths(bpffs)
    if not kernel.is_bpffs(bpffs) or not os.path.isdir(paths.root):
        return []
    pinfs.check_tree(paths.bpffs, paths.root)   # nothing read from a tree others can write
    out = []
    for legacy in paths.legacy_instances():
        if name and legacy != name:
            continue
        out.append({"name": legacy, "problems": [
            "installed by an earlier version (a program set per instance): run "
            "'ebpf-tproxy uninstall --all', then install again"], "links": {}, "meta": None})
    other = paths.other_layouts_said()
    if other:
        out.append({"name": "(node)", "links": {}, "meta": None, "problems": [
            f"{other}: its own version's status shows it; uninstall --all removes it"]})
        return out
    try:
        complete = node.read_meta(paths) is not None
    except node.InstallError as e:
        return out + [{"name": "(node)", "links": {}, "meta": None, "problems": [str(e)]}]
    if not complete:
        if os.path.isdir(paths.node) and not name:
            out.append({"name": "(node)", "links": {}, "meta": None, "problems": [
                "the node program set was never completed; run install again or "
                "uninstall --all"]})
        return out
    with lifecycle.bpffs_lock(bpffs):
        stale = lifecycle.remove_stale(paths)
    summary = _node_summary(paths)
    links = node.link_infos(paths)
    attach = node.attach_points(paths)
    with namespace.NodeMaps(paths) as maps:
        accel = _accel_keys(paths)
        for n, meta in maps.registrations().items():
            if name and n != name:
                continue
            out.append(_entry(paths, maps, n, meta, links, accel, summary, attach))
    for n in stale:
        if not name or n == name:
            out.append({"name": n, "links": {}, "meta": None, "removed": True,
                        "problems": [], "note": "its network namespace was gone: removed"})
    return out


def _accel_keys(paths):
    try:
        with bpfsys.PinnedMap(paths.map("tp_accel"), abi.TpSockKey, ct.c_uint64,
                              max_entries=abi.TP_ACCEL_MAX) as m:
            return m.keys()
    except OSError:
        return []


def _entry(paths, maps, n, meta, links, accel, summary, attach):
    cookie = meta["netns_cookie"]
    entry = {"name": n, "meta": meta, "problems": [], "node": summary}
    cfg = maps.config(cookie)
    entry["active_generation"] = cfg.gen if cfg is not None else None
    # On only while `ebpf-tproxy trace` runs: a dead trace's flag was cleared above.
    entry["tracing"] = bool(cfg is not None and cfg.flags & abi.TP_F_TRACE)
    entry["counters"] = maps.counters_total(cookie)
    entry["tracked_connections"] = sum(1 for k in maps.conns.keys()
                                       if k.netns_cookie == cookie)
    entry["accelerated_sockets"] = sum(1 for k in accel if k.netns_cookie == cookie)
    try:
        entry["inbound_listeners"] = listeners.registered(paths.map("tp_listeners"),
                                                          meta.get("ns_index"))
    except OSError:
        entry["inbound_listeners"] = {}
    entry["map_memory_bytes"] = map_memory(maps, cookie, meta)
    # The links this namespace depends on: its cgroup's and its own sk_lookup.
    at = meta.get("attached_at") or meta.get("cgroup")
    cg_id = None
    for cid, path in attach.items():
        if path == at:
            cg_id = str(cid)
    mine = {}
    for rel, info in links.items():
        parts = rel.split(os.sep)
        if (parts[0] == "cgroups" and parts[1] == cg_id) or \
                (parts[0] == "netns" and parts[1] == n):
            mine[parts[-1]] = info
    entry["links"] = mine
    if not meta.get("complete", True):
        entry["problems"].append("install did not finish; run install again or uninstall")
    if cfg is None and meta.get("complete", True):
        entry["problems"].append("no configuration in force (tp_ns); run install again")
    want_cg = os.stat(at).st_ino if at and os.path.isdir(at) else None
    for ln, info in mine.items():
        target = want_cg if ln != "sk_lookup_inbound" else meta.get("netns_inode")
        if info.get("target_id") != target:
            kind = "network namespace" if ln == "sk_lookup_inbound" else "cgroup"
            entry["problems"].append(f"link {ln} is detached (its {kind} is gone); run "
                                     "install again")
    if "sk_lookup_inbound" not in summary["programs"]:
        entry["notes"] = ["no sk_lookup on this kernel: whether its network namespace still "
                          "exists cannot be told, so a deleted one stays registered until "
                          "uninstall --name"]
    if meta.get("complete", True):
        expected = {p for p in summary["programs"]
                    if p in {pr.name for pr in node.programs.PROGRAMS if pr.target == "cgroup"}}
        expected |= {"sk_lookup_inbound"} & set(summary["programs"])
        for missing in sorted(expected - set(mine)):
            entry["problems"].append(f"link {missing} missing; run install again")
    return entry
