"""An instance's lifecycle: install (and upgrade in place), status, uninstall.

Everything an instance owns lives under <bpffs>/ebpf-tproxy/<name>/:
    maps-v<ABI>/   the pinned maps (configuration, connection table, counters, meta)
    links/         one pinned BPF link per hook
Nothing else is kept anywhere, so `status` and `uninstall` find all of it from any
process on the host, and removing that directory (after detaching the links) leaves
nothing behind.

Install order, so that no connection escapes capture during an upgrade:
  1. compile and verify the new programs against the existing maps;
  2. write the new configuration into the inactive generation;
  3. swap each link to its new program (bpf_link_update: atomic per hook), or create and
     pin it on a first install;
  4. flip tp_active to the new generation, wait for an RCU grace period (no program is
     still reading the old one), then clear the old one.
A failure before step 3 changes nothing the programs read; a first install that fails
anywhere is rolled back completely.
"""
import contextlib
import ctypes as ct
import dataclasses
import fcntl
import ipaddress
import json
import os
import shutil
import subprocess
import time

from . import __version__, abi, bpfsys, kernel, listeners, netinfo, probe, programs
from .config import ConfigError, Settings, read_nameservers

ROOT_DIR = "ebpf-tproxy"
MOUNT_MARKER_DIR = "/run/ebpf-tproxy"


class InstallError(RuntimeError):
    """Install could not complete; the message is one line with cause and fix."""


@dataclasses.dataclass
class Paths:
    bpffs: str
    name: str

    @property
    def instance(self):
        return os.path.join(self.bpffs, ROOT_DIR, self.name)

    @property
    def maps(self):
        return os.path.join(self.instance, f"maps-v{abi.TP_ABI_VERSION}")

    @property
    def links(self):
        return os.path.join(self.instance, "links")

    def link(self, prog_name):
        return os.path.join(self.links, prog_name)

    def map(self, map_name):
        return os.path.join(self.maps, map_name)


@contextlib.contextmanager
def bpffs_lock(bpffs):
    """One install/uninstall at a time per bpffs: flock on the mount point itself, so no
    lock file is left behind."""
    fd = os.open(bpffs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _log(progress, msg):
    if progress:
        progress(msg)


# ------------------------------------------------------------------------- the plan

def netns_inode():
    """The caller's network namespace, as link info names it."""
    return os.stat("/proc/self/ns/net").st_ino


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


def plan(settings: Settings, local_nets, instance_ips, cgroup_path, netns_cookie):
    """Everything install would write, as data (printed by --dry-run, stored as meta)."""
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
        "dns_servers": dns_servers(settings)[0],
        "dp_uid": settings.dp_uid,
        "config": settings.kuma_view(),
        "programs": [{"name": p.name, "hook": p.hook,
                      "attach": _target_description(p, cgroup_path)}
                     for p in programs.PROGRAMS],
    }


def _target_description(prog, cgroup_path):
    if prog.target == "cgroup":
        return cgroup_path
    if prog.target == "netns":
        return f"network namespace (inode {netns_inode()})"
    return f"map {prog.target.split(':', 1)[1]}"


