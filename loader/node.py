"""The node program set: compiled and loaded once per bpffs, shared by every namespace.

Everything lives under <bpffs>/ebpf-tproxy/node/:
    maps-v<ABI>/     every map of bpf/tproxy_maps.h; the per-namespace tables are keyed by
                     the namespace's cookie (namespace.py writes them)
    progs-v<ABI>/    every program, pinned, so that each install after the first links
                     these: no BCC import, no clang, no kernel headers
    cgroups/<id>/    one pinned link per cgroup hook, for each cgroup the set is attached to
    netns/<name>/    the sk_lookup link of each registered namespace (same program)
The set's own description (what it was built from, with which kernel features, where it is
attached) is the JSON in tp_node.

Upgrade: when the sources (or build flags) differ from what the set was built from, the new
set is compiled once, its programs pinned in place of the old ones and swapped on every link
with bpf_link_update (atomic per hook); the maps stay, so answers in flight survive.
"""
import contextlib
import ctypes as ct
import json
import os
import time

from . import __version__, abi, bpfsys, pinfs, probe, programs, seams

ROOT_DIR = "ebpf-tproxy"
NODE_DIR = "node"


class InstallError(RuntimeError):
    """Install could not complete; the message is one line with cause and fix."""


def _log(progress, msg):
    if progress:
        progress(msg)


class NodePaths:
    def __init__(self, bpffs):
        self.bpffs = bpffs
        self.root = os.path.join(bpffs, ROOT_DIR)
        self.node = os.path.join(self.root, NODE_DIR)
        self.maps = os.path.join(self.node, f"maps-v{abi.TP_ABI_VERSION}")
        self.cgroups = os.path.join(self.node, "cgroups")
        self.netns = os.path.join(self.node, "netns")

    def map(self, name):
        return os.path.join(self.maps, name)

    def progs(self, digest):
        """The pinned programs of one build: a directory per digest, so that a failed
        upgrade never leaves a mix of two builds' programs pinned."""
        return os.path.join(self.node, f"progs-v{abi.TP_ABI_VERSION}-{digest}")

    def prog(self, digest, name):
        return os.path.join(self.progs(digest), name)

    def prog_dirs(self):
        if not os.path.isdir(self.node):
            return []
        return sorted(e for e in os.listdir(self.node) if e.startswith("progs-v"))

    def cgroup_links(self, cgroup_id):
        return os.path.join(self.cgroups, str(cgroup_id))

    def netns_link(self, name):
        return os.path.join(self.netns, name, "sk_lookup_inbound")

    def other_layouts(self):
        """maps-v<N> directories of another layout than this version's, in node/."""
        if not os.path.isdir(self.node):
            return []
        mine = os.path.basename(self.maps)
        return sorted(e for e in os.listdir(self.node)
                      if e.startswith("maps-v") and e != mine)

    def other_layouts_said(self):
        """One clause naming the other layout's maps beside this version's, or ''."""
        other = self.other_layouts()
        if not other:
            return ""
        return (f"the node program set in {self.node} has another map layout "
                f"({', '.join(other)}; this version uses {os.path.basename(self.maps)})")

    def legacy_instances(self):
        """Instances of the layout before the node program set (ABI <= 3): one directory
        per instance name beside node/."""
        if not os.path.isdir(self.root):
            return []
        return sorted(e for e in os.listdir(self.root) if e != NODE_DIR)


def read_meta(paths):
    """The node set's description, or None if there is no (complete) node set. A node set
    that is there but cannot be read (another layout's maps) raises: treating it as absent
    would build over it, or remove it on a failure."""
    pin = paths.map("tp_node")
    if not os.path.exists(pin):
        return None
    try:
        m = bpfsys.PinnedMap(pin, ct.c_uint32, abi.TpMeta)
    except OSError as e:
        raise InstallError(f"the node program set in {paths.node} cannot be read ({e})") \
            from None
    try:
        v = m.lookup(ct.c_uint32(0))
        if not v or not v.len:
            return None   # a build that never finished: nothing was registered with it
        return json.loads(bytes(v.json[:v.len]).decode())
    except (OSError, ValueError) as e:
        raise InstallError(f"the node program set's description in {pin} cannot be read "
                           f"({e}); run 'ebpf-tproxy uninstall --all'") from None
    finally:
        m.close()


