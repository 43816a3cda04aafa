"""install and uninstall: the node program set (node.py) plus one namespace's entries
(namespace.py), in an order that never lets a connection escape capture and leaves nothing
behind on failure.

install, in the namespace to capture (the CLI enters --netns first):
  1. the node program set: the pinned one when it was built from these sources, else
     built once (BCC) and swapped onto every existing link (an upgrade);
  2. the namespace's description, marked unfinished, so a loader killed from here on is
     visible in `status` and undone by `uninstall`;
  3. the cgroup links (unless a cgroup of the set already covers this one) and the
     namespace's sk_lookup link;
  4. the namespace's entries of the inactive generation, then one tp_ns update switches it;
     after an RCU grace period the old generation's entries are deleted.
A failure rolls back what this install did: a fresh registration's entries and links, a
fresh node set entirely, the bpffs mount it made.
"""
import contextlib
import dataclasses
import fcntl
import os
import time

from . import (claim, config, kernel, listeners, namespace, netinfo, netns, node, pinfs,
               probe, seams, trace)
from .config import NAME_RE, Settings, check_name
from .node import InstallError, NodePaths

MOUNT_MARKER_DIR = claim.CLAIM_DIR   # the mount marker lives beside the claims

__all__ = ["InstallError", "install", "uninstall", "list_names", "bpffs_lock"]