def map_contents(settings, p):
    """What install writes into the maps (generation-independent), for --dry-run."""
    return {
        "tp_config": {"flags": [n for n, f in _flags(settings) if f],
                      "dp_uid": settings.dp_uid, "outbound_port": settings.outbound_port,
                      "inbound_port": settings.inbound_port,
                      "netns_cookie": p["netns_cookie"], "instance_ip4": p["instance_ip4"],
                      "instance_ip6": p["instance_ip6"]},
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


def _config_struct(settings, p):
    bits = (abi.TP_F_OUTBOUND, abi.TP_F_IPV6, abi.TP_F_OUT_INCLUDE, abi.TP_F_INBOUND,
            abi.TP_F_IN_INCLUDE, abi.TP_F_DNS, abi.TP_F_DNS_ALL, abi.TP_F_ACCELERATE)
    flags = sum(bit for bit, (_, on) in zip(bits, _flags(settings)) if on)
    cfg = abi.TpConfig(flags=flags, dp_uid=kernel.kernel_uid(settings.dp_uid),
                       outbound_port=settings.outbound_port,
                       inbound_port=settings.inbound_port,
                       dns_port=settings.dns_port,
                       n_uid_rules=len(settings.uid_rules),
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


class Maps:
    """The instance's pinned maps, opened from userspace."""

    def __init__(self, paths):
        def m(name, k, v, percpu=False):
            return bpfsys.PinnedMap(paths.map(name), k, v, percpu)
        self.active = m("tp_active", ct.c_uint32, ct.c_uint32)
        self.config = m("tp_config", ct.c_uint32, abi.TpConfig)
        self.uid_rules = m("tp_uid_rules", ct.c_uint32, abi.TpUidRule)
        self.ports = m("tp_ports", abi.TpPortKey, ct.c_uint8)
        self.cidrs = m("tp_cidrs", abi.TpCidrKey, ct.c_uint8)
        self.conns = bpfsys.PinnedMap(paths.map("tp_conns"), abi.TpConnKey, abi.TpConn,
                                      max_entries=abi.TP_CONN_MAX)
        self.counters = m("tp_counters", ct.c_uint32, ct.c_uint64, percpu=True)
        try:
            self.accel_counters = m("tp_accel_counters", ct.c_uint32, ct.c_uint64, percpu=True)
        except OSError:
            self.accel_counters = None   # installed by a version without acceleration
        self.meta = m("tp_meta", ct.c_uint32, abi.TpMeta)

    def close(self):
        for v in vars(self).values():
            if v is not None:
                v.close()

    def active_gen(self):
        return self.active.lookup(ct.c_uint32(0)).value & 1

    def clear_gen(self, gen):
        for k in self.ports.keys():
            if k.gen == gen:
                self.ports.delete(k)
        for k in self.cidrs.keys():
            if k.gen == gen:
                self.cidrs.delete(k)
        empty = abi.TpUidRule()
        for i in range(abi.TP_MAX_UID_RULES):
            self.uid_rules.update(ct.c_uint32(gen * abi.TP_MAX_UID_RULES + i), empty)
        self.config.update(ct.c_uint32(gen), abi.TpConfig())

    def write_gen(self, gen, settings, p):
        one = ct.c_uint8(1)
        for port in settings.outbound_exclude_ports:
            self.ports.update(abi.TpPortKey(gen, abi.TP_PORT_EXCLUDE_OUT, port), one)
        for port in settings.outbound_include_ports:
            self.ports.update(abi.TpPortKey(gen, abi.TP_PORT_INCLUDE_OUT, port), one)
        for port in settings.inbound_exclude_ports:
            self.ports.update(abi.TpPortKey(gen, abi.TP_PORT_EXCLUDE_IN, port), one)
        for port in settings.inbound_include_ports:
            self.ports.update(abi.TpPortKey(gen, abi.TP_PORT_INCLUDE_IN, port), one)
        for net in settings.outbound_exclude_ips:
            self.cidrs.update(abi.cidr_key(gen, abi.TP_CIDR_EXCLUDE_OUT, net), one)
        for net in settings.inbound_exclude_ips:
            self.cidrs.update(abi.cidr_key(gen, abi.TP_CIDR_EXCLUDE_IN, net), one)
        for ip in p["dns_servers"]:
            self.cidrs.update(abi.cidr_key(gen, abi.TP_CIDR_DNS_SERVER, ip), one)
        for net in p["local_networks"]:
            self.cidrs.update(abi.cidr_key(gen, abi.TP_CIDR_LOCAL, net), one)
        for i, r in enumerate(settings.uid_rules):
            lo, hi = kernel.kernel_uid(r.uid_lo), kernel.kernel_uid(r.uid_hi)
            if hi - lo != r.uid_hi - r.uid_lo:
                raise ConfigError(f"--exclude-outbound-ports-for-uids: uids {r.uid_lo}-"
                                  f"{r.uid_hi} span several user-namespace mappings; split "
                                  "the range")
            rule = abi.TpUidRule(uid_lo=lo, uid_hi=hi, protos=r.protos, n_ranges=len(r.ports))
            for j, (lo, hi) in enumerate(r.ports):
                rule.ranges[j] = abi.TpPortRange(lo, hi)
            self.uid_rules.update(ct.c_uint32(gen * abi.TP_MAX_UID_RULES + i), rule)
        self.config.update(ct.c_uint32(gen), _config_struct(settings, p))

    def flip(self, gen):
        self.active.update(ct.c_uint32(0), ct.c_uint32(gen))

    def write_meta(self, p):
        raw = json.dumps(_shorten_lists(p), separators=(",", ":")).encode()
        if len(raw) > abi.TP_META_SIZE:
            raise InstallError(f"the instance description is {len(raw)} bytes, over "
                               f"{abi.TP_META_SIZE}; shorten the exclusion lists (use CIDRs "
                               "and port ranges)")
        self.meta.update(ct.c_uint32(0), abi.TpMeta(len(raw), raw))

    def read_meta(self):
        m = self.meta.lookup(ct.c_uint32(0))
        if not m or not m.len:
            return None
        return json.loads(bytes(m.json[:m.len]).decode())

    def counters_total(self):
        out = {}
        for cmap, names in ((self.counters, abi.REASONS),
                            (self.accel_counters, abi.ACCEL_COUNTERS)):
            for i, (_, name) in enumerate(names):
                vals = cmap.lookup(ct.c_uint32(i)) if cmap is not None else None
                out[name] = sum(v for v in vals) if vals is not None else 0
        return out


# ------------------------------------------------------------------------- install

def install(settings: Settings, cgroup_path, progress=None):
    """Install or update in place. Returns the plan that is now in force."""
    paths = Paths(settings.bpffs_path, settings.name)
    mounted = kernel.ensure_bpffs(settings.bpffs_path)
    if mounted:
        os.makedirs(MOUNT_MARKER_DIR, exist_ok=True)
        open(_mount_marker(settings.bpffs_path), "w").close()
    added_lo, lo_problem = False, None
    try:
        with bpffs_lock(settings.bpffs_path):
            fresh = not os.path.isdir(paths.instance)
            existing = _read_meta_quiet(paths)
            # Kuma adds ::6/128 to lo for Envoy's IPv6 passthrough source (rule 4c); so do
            # we, and uninstall removes it only if it was ours.
            if settings.ipv6:
                added_lo, lo_problem = netinfo.ensure_lo_address()
            cookie, how = probe.learn_netns_cookie()
            p = plan(settings, netinfo.local_networks(), netinfo.default_instance_ips(),
                     cgroup_path, cookie)
            p["netns_cookie_from"] = how
            p["added_lo_address"] = bool(added_lo or (existing or {}).get("added_lo_address"))
            if settings.ipv6 and lo_problem:
                p.setdefault("warnings", []).append(lo_problem)
            if existing and existing.get("cgroup") != cgroup_path:
                raise InstallError(
                    f"instance {settings.name!r} is attached to {existing.get('cgroup')}; "
                    f"uninstall it first or choose another --name for {cgroup_path}")
            if existing and existing.get("netns_inode") not in (None, p["netns_inode"]):
                raise InstallError(
                    f"instance {settings.name!r} belongs to another network namespace "
                    f"(inode {existing['netns_inode']}); uninstall it first or choose "
                    "another --name")
            try:
                _install_locked(settings, cgroup_path, paths, p, progress)
            except BaseException:
                if fresh:
                    _log(progress, "install failed: rolling back")
                    _remove_instance(paths)
                raise
    except BaseException:
        if added_lo:
            netinfo.remove_lo_address()
        _maybe_unmount(settings.bpffs_path)   # after the lock: its fd keeps the mount busy
        raise
    return p


def _install_locked(settings, cgroup_path, paths, p, progress):
    os.makedirs(paths.maps, exist_ok=True)
    os.makedirs(paths.links, exist_ok=True)
    _log(progress, "probing kernel features")
    try:
        features = probe.build_features(probe.probe_hooks(learn_cookie=False))
    except Exception as e:
        raise InstallError(f"BCC could not build the feature probes ({str(e).splitlines()[0]})"
                           "; run 'make setup' and 'ebpf-tproxy check'") from None
    # Acceleration joins sockets by address in sock_ops; only the netns cookie there keeps
    # two namespaces' identical 4-tuples apart (5.15). Asked for: refuse without it. Left
    # to the default: on where it is safe, off (and said) where it is not.
    can_accelerate = "TP_SOCKOPS_NETNS_COOKIE" in features
    if settings.accelerate is True and not can_accelerate:
        raise InstallError("--ebpf-accelerate: this kernel has no bpf_get_netns_cookie() in "
                           "sock_ops (5.15), which keeps sockets of different network "
                           "namespaces apart; install without --ebpf-accelerate")
    if settings.accelerate is None:
        settings = dataclasses.replace(settings, accelerate=can_accelerate)
        p["acceleration"] = ("on" if can_accelerate else
                             "off (this kernel has no netns cookie in sock_ops, 5.15)")
    else:
        p["acceleration"] = "on" if settings.accelerate else "off (--ebpf-accelerate=false)"
    _log(progress, f"sockmap acceleration: {p['acceleration']}")
    p["config"]["ebpf"]["accelerate"] = settings.accelerate
    _log(progress, "compiling the BPF programs (BCC)"
         + (f" with {', '.join(features)}" if features else ""))
    try:
        bpf = programs.compile_programs(paths.maps, features)
    except Exception as e:   # BCC raises a bare Exception; its compiler output is on stderr
        raise InstallError(f"BCC could not build the programs ({str(e).splitlines()[0]}); "
                           "run 'make setup' (kernel headers, python3-bpfcc) and "
                           "'ebpf-tproxy check'") from None
    maps = Maps(paths)
    targets = {"cgroup": os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY),
               "netns": os.open("/proc/self/ns/net", os.O_RDONLY),
               "map:tp_accel": bpfsys.obj_get(paths.map("tp_accel"))}
    # a cgroup2 directory's inode is its id; a netns is named by its inode
    target_ids = {"cgroup": os.stat(cgroup_path).st_ino, "netns": p["netns_inode"]}
    try:
        loaded = []
        for prog in programs.PROGRAMS:
            needed = (prog.required or (prog.target == "netns" and settings.inbound_enabled)
                      or (prog.target == "map:tp_accel" and settings.accelerate))
            try:
                loaded.append((prog, programs.load(bpf, prog)))
            except Exception as e:
                why = str(e).splitlines()[0]
                if needed:
                    raise InstallError(f"the kernel refused {prog.hook} ({why})"
                                       + (f": {prog.missing_means}" if not prog.required
                                          else "; run 'ebpf-tproxy check'"))
                _log(progress, f"warning: {prog.hook} unavailable, so {prog.missing_means}")
        active = maps.active_gen()
        new = active ^ 1
        _log(progress, f"writing configuration generation {new}")
        maps.clear_gen(new)
        maps.write_gen(new, settings, p)
        swapped = []   # (pin, fd of the program it ran before): an upgrade's rollback
        try:
            for prog, fd in loaded:
                if prog.target.startswith("map:"):
                    # Replaces the map's previous program; it only runs for sockets that
                    # sock_ops adds, which it does only with TP_F_ACCELERATE set.
                    bpfsys.prog_attach(fd, targets[prog.target], prog.attach_type)
                    _log(progress, f"attached {prog.hook} to {prog.target[4:]}")
                    continue
                _attach(prog, fd, paths.link(prog.name), targets[prog.target],
                        target_ids[prog.target], swapped, progress)
                _test_pause("after-link")
                _test_hold(f"after-link {prog.name}")
        except BaseException:
            for pin, old_fd in reversed(swapped):
                with contextlib.suppress(OSError):
                    link_fd = bpfsys.obj_get(pin)
                    try:
                        bpfsys.link_update(link_fd, old_fd)
                    finally:
                        os.close(link_fd)
            if swapped:
                _log(progress, f"restored the previous program on {len(swapped)} hooks")
            raise
        finally:
            for _, old_fd in swapped:
                os.close(old_fd)
        if settings.inbound_enabled:
            # Before the flip: from the moment inbound capture is on, a proxy that was
            # already listening must be there to take the connections.
            lines, problems = listeners.register_existing(
                paths.map("tp_listeners"), settings.inbound_port, cgroup_path)
            for line in lines:
                _log(progress, line)
            p.setdefault("warnings", []).extend(problems)
        _test_hold("before-flip")
        maps.flip(new)
        # The old generation may still be in use by a program that read tp_active a moment
        # ago; programs run inside RCU read-side sections, so once a grace period has
        # passed none is. Then it is cleared, leaving no stale port or CIDR entry. Where
        # the kernel offers no grace-period wait, the next install clears it first.
        if bpfsys.synchronize_rcu():
            maps.clear_gen(active)
        _test_hold("after-flip")
        maps.write_meta(dict(p, installed_at=int(time.time()), features=list(features),
                             programs=[dict(name=pr.name, hook=pr.hook, target=pr.target)
                                       for pr, _ in loaded]))
        _remove_other_abi_maps(paths, progress)
    finally:
        for fd in targets.values():
            os.close(fd)
        maps.close()
        bpf.cleanup()


def _attach(prog, fd, pin, target_fd, target_id, swapped, progress):
    """Point the hook's pinned link at the new program, or create and pin the link."""
    if os.path.exists(pin):
        link_fd = bpfsys.obj_get(pin)
        try:
            info = bpfsys.link_info(link_fd)
            if info["target_id"] == target_id:
                old_fd = bpfsys.prog_fd_by_id(info["prog_id"])
                try:
                    bpfsys.link_update(link_fd, fd)
                except BaseException:
                    os.close(old_fd)
                    raise
                swapped.append((pin, old_fd))
                _log(progress, f"updated {prog.hook} in place")
                return
        finally:
            os.close(link_fd)
        # The cgroup was removed (and maybe made again): the kernel detached the link.
        os.unlink(pin)
        _log(progress, f"{prog.hook}: link was detached from a removed {prog.target}; "
                       "re-attaching")
    link_fd = bpfsys.link_create(fd, target_fd, prog.attach_type)
    try:
        bpfsys.obj_pin(link_fd, pin)
    finally:
        os.close(link_fd)
    _log(progress, f"attached {prog.hook} to {os.readlink(f'/proc/self/fd/{target_fd}')}")


def _test_pause(step):
    """Test seams: EBPF_TPROXY_TEST_PAUSE=<step> stops install at that step (after saying
    so on stderr) until the test kills it, to prove recovery from a loader killed mid-way;
    EBPF_TPROXY_TEST_FAIL=<step> fails there, to prove the rollback."""
    if os.environ.get("EBPF_TPROXY_TEST_FAIL") == step:
        raise InstallError(f"failing at {step} as EBPF_TPROXY_TEST_FAIL asks")
    if os.environ.get("EBPF_TPROXY_TEST_PAUSE") == step:
        import signal
        import sys
        sys.stderr.write(f"paused at {step}\n")
        sys.stderr.flush()
        while True:
            signal.pause()


def _test_hold(step):
    """Test seam: with EBPF_TPROXY_TEST_HOLD=1, install says 'held at <step>' on stderr and
    waits for a line on stdin before going on, so a test can make connections at each step
    of an upgrade (tests/kernel/test_lifecycle.py)."""
    if os.environ.get("EBPF_TPROXY_TEST_HOLD") != "1":
        return
    import sys
    sys.stderr.write(f"held at {step}\n")
    sys.stderr.flush()
    sys.stdin.readline()


def _remove_other_abi_maps(paths, progress):
    """After an upgrade across a layout change (TP_ABI_VERSION), the programs in force use
    the new maps: the old layout's pins only hold memory. Connections in flight across such
    an upgrade lose their SO_ORIGINAL_DST answer (README: upgrades)."""
    mine = os.path.basename(paths.maps)
    for entry in sorted(os.listdir(paths.instance)):
        if entry.startswith("maps-v") and entry != mine:
            shutil.rmtree(os.path.join(paths.instance, entry))
            _log(progress, f"removed the maps of an older layout ({entry})")


def _read_meta_quiet(paths):
    try:
        maps = Maps(paths)
    except OSError:
        return None
    try:
        return maps.read_meta()
    except (OSError, ValueError):
        return None
    finally:
        maps.close()


# ------------------------------------------------------------------------- uninstall

def _remove_instance(paths):
    """Detach every link, then remove every pin and directory of the instance."""
    removed = []
    if os.path.isdir(paths.links):
        for name in sorted(os.listdir(paths.links)):
            pin = os.path.join(paths.links, name)
            try:
                fd = bpfsys.obj_get(pin)
                try:
                    # Detach now, even if some process still holds the link open.
                    bpfsys.link_detach(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass
            os.unlink(pin)
            removed.append(f"link {name}")
    if os.path.isdir(paths.instance):
        shutil.rmtree(paths.instance)
        removed.append(paths.instance)
    root = os.path.dirname(paths.instance)
    with contextlib.suppress(OSError):
        os.rmdir(root)   # only if no other instance is left
    return removed


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


def _netns_path(inode):
    """A path to the network namespace with this inode: a name in /run/netns, or a
    process living in it."""
    candidates = [os.path.join("/run/netns", n) for n in sorted(os.listdir("/run/netns"))] \
        if os.path.isdir("/run/netns") else []
    candidates += [f"/proc/{pid}/ns/net" for pid in os.listdir("/proc") if pid.isdigit()]
    for path in candidates:
        try:
            if os.stat(path).st_ino == inode:
                return path
        except OSError:
            continue
    return None


def _remove_lo_address_in(inode):
    """Remove the ::6 install added to lo, in the instance's namespace."""
    if inode is None or inode == netns_inode():
        netinfo.remove_lo_address()
        return [f"{netinfo.KUMA_LO_V6}/128 on lo (added by install)"]
    path = _netns_path(inode)
    if path is None:
        return []   # the namespace is gone, and the address with it
    subprocess.run(["nsenter", f"--net={path}", "ip", "-6", "addr", "del",
                    f"{netinfo.KUMA_LO_V6}/128", "dev", "lo"], capture_output=True)
    return [f"{netinfo.KUMA_LO_V6}/128 on lo of {path} (added by install)"]


def uninstall(bpffs, name):
    """Remove the instance. Returns what was removed (empty if there was nothing)."""
    paths = Paths(bpffs, name)
    if not kernel.is_bpffs(bpffs):
        return []
    with bpffs_lock(bpffs):
        meta = _read_meta_quiet(paths) or {}
        removed = _remove_instance(paths)
    if meta.get("added_lo_address"):
        removed += _remove_lo_address_in(meta.get("netns_inode"))
    if _maybe_unmount(bpffs):   # after the lock: its fd keeps the mount busy
        removed.append(f"bpffs mount at {bpffs} (mounted by install)")
    return removed


# ------------------------------------------------------------------------- status

def _count_keys(pin, key_type):
    """Entries in a pinned map (0 if it is not there: an instance from before it existed)."""
    try:
        with bpfsys.PinnedMap(pin, key_type, ct.c_uint64, max_entries=abi.TP_ACCEL_MAX) as m:
            return len(m.keys())
    except OSError:
        return 0


def list_instances(bpffs):
    root = os.path.join(bpffs, ROOT_DIR)
    if not kernel.is_bpffs(bpffs) or not os.path.isdir(root):
        return []
    return sorted(os.listdir(root))


def _link_info(pin):
    fd = bpfsys.obj_get(pin)
    try:
        return bpfsys.link_info(fd)
    finally:
        os.close(fd)


def status(bpffs, name=None):
    """[{name, meta, links, counters, tracked_connections, problems}] for each instance."""
    out = []
    for inst in list_instances(bpffs):
        if name and inst != name:
            continue
        paths = Paths(bpffs, inst)
        entry = {"name": inst, "problems": [], "links": {}}
        try:
            maps = Maps(paths)
        except OSError as e:
            entry["problems"].append(f"maps unreadable ({e}); reinstall or uninstall")
            out.append(entry)
            continue
        try:
            entry["meta"] = maps.read_meta()
            entry["counters"] = maps.counters_total()
            entry["tracked_connections"] = len(maps.conns.keys())
            entry["accelerated_sockets"] = _count_keys(paths.map("tp_accel"), abi.TpSockKey)
            entry["active_generation"] = maps.active_gen()
        finally:
            maps.close()
        try:
            entry["inbound_listeners"] = listeners.registered(paths.map("tp_listeners"))
        except OSError:
            entry["inbound_listeners"] = {}
        if entry["meta"] is None:
            entry["problems"].append("install did not finish; run install again or uninstall")
        if os.path.isdir(paths.links):
            for ln in sorted(os.listdir(paths.links)):
                try:
                    entry["links"][ln] = _link_info(paths.link(ln))
                except OSError as e:
                    entry["problems"].append(f"link {ln}: {e}")
        meta = entry["meta"] or {}
        cg = meta.get("cgroup")
        want = {"cgroup": os.stat(cg).st_ino if cg and os.path.isdir(cg) else None,
                "netns": meta.get("netns_inode")}
        kinds = {pr["name"]: pr.get("target", "cgroup") for pr in meta.get("programs", [])}
        linked = {n for n, k in kinds.items() if not k.startswith("map:")}
        for ln, info in entry["links"].items():
            kind = kinds.get(ln, "cgroup")
            if info.get("target_id") != want[kind]:
                entry["problems"].append(f"link {ln} is detached (its {kind} is gone); run "
                                         "install again")
        for missing in sorted(linked - set(entry["links"])):
            entry["problems"].append(f"link {missing} missing; run install again")
        out.append(entry)
    return out