def write_meta(paths, meta):
    raw = json.dumps(meta, separators=(",", ":")).encode()
    if len(raw) > abi.TP_META_SIZE:
        raise InstallError(f"the node description is {len(raw)} bytes, over "
                           f"{abi.TP_META_SIZE}; attach at fewer cgroups")
    with bpfsys.PinnedMap(paths.map("tp_node"), ct.c_uint32, abi.TpMeta) as m:
        m.update(ct.c_uint32(0), abi.TpMeta(len(raw), raw))


class Loaded:
    """The node set's programs, as fds this process holds: {name: fd}."""

    def __init__(self, fds, meta, built):
        self.fds, self.meta, self.built = fds, meta, built

    def close(self):
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}

    def __contains__(self, name):
        return name in self.fds

    def fd(self, name):
        return self.fds[name]


def _pinned_current(paths, meta):
    """fds of the pinned programs if the set was built from today's sources, else None."""
    if not meta or meta.get("abi") != abi.TP_ABI_VERSION:
        return None
    if meta.get("digest") != programs.digest(meta.get("features", [])):
        return None
    fds = {}
    try:
        for name in meta.get("programs", []):
            fds[name] = bpfsys.obj_get(paths.prog(meta["digest"], name))
    except OSError:
        for fd in fds.values():
            os.close(fd)
        return None
    return fds


def is_current(paths):
    """Whether the pinned node set was built from these sources: an install would then
    build nothing (what the CNI plugin, which must never compile, checks first)."""
    fds = _pinned_current(paths, read_meta(paths))
    for fd in (fds or {}).values():
        os.close(fd)
    return fds is not None


def ensure_loaded(paths, progress=None):
    """The node program set, loaded: the pinned one when it was built from these sources
    (the fast path: no compiler), else built, pinned and swapped onto every existing link."""
    meta = read_meta(paths)
    fds = _pinned_current(paths, meta)
    if fds is not None:
        _log(progress, f"node program set {meta['digest']} already loaded: no build needed")
        return Loaded(fds, meta, built=False)
    return _build(paths, meta, progress)