@contextlib.contextmanager
def bpffs_lock(bpffs):
    """One install/uninstall at a time per bpffs: flock on the mount point itself, so no
    lock file is left behind."""
    fd = os.open(bpffs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _log(progress, msg):
    if progress:
        progress(msg)


# ------------------------------------------------------------------------- install

class Skipped(Exception):
    """install's precondition no longer held once the lock was taken: nothing was done."""


def install(settings: Settings, cgroup_path, progress=None, precondition=None, then=None,
            labels=None):
    """Register the caller's network namespace (install or update in place). Returns the
    plan now in force. labels (a small dict of strings) are kept in its description: who
    registered it and for what (the CNI plugin's pod and attachment).

    Under the bpffs lock, so that nothing changes between them: precondition(paths), before
    anything is done, returns None to go on or the reason to raise Skipped (the agent's
    "only if what I read is still so"); then(p), once the namespace is registered, records
    it elsewhere (the CLI's store)."""
    paths = NodePaths(settings.bpffs_path)
    _mount_bpffs(settings.bpffs_path)
    try:
        with bpffs_lock(settings.bpffs_path):
            _refuse_other_layouts(paths)
            if precondition is not None:
                reason = precondition(paths)
                if reason:
                    raise Skipped(reason)
            loaded, fresh_node = _loaded_node(paths, progress)
            try:
                p = _install_locked(settings, cgroup_path, paths, loaded, progress, labels)
            except BaseException:
                if fresh_node:
                    _log(progress, "install failed: removing the node program set it built")
                    node.remove(paths)
                raise
            finally:
                loaded.close()
            if then is not None:
                then(p)
    except BaseException:
        _maybe_unmount(settings.bpffs_path)   # after the lock: its fd keeps the mount busy
        raise
    return p


def _mount_bpffs(bpffs):
    if kernel.ensure_bpffs(bpffs):
        os.makedirs(MOUNT_MARKER_DIR, mode=0o700, exist_ok=True)
        open(_mount_marker(bpffs), "w").close()


def _refuse_other_layouts(paths):
    pinfs.check_tree(paths.bpffs, paths.root)
    legacy = paths.legacy_instances()
    if legacy:
        raise InstallError(
            f"{paths.root} holds {', '.join(repr(n) for n in legacy)} of an earlier "
            "layout (a program set per instance); run 'ebpf-tproxy uninstall --all' "
            "(it removes those too), then install again; their connections in flight "
            "lose their SO_ORIGINAL_DST answer")
    other = paths.other_layouts_said()
    if other:
        # New maps could not hold the registrations the old ones do, nor answer the
        # connections in flight: refuse rather than capture nothing silently.
        raise InstallError(
            f"{other}: run 'ebpf-tproxy uninstall --all' with either version, then "
            "install each namespace again; connections in flight lose their "
            "SO_ORIGINAL_DST answer")


def _loaded_node(paths, progress):
    """(the node set loaded, whether there was none before). Under the bpffs lock. A set
    this call started building and could not finish is removed."""
    fresh_node = node.read_meta(paths) is None
    if not fresh_node:
        # Before the set is loaded: what it decides (attach points, coverage) must not rest
        # on registrations that are gone.
        remove_stale(paths, progress)
    try:
        return node.ensure_loaded(paths, progress), fresh_node
    except BaseException:
        if fresh_node:
            node.remove(paths)
        raise


def load_node(bpffs, progress=None):
    """The node program set loaded (built if absent or from other sources) with no
    namespace registered yet: what the agent does at start, so that no install compiles.
    Returns True if it was built now."""
    paths = NodePaths(bpffs)
    _mount_bpffs(bpffs)
    try:
        with bpffs_lock(bpffs):
            _refuse_other_layouts(paths)
            loaded, _ = _loaded_node(paths, progress)
            loaded.close()
            return loaded.built
    except BaseException:
        _maybe_unmount(bpffs)
        raise


def release_node(bpffs):
    """The agent's clean stop: with no namespace registered, the node set it loaded goes
    (and a bpffs install mounted). Returns what was removed."""
    paths = NodePaths(bpffs)
    if not kernel.is_bpffs(bpffs):
        return []
    removed = []
    with bpffs_lock(bpffs):
        if node.read_meta(paths) is None or agent_running(bpffs):
            return []
        remove_stale(paths)
        with namespace.NodeMaps(paths) as maps:
            if maps.names():
                return []
        removed += node.remove(paths)
        with contextlib.suppress(OSError):
            os.rmdir(paths.root)
    if _maybe_unmount(bpffs):
        removed.append(f"bpffs mount at {bpffs} (mounted by install)")
    return removed


# --------------------------------------------------------------- the agent's presence

def agent_lock_path(bpffs):
    return claim.path("agent", bpffs)


def hold_agent_lock(bpffs, patience=1.0):
    """The running agent's claim on a bpffs (loader/claim.py). Returns the fd to keep open,
    or None if another agent holds it."""
    return claim.hold(agent_lock_path(bpffs), patience)


def drop_agent_lock(bpffs, fd):
    claim.drop(agent_lock_path(bpffs), fd)


def agent_running(bpffs):
    """Whether an agent serves this bpffs now (holds its lock)."""
    return claim.held(agent_lock_path(bpffs))


def _acceleration(settings, loaded, p, progress):
    # Acceleration joins sockets by address and namespace in sock_ops and sk_msg; only the
    # netns cookie there (5.15) tells two namespaces' identical 4-tuples apart. Asked for:
    # refuse without it. Left to the default: on where it is safe, off (and said) where not.
    can = ("TP_SOCKOPS_NETNS_COOKIE" in loaded.meta.get("features", [])
           and "sk_msg_accel" in loaded)
    if settings.accelerate is True and not can:
        raise InstallError("--ebpf-accelerate: this kernel has no bpf_get_netns_cookie() in "
                           "sock_ops and sk_msg (5.15), which keeps sockets of different "
                           "network namespaces apart; install without --ebpf-accelerate")
    if settings.accelerate is None:
        settings = dataclasses.replace(settings, accelerate=can)
        p["acceleration"] = ("on" if can else
                             "off (this kernel has no netns cookie in sock_ops, 5.15)")
    else:
        p["acceleration"] = "on" if settings.accelerate else "off (--ebpf-accelerate=false)"
    _log(progress, f"sockmap acceleration: {p['acceleration']}")
    p["config"]["ebpf"]["accelerate"] = settings.accelerate
    return settings


def _add_lo_address(maps, settings, p, existing, adding):
    """Kuma adds ::6/128 to lo for Envoy's IPv6 passthrough source (rule 4c); so do we.
    What install is about to add is recorded in the namespace's description first (a
    fresh one's, written by the caller with p["added_lo_address"] set; an existing one's,
    rewritten here), so that uninstall removes it even if this loader is killed right after
    adding it, and never removes an address that was there before. Returns True if this
    call added it."""
    if not adding:
        return False
    if existing and not existing.get("added_lo_address"):
        maps.write_meta(settings.name, dict(existing, added_lo_address=True))
    added, problem = netinfo.ensure_lo_address()
    seams.pause("after-lo-address")
    if problem:
        p.setdefault("warnings", []).append(problem)
    return added


def _install_locked(settings, cgroup_path, paths, loaded, progress, labels=None):
    cookie, how = probe.learn_netns_cookie(
        (loaded.fd("learn_netns_cookie"), paths.map("tp_learned_cookie")))
    if not cookie:
        raise InstallError(f"cannot learn this network namespace's cookie ({how}); the node "
                           "program set acts only on registered namespaces: run "
                           "'ebpf-tproxy check'")
    p = namespace.plan(settings, netinfo.local_networks(), netinfo.default_instance_ips(),
                       cgroup_path, cookie)
    p["netns_cookie_from"] = how
    p["config_digest"] = config.digest_of(settings)   # as given: before auto is resolved
    with namespace.NodeMaps(paths) as maps:
        existing = maps.read_meta(settings.name)
        # An update that gives none (the agent's re-apply) keeps the labels it had.
        labels = labels if labels is not None else (existing or {}).get("labels")
        if labels:
            p["labels"] = dict(labels)
        if existing and existing.get("cgroup") != cgroup_path:
            raise InstallError(
                f"{settings.name!r} is attached to {existing.get('cgroup')}; uninstall it "
                f"first or choose another --name for {cgroup_path}")
        if existing and existing.get("netns_cookie") != cookie:
            raise InstallError(
                f"{settings.name!r} belongs to another network namespace (inode "
                f"{existing.get('netns_inode')}); uninstall it first or choose another "
                "--name")
        adding_lo = settings.ipv6 and not netinfo.has_lo_address()
        p["added_lo_address"] = bool(adding_lo or (existing or {}).get("added_lo_address"))
        settings = _acceleration(settings, loaded, p, progress)
        if settings.inbound_enabled and "sk_lookup_inbound" not in loaded:
            prog = next(pr for pr in node.programs.PROGRAMS if pr.name == "sk_lookup_inbound")
            raise InstallError(f"the kernel refused {prog.hook}: {prog.missing_means}")
        # Every refusal before anything is written (a refused install leaves no trace).
        p["ns_index"] = namespace.check(maps, settings, p)
        fresh = existing is None
        if fresh:
            # Visible (and undone by uninstall) should this loader die from here on.
            maps.write_meta(settings.name, _described(p, complete=False))
        created, switch, added_lo = [], None, False
        try:
            added_lo = _add_lo_address(maps, settings, p, existing, adding_lo)
            p["attached_at"], created = node.ensure_attached(paths, loaded, cgroup_path,
                                                             progress)
            # Every namespace gets its sk_lookup link where the kernel has sk_lookup, inbound
            # capture or not: it is also the exact witness of the namespace's life (the
            # kernel zeroes its target when the namespace is destroyed). Without inbound
            # capture it finds none of the namespace's addresses and passes.
            created += node.attach_netns(paths, loaded, settings.name, p["netns_inode"],
                                         progress)
            switch = namespace.register(maps, settings, p, progress)
            # Before the switch: from the moment capture is on, a proxy already listening
            # must be there (inbound) and known as this namespace's (both ports)...
            lines, problems = listeners.register_existing(
                paths, p["ns_index"], cookie, settings, cgroup_path)
            seams.hold("before-flip")
            switch.flip()
            # ... and one that bound or listened in the meantime, when bind4/6 and sock_ops
            # did not know the namespace yet, too (it keeps what is already there).
            more, problems = listeners.register_existing(
                paths, p["ns_index"], cookie, settings, cgroup_path)
            # The second pass says only what it added.
            for line in dict.fromkeys(lines + [m for m in more if m.startswith("registered")]):
                _log(progress, line)
            p.setdefault("warnings", []).extend(problems)
            switch.clear_old()
            seams.hold("after-flip")
            maps.write_meta(settings.name, _described(
                p, complete=True, installed_at=int(time.time()),
                node={"digest": loaded.meta.get("digest"),
                      "features": loaded.meta.get("features", [])}))
        except BaseException:
            if switch is not None and not switch.flipped:
                switch.undo()
            if fresh:
                _log(progress, "install failed: rolling back")
                node.detach(created)
                namespace.unregister(maps, settings.name)
                node.detach_netns(paths, settings.name)
                detach_unused_cgroups(paths, maps)
                if added_lo:
                    netinfo.remove_lo_address()
            raise
    return p


def _described(p, **more):
    """The namespace's description as stored: the program list is the node set's (status
    shows it once), not kept per namespace, whose fixed-size slot is most of its memory."""
    return dict({k: v for k, v in p.items() if k != "programs"}, **more)


def detach_unused_cgroups(paths, maps):
    """Detach the attach points no registered namespace is attached through, and links
    pinned for an attach point that was never recorded (a loader of an earlier version
    killed between linking and recording)."""
    used = {m.get("attached_at") or m.get("cgroup") for m in maps.registrations().values()}
    removed = []
    points = node.attach_points(paths)
    for cg_id, path in points.items():
        if path not in used:
            removed += node.remove_attach_point(paths, cg_id)
    if os.path.isdir(paths.cgroups):
        for d in os.listdir(paths.cgroups):
            if d.isdigit() and int(d) not in points:
                removed += node.remove_attach_point(paths, int(d))
    return removed


def remove_stale(paths, progress=None):
    """Namespaces deleted without uninstall: their entries and links go. Returns names.
    Only exact evidence counts: the kernel zeroed the target of the namespace's sk_lookup
    link (it does when the namespace is destroyed). A registration without that link (a
    kernel before 5.9) is never judged gone; status says it cannot tell."""
    if node.read_meta(paths) is None:
        return []
    gone = []
    links = node.link_infos(paths)
    with namespace.NodeMaps(paths) as maps:
        for name, meta in maps.registrations().items():
            info = links.get(os.path.join("netns", name, "sk_lookup_inbound"))
            if info is None or info.get("target_id") != 0:
                continue
            namespace.unregister(maps, name)
            node.detach_netns(paths, name)
            gone.append(name)
            _log(progress, f"removed {name!r}: its network namespace is gone")
        if gone:
            detach_unused_cgroups(paths, maps)
        # A trace that died left its flag on: its lease is free, so the flag goes.
        if trace.clear_stale(maps):
            _log(progress, "switched tracing off: the trace that switched it on is gone")
    return gone


# ------------------------------------------------------------------------- uninstall

def _remove_legacy(paths, name):
    """An instance of the earlier layout (<root>/<name>/{maps-v*,links}): detach its links,
    remove its pins."""
    d = os.path.join(paths.root, name)
    if name == node.NODE_DIR or not NAME_RE.match(name) or not os.path.isdir(d) or \
            os.path.islink(d):
        return []
    links = os.path.join(d, "links")
    pins = [os.path.join(links, n) for n in sorted(os.listdir(links))] \
        if os.path.isdir(links) else []
    node.detach(pins)
    pinfs.rmtree(d)
    return [f"link {os.path.basename(x)}" for x in pins] + [d]


def _mount_marker(bpffs):
    return os.path.join(MOUNT_MARKER_DIR, "mounted-" + bpffs.strip("/").replace("/", "_"))


def _maybe_unmount(bpffs):
    """Unmount a bpffs that install mounted, once nothing of ours (or anyone's) is in it."""
    marker = _mount_marker(bpffs)
    if not os.path.exists(marker) or not kernel.is_bpffs(bpffs):
        return False
    # maps.debug / progs.debug are the kernel's own preloaded iterators, not pins.
    if set(os.listdir(bpffs)) - {"maps.debug", "progs.debug"}:
        return False
    kernel.unmount(bpffs)
    os.unlink(marker)
    with contextlib.suppress(OSError):
        os.rmdir(MOUNT_MARKER_DIR)
    return True


def _remove_lo_address_in(inode):
    """Remove the ::6 install added to lo, in the namespace's own network namespace."""
    if inode is None or inode == namespace.netns_inode():
        netinfo.remove_lo_address()
        return [f"{netinfo.KUMA_LO_V6}/128 on lo (added by install)"]
    path = netns.find(inode)
    if path is None:
        return []   # the namespace is gone, and the address with it
    netns.run_in(path, netinfo.remove_lo_address)
    return [f"{netinfo.KUMA_LO_V6}/128 on lo of {path} (added by install)"]


def list_names(bpffs):
    """Every registered namespace's name (and instances of the earlier layout)."""
    paths = NodePaths(bpffs)
    if not kernel.is_bpffs(bpffs) or not os.path.isdir(paths.root):
        return []
    names = set(paths.legacy_instances())
    try:
        with namespace.NodeMaps(paths) as maps:
            names.update(maps.names())
    except OSError:
        pass   # no node set, or one of another layout: uninstall --all removes it whole
    return sorted(names)


def uninstall(bpffs, name=None, everything=False, then=None):
    """Remove one namespace (name) or everything. The node program set goes with the last
    namespace. then(), under the bpffs lock once they are removed, returns more of what
    went (the CLI's stored configurations). Returns what was removed (empty if there was
    nothing)."""
    paths = NodePaths(bpffs)
    if name is not None:
        check_name(name)
    if not kernel.is_bpffs(bpffs):
        return then() if then is not None else []
    removed, metas = [], []
    with bpffs_lock(bpffs):
        pinfs.check_tree(paths.bpffs, paths.root)
        other = paths.other_layouts_said()
        if other and not everything:
            raise InstallError(f"{other}: this version cannot remove one of its namespaces; "
                               "use that version's uninstall, or uninstall --all")
        try:
            readable = not other and node.read_meta(paths) is not None
        except InstallError:
            if not everything:
                raise
            readable = False
        if readable:
            removed += [f"namespace {n!r} (its network namespace was gone)"
                        for n in remove_stale(paths)]
        names = list_names(bpffs) if everything else [name]
        for n in names:
            removed += _remove_legacy(paths, n)
        if os.path.isdir(paths.node):
            try:
                maps = namespace.NodeMaps(paths)
            except OSError as e:
                # Another layout's (only with --all, above), or a build killed before its
                # maps were all made: nothing of it can be registered.
                if readable and not everything:
                    raise InstallError(f"the node program set's maps cannot be read ({e}); "
                                       "run 'ebpf-tproxy uninstall --all'") from None
                maps = None
            if maps is not None:
                with maps:
                    for n in names:
                        m = maps.read_meta(n)
                        if m is None:
                            continue
                        metas.append(m)
                        removed += namespace.unregister(maps, n)
                        removed += node.detach_netns(paths, n)
                    # No namespace left: the program set has no purpose, unless a running
                    # agent keeps it loaded so that the next install does not compile
                    # (--all: it goes).
                    keep = bool(maps.names()) or (not everything and agent_running(bpffs))
                    if keep and removed:
                        removed += detach_unused_cgroups(paths, maps)
            else:
                keep = False
            if not keep:
                removed += node.remove(paths)
        with contextlib.suppress(OSError):
            os.rmdir(paths.root)
        if then is not None:
            removed += then()
    for m in metas:
        if m.get("added_lo_address"):
            removed += _remove_lo_address_in(m.get("netns_inode"))
    if _maybe_unmount(bpffs):   # after the lock: its fd keeps the mount busy
        removed.append(f"bpffs mount at {bpffs} (mounted by install)")
    return removed