def _build(paths, old_meta, progress):
    pinfs.makedirs(paths.bpffs, paths.maps)
    _log(progress, "probing kernel features")
    try:
        features = list(probe.build_features(probe.probe_hooks(learn_cookie=False)))
    except Exception as e:
        raise InstallError(f"BCC could not build the feature probes ({str(e).splitlines()[0]})"
                           "; run 'make setup' and 'ebpf-tproxy check'") from None
    digest = programs.digest(features)
    _log(progress, "compiling the node program set (BCC)"
         + (f" with {', '.join(features)}" if features else ""))
    try:
        bpf = programs.compile_programs(paths.maps, features)
    except Exception as e:   # BCC raises a bare Exception; its compiler output is on stderr
        raise InstallError(f"BCC could not build the programs ({str(e).splitlines()[0]}); "
                           "run 'make setup' (kernel headers, python3-bpfcc) and "
                           "'ebpf-tproxy check'") from None
    fds, missing = {}, {}
    new_dir = paths.progs(digest)
    try:
        for prog in programs.PROGRAMS:
            try:
                # libbcc writes a refused program's verifier log to fd 2; the refusal is
                # said in one line below (check shows the probes' details).
                with programs.fd2_captured():
                    fds[prog.name] = os.dup(programs.load(bpf, prog))
            except Exception as e:
                if prog.required:
                    raise InstallError(f"the kernel refused {prog.hook} "
                                       f"({str(e).splitlines()[0]}); run 'ebpf-tproxy check'")
                missing[prog.name] = prog.missing_means
                _log(progress, f"warning: {prog.hook} unavailable, so {prog.missing_means}")
        swapped = _swap_links(paths, fds, progress)
        try:
            pinfs.rmtree(new_dir, ignore_errors=True)   # a failed attempt's
            pinfs.makedirs(paths.bpffs, new_dir)
            for name, fd in fds.items():
                bpfsys.obj_pin(fd, os.path.join(new_dir, name))
            _attach_accel(paths, fds)
            meta = dict(old_meta or {}, version=__version__, abi=abi.TP_ABI_VERSION,
                        digest=digest, features=features, programs=sorted(fds),
                        unavailable=missing, built_at=int(time.time()))
            meta.pop("cgroups", None)
            write_meta(paths, meta)   # the commit point: from here the new set is the set
        except BaseException:
            _restore(swapped, progress)
            if old_meta and "sk_msg_accel" in old_meta.get("programs", []):
                with contextlib.suppress(OSError):
                    old = bpfsys.obj_get(paths.prog(old_meta["digest"], "sk_msg_accel"))
                    try:
                        _attach_accel(paths, {"sk_msg_accel": old})
                    finally:
                        os.close(old)
            pinfs.rmtree(new_dir, ignore_errors=True)
            raise
        finally:
            for _, old_fd in swapped:
                os.close(old_fd)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    finally:
        bpf.cleanup()
    for d in paths.prog_dirs():   # the previous build's pins: its links now run ours
        if d != os.path.basename(new_dir):
            pinfs.rmtree(os.path.join(paths.node, d), ignore_errors=True)
    loaded = Loaded(fds, meta, built=True)
    _attach_everywhere(paths, loaded, progress)
    _log(progress, f"node program set {digest} loaded and pinned")
    return loaded


def _attach_accel(paths, fds):
    """Attach sk_msg_accel to tp_accel, replacing the map's previous program; it only runs
    for sockets that sock_ops adds, which it does only for namespaces with TP_F_ACCELERATE."""
    if "sk_msg_accel" not in fds:
        return
    accel = bpfsys.obj_get(paths.map("tp_accel"))
    try:
        bpfsys.prog_attach(fds["sk_msg_accel"], accel, bpfsys.SK_MSG_VERDICT)
    finally:
        os.close(accel)


def _all_links(paths):
    """(pin, program name) of every link of the node set."""
    out = []
    for top in (paths.cgroups, paths.netns):
        if not os.path.isdir(top):
            continue
        for sub in sorted(os.listdir(top)):
            d = os.path.join(top, sub)
            for name in sorted(os.listdir(d)):
                out.append((os.path.join(d, name), name))
    return out


def _swap_links(paths, fds, progress):
    """Point every existing link at the new program of its hook (an upgrade). Returns
    [(pin, fd of the program it ran before)] for a rollback."""
    swapped = []
    try:
        for pin, name in _all_links(paths):
            if name not in fds:
                continue
            link_fd = bpfsys.obj_get(pin)
            try:
                info = bpfsys.link_info(link_fd)
                if not info["target_id"]:
                    continue   # its cgroup or namespace is gone; install/status clean it
                old_fd = bpfsys.prog_fd_by_id(info["prog_id"])
                try:
                    bpfsys.link_update(link_fd, fds[name])
                except BaseException:
                    os.close(old_fd)
                    raise
                swapped.append((pin, old_fd))
            finally:
                os.close(link_fd)
            seams.after_link(name)
        if swapped:
            _log(progress, f"updated {len(swapped)} links in place")
    except BaseException:
        _restore(swapped, progress)
        for _, old_fd in swapped:
            os.close(old_fd)
        raise
    return swapped


def _restore(swapped, progress):
    for pin, old_fd in reversed(swapped):
        with contextlib.suppress(OSError):
            link_fd = bpfsys.obj_get(pin)
            try:
                bpfsys.link_update(link_fd, old_fd)
            finally:
                os.close(link_fd)
    if swapped:
        _log(progress, f"restored the previous program on {len(swapped)} links")


def _cgroup_programs(loaded):
    return [p for p in programs.PROGRAMS if p.target == "cgroup" and p.name in loaded]


# ------------------------------------------------------------------ attach points

def attach_points(paths):
    """{cgroup id: path} of every cgroup the node set is attached to (tp_attach)."""
    try:
        m = bpfsys.PinnedMap(paths.map("tp_attach"), ct.c_uint64, abi.TpPath,
                             max_entries=abi.TP_MAX_ATTACH)
    except OSError:
        return {}
    with m:
        out = {}
        for k in m.keys():
            v = m.lookup(k)
            if v is not None:
                out[k.value] = v.path.decode()
        return out


def _record_attach_point(paths, cg_id, path):
    with bpfsys.PinnedMap(paths.map("tp_attach"), ct.c_uint64, abi.TpPath) as m:
        if path is None:
            m.delete(ct.c_uint64(cg_id))
        else:
            m.update(ct.c_uint64(cg_id), abi.TpPath(path.encode()))


def remove_attach_point(paths, cg_id):
    """Detach and unpin one attach point's links. Returns what was removed."""
    d = paths.cgroup_links(cg_id)
    pins = [os.path.join(d, n) for n in sorted(os.listdir(d))] if os.path.isdir(d) else []
    detach(pins)
    with contextlib.suppress(OSError):
        os.rmdir(d)
    _record_attach_point(paths, cg_id, None)
    return [f"link cgroups/{cg_id}/{os.path.basename(x)}" for x in pins]


def _ancestry(path):
    """Cgroup ids (directory inodes) of path and each of its parents up to the cgroup2
    mount: what tells containment whatever mount path names the cgroup."""
    from . import kernel
    top = kernel.cgroup2_mount() or "/"
    out, path = [], os.path.abspath(path)
    while True:
        try:
            out.append(os.stat(path).st_ino)
        except OSError:
            break
        if path == top or os.path.dirname(path) == path:
            break
        path = os.path.dirname(path)
    return out


def _alive(paths, cg_id):
    """The attach point's links are attached (its cgroup was not removed)."""
    d = paths.cgroup_links(cg_id)
    names = sorted(os.listdir(d)) if os.path.isdir(d) else []
    return bool(names) and _pinned_link_info(os.path.join(d, names[0]))["target_id"] == cg_id


def attach_point_for(paths, cgroup_path):
    """(id, path) of the live attach point covering cgroup_path (itself or an ancestor), or
    None. An attach point whose cgroup is gone is removed on the way. Raises if cgroup_path
    contains one: the programs would run twice for its sockets."""
    mine = _ancestry(cgroup_path)
    for cid, path in attach_points(paths).items():
        if not _alive(paths, cid):
            remove_attach_point(paths, cid)
            continue
        if cid in mine:
            return cid, path
        if mine and mine[0] in _ancestry(path):
            raise InstallError(f"the node program set is attached to {path}, inside "
                               f"{cgroup_path}; attaching it to both would run it twice for "
                               f"the same sockets: install with --ebpf-cgroup-path {path}, or "
                               "uninstall --all first")
    return None


def _pinned_link_info(pin):
    fd = bpfsys.obj_get(pin)
    try:
        return bpfsys.link_info(fd)
    finally:
        os.close(fd)


def _still_linked(pin, target_id):
    """Whether the pinned link is attached to target_id. A link whose target went away
    (the cgroup was removed and made again, the namespace deleted) is unpinned."""
    if not os.path.exists(pin):
        return False
    if _pinned_link_info(pin)["target_id"] == target_id:
        return True
    os.unlink(pin)
    return False


def _link_and_pin(prog_fd, target_fd, attach_type, pin):
    link_fd = bpfsys.link_create(prog_fd, target_fd, attach_type)
    try:
        bpfsys.obj_pin(link_fd, pin)
    finally:
        os.close(link_fd)


def _link_missing(paths, loaded, cg_id, cgroup_path, progress):
    """Link every cgroup program not yet linked at the attach point. Returns the pins made
    (detached again if one fails)."""
    created = []
    d = paths.cgroup_links(cg_id)
    pinfs.makedirs(paths.bpffs, d)
    cg_fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for prog in _cgroup_programs(loaded):
            pin = os.path.join(d, prog.name)
            if _still_linked(pin, cg_id):
                continue
            _link_and_pin(loaded.fd(prog.name), cg_fd, prog.attach_type, pin)
            created.append(pin)
            _log(progress, f"attached {prog.hook} to {cgroup_path}")
            seams.after_link(prog.name)
    except BaseException:
        detach(created)
        raise
    finally:
        os.close(cg_fd)
    return created


def _attach_everywhere(paths, loaded, progress):
    """After a build: a program the new set has and the old one had not is linked at every
    attach point too."""
    for cid, path in attach_points(paths).items():
        if os.path.isdir(path) and os.stat(path).st_ino == cid:
            _link_missing(paths, loaded, cid, path, progress)


def ensure_attached(paths, loaded, cgroup_path, progress=None):
    """Attach the cgroup programs to cgroup_path unless a live attach point covers it.
    Returns (the covering cgroup's path, [pins created] for a rollback)."""
    covering = attach_point_for(paths, cgroup_path)
    cg_id = os.stat(cgroup_path).st_ino
    if covering is not None and covering[0] != cg_id:
        return covering[1], []
    # Recorded before the first link: a loader killed while linking leaves an attach point
    # that uninstall finds (and detaches when no namespace uses it), not links nobody knows.
    new = covering is None
    _record_attach_point(paths, cg_id, cgroup_path)
    try:
        created = _link_missing(paths, loaded, cg_id, cgroup_path, progress)
    except BaseException:
        if new:
            _record_attach_point(paths, cg_id, None)
        raise
    return cgroup_path, created


def attach_netns(paths, loaded, name, netns_inode, progress=None):
    """The namespace's sk_lookup link (the caller is in that namespace). Returns the pins
    created (for a rollback)."""
    if "sk_lookup_inbound" not in loaded:
        return []
    pin = paths.netns_link(name)
    if _still_linked(pin, netns_inode):
        return []
    pinfs.makedirs(paths.bpffs, os.path.dirname(pin))
    ns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)   # the agent's threads too
    try:
        _link_and_pin(loaded.fd("sk_lookup_inbound"), ns_fd, bpfsys.SK_LOOKUP, pin)
    finally:
        os.close(ns_fd)
    _log(progress, f"attached netns/sk_lookup to network namespace (inode {netns_inode})")
    try:
        seams.after_link("sk_lookup_inbound")
    except BaseException:
        detach([pin])
        raise
    return [pin]


def detach(pins):
    """Detach and unpin links (detached now, even if some process holds one open)."""
    for pin in pins:
        try:
            fd = bpfsys.obj_get(pin)
            try:
                bpfsys.link_detach(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pin)


def detach_netns(paths, name):
    pin = paths.netns_link(name)
    if not os.path.exists(pin):
        return []
    detach([pin])
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(pin))
    return [f"link netns/{name}/sk_lookup_inbound"]


def link_infos(paths):
    """{pin relative to node/: link info} of every link of the set."""
    out = {}
    for pin, _ in _all_links(paths):
        rel = os.path.relpath(pin, paths.node)
        try:
            out[rel] = _pinned_link_info(pin)
        except OSError as e:
            out[rel] = {"error": str(e)}
    return out


def remove(paths):
    """Detach every link, then remove every pin and directory of the node set."""
    removed = []
    for pin, name in _all_links(paths):
        detach([pin])
        removed.append(f"link {os.path.relpath(pin, paths.node)}")
    if os.path.isdir(paths.node):
        pinfs.rmtree(paths.node)
        removed.append(paths.node)
    with contextlib.suppress(OSError):
        os.rmdir(paths.root)   # only if nothing else is left
    return removed
