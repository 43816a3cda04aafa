"""ebpf-tproxy agent: one long-running process per node that keeps capture right while the
node changes. It loads the node program set at start (so no install compiles), applies every
stored configuration again (after a reboot the bpffs is empty), follows each registered
namespace's addresses over netlink, removes namespaces that disappeared, re-reads the store
on SIGHUP or when a stored file changes, and serves Prometheus metrics and health checks.

Nothing captures *through* the agent: every program, link and map is pinned, so capture
goes on untouched while the agent is stopped, restarted or killed; a new agent picks up the
pinned set and the registrations as they are. Its presence is an flock (lifecycle's agent
lock) that the kernel drops however it dies: while it is held, uninstalling the last
namespace keeps the node set loaded for the next one.

Each namespace is worked on in a short-lived thread inside it (netns.run_in), with the same
lifecycle.install the CLI runs: the same checks, the same atomic switch of the namespace's
configuration generation, so no connection is lost by an update.

Overhead: idle, one select() a second over one netlink socket per registered namespace and
a read of the registrations (tp_ns_meta); an address change costs one install's map writes
(milliseconds). A scrape walks the shared maps once (entry counts).
"""
import dataclasses
import datetime
import json
import os
import select
import signal
import socket
import struct
import sys
import time

from . import (config, kernel, lifecycle, metrics, namespace, netinfo, netns, node, store,
               systemd)
from .config import ConfigError
from .node import InstallError, NodePaths

RESYNC_S = 1.0      # registrations, the store and the node set are looked at this often
SETTLE_S = 0.05     # address events arrive in bursts (DAD, routes): wait this long for more
RETRY_MAX_S = 60.0  # a failed apply is tried again after 1, 2, 4 ... up to this many seconds

# rtnetlink multicast groups (linux/rtnetlink.h): addresses, and routes, whose local table
# is what "local" means to Kuma's rules (iptables' -o lo).
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
WATCH_GROUPS = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWADDR, RTM_DELADDR = 24, 25, 20, 21
RT_TABLE_LOCAL = 255


class AgentError(RuntimeError):
    """The agent cannot start (one line: what and how to fix it)."""


class Log:
    """One line per event on stderr (journald keeps it): text, or JSON for collectors."""

    def __init__(self, fmt="text", stream=None):
        self.fmt, self.stream = fmt, stream or sys.stderr

    def __call__(self, event, msg="", **fields):
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        if self.fmt == "json":
            line = json.dumps({"time": now, "event": event, "msg": msg, **fields},
                              sort_keys=False, default=str)
        else:
            extra = " ".join(f"{k}={v}" for k, v in fields.items())
            line = f"{now} {event}: {msg}" + (f" ({extra})" if extra else "")
        print(line, file=self.stream, flush=True)


def relevant(data):
    """Whether a batch of rtnetlink messages holds an address change, or a route change in
    the local table (the others, a BGP node's thousands of routes, change nothing local)."""
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            return True
        # struct rtmsg after the 16-byte header: family, dst_len, src_len, tos, table, ...
        if kind in (RTM_NEWROUTE, RTM_DELROUTE) and off + 21 <= len(data) and \
                data[off + 20] == RT_TABLE_LOCAL:
            return True
        off += (length + 3) & ~3
    return False


def _meta(paths, name):
    """A registration's description as it is now (None if not registered)."""
    if node.read_meta(paths) is None:
        return None
    with namespace.NodeMaps(paths) as maps:
        return maps.read_meta(name)


def unchanged_since(name, meta):
    """install's precondition for re-applying a registration read as meta: checked under
    the bpffs lock, an uninstall or install since then wins (uninstalled stays uninstalled;
    a new install read the addresses itself)."""
    seen = (meta.get("generation"), meta.get("config_digest"))

    def check(paths):
        m = _meta(paths, name)
        if m is None:
            return "uninstalled meanwhile"
        if (m.get("generation"), m.get("config_digest")) != seen:
            return "installed again meanwhile"
        return None
    return check


def _watch_socket():
    """A netlink socket, in the calling thread's namespace, told of address and route
    changes. Only its wakeups matter: what changed is read again through pyroute2."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK |
                      socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    s.bind((0, WATCH_GROUPS))
    return s


@dataclasses.dataclass
class Watched:
    name: str
    inode: int
    path: str
    sock: socket.socket


def settings_of_meta(name, meta):
    """The Settings a registered namespace was installed with (its description's Kuma
    view), for applying it again after its addresses changed."""
    return config.settings_from_document(config.prune_view(meta["config"]), name,
                                         f"registration {name!r}")


def _in_force(settings, meta):
    """Whether this configuration is the one the registration was installed with."""
    return bool(meta) and meta.get("complete", True) and \
        meta.get("config_digest") == config.digest_of(settings)


class Agent:
    def __init__(self, bpffs, state_dir, log, metrics_address=None, store_grace=600,
                 cni_socket=None):
        self.bpffs, self.state_dir, self.log = bpffs, state_dir, log
        self.paths = NodePaths(bpffs)
        self.metrics_address = metrics_address
        self.stats = {"reloads": 0, "gc": 0, "applied": 0, "apply_failures": 0,
                      "address_changes": 0, "state_file_errors": 0}
        self.ready = False
        self.started_at = time.time()
        self.watched = {}          # name -> Watched
        self.path_of = {}          # netns inode -> a path that reached it
        self.store_grace = store_grace
        self._store_seen = None    # store.fingerprint at the last clean pass
        self._bad_seen = set()     # problem lines already logged (said once per change)
        self._missing_since = {}   # stored name -> when its namespace was first missing
        self._retry_at, self._backoff = None, 1.0   # after a failed apply
        self._said = set()         # one-off lines already logged
        self.heartbeat = time.monotonic()
        self._stop = self._hup = False
        self._lock_fd = None
        self._wake_r = self._wake_w = None
        self.server = None
        self.cni_socket = cni_socket
        self.cni = None            # loader/cni/server.py, once the node set is loaded

    # ------------------------------------------------------------------ lifecycle
    def start(self):
        self._lock_fd = lifecycle.hold_agent_lock(self.bpffs, patience=1.0)
        if self._lock_fd is None:
            raise AgentError(f"another agent already serves {self.bpffs} (it holds "
                             f"{lifecycle.agent_lock_path(self.bpffs)}); stop it first")
        try:
            self._signals()
            try:
                if kernel.join_initial_cgroup_namespace():
                    self.log("cgroupns", "joined the host's cgroup namespace (ours was a "
                             "container's): cgroup paths read as the host's")
            except OSError as e:
                self.log("warning", f"{e}: a proxy listening before its namespace is "
                         "registered may not be found (run with the host's PIDs)")
            if self.metrics_address:
                self.server = metrics.serve(self.metrics_address, self)
                host, port = self.server.server_address[:2]
                host = f"[{host}]" if ":" in host else host
                self.log("listening", f"metrics and health on http://{host}:{port}")
            self.ensure_node()
            if self.cni_socket:
                from .cni.server import CNIServer
                self.cni = CNIServer(self.cni_socket, self.log)
                self.log("listening", f"CNI requests on {self.cni_socket}")
            self.apply_store("start")
            self.sync()
        except BaseException:
            self.close(clean=False)
            raise
        self.ready = True
        n = len(self.watched)
        systemd.notify(f"READY=1\nSTATUS=serving {n} namespace{'s' * (n != 1)}")
        self.log("ready", f"serving {n} registered namespace{'s' * (n != 1)}")

    def run(self):
        """The loop, until SIGTERM or SIGINT."""
        next_sync = time.monotonic() + RESYNC_S
        while not self._stop:
            self.heartbeat = time.monotonic()
            systemd.notify("WATCHDOG=1")   # WatchdogSec: a loop stuck for a minute restarts
            # poll, not select: up to 1,024 namespaces' sockets plus our own fds exceed
            # select's FD_SETSIZE.
            socks = {w.sock.fileno(): w for w in self.watched.values()}
            poller = select.poll()
            for fd in (self._wake_r, *socks):
                poller.register(fd, select.POLLIN)
            timeout = max(0.0, next_sync - time.monotonic())
            dirty = self._readable(poller, socks, timeout)
            if self._stop:
                break
            try:
                self._work(dirty, poller, socks, next_sync)
            except Exception as e:   # a daemon logs what it did not foresee and goes on
                self.log("error", f"{type(e).__name__}: {e}")
            if time.monotonic() >= next_sync:
                next_sync = time.monotonic() + RESYNC_S

    def _readable(self, poller, socks, timeout):
        """Wait up to timeout; the names of the namespaces whose watcher spoke (drained)."""
        dirty = set()
        for fd, _ in poller.poll(timeout * 1000):
            if fd == self._wake_r:
                _drain(self._wake_r)
            elif _drain_sock(socks[fd].sock):
                dirty.add(socks[fd].name)
        return dirty

    def _work(self, dirty, poller, socks, next_sync):
        """One turn of the loop: a pending SIGHUP, address events, the periodic sync."""
        if self._hup:
            self._hup = False
            self.reload("SIGHUP")
        if dirty:
            # A burst (an IPv6 address: added, then DAD done, then its local route) is
            # handled once.
            time.sleep(SETTLE_S)
            dirty |= self._readable(poller, socks, 0)
            for name in sorted(dirty):
                try:
                    self.refresh_addresses(name)
                except Exception as e:   # one namespace's trouble stops no other's
                    self.log("error", f"{name!r}: {type(e).__name__}: {e}")
        if time.monotonic() >= next_sync:
            self.sync()

    def close(self, clean=True):
        """Stop serving. A clean stop with no namespace registered removes the node set the
        agent loaded (nothing is left behind); otherwise every pin stays."""
        systemd.notify("STOPPING=1")
        if self.cni is not None:
            # First: an ADD from now on is told to try again, not served half-way.
            self.cni.close()
            self.cni = None
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        for w in self.watched.values():
            w.sock.close()
        self.watched.clear()
        if self._wake_w is not None:
            signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None
        if self._lock_fd is not None:
            lifecycle.drop_agent_lock(self.bpffs, self._lock_fd)
            self._lock_fd = None
            if clean:
                removed = lifecycle.release_node(self.bpffs)
                if removed:
                    self.log("released", "no namespace registered: node program set removed",
                             objects=len(removed))
        self.log("stopped", "clean stop" if clean else "stopped after an error")

    def _signals(self):
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

        def on_stop(signum, frame):
            self._stop = True

        def on_hup(signum, frame):
            self._hup = True
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    # ------------------------------------------------------------------ the work
    def ensure_node(self):
        built = lifecycle.load_node(self.bpffs, progress=lambda m: self.log("node", m))
        meta = node.read_meta(self.paths) or {}
        self.log("node", ("built and loaded" if built else "already loaded")
                 + f" node program set {meta.get('digest')}", features=len(meta.get(
                     "features", [])))

    def registrations(self):
        with namespace.NodeMaps(self.paths) as maps:
            return maps.registrations()

    def reload(self, why):
        self.stats["reloads"] += 1
        self.log("reload", why)
        self._store_seen = None
        self.apply_store(why)
        systemd.notify(f"STATUS=serving {len(self.watched)} namespaces (reloaded)")

    def sync(self):
        """Bring everything in line: the node set there, namespaces that disappeared gone,
        every registered namespace watched, the store applied if it changed (or one of its
        namespaces is awaited, or a failed apply is due again)."""
        try:
            if node.read_meta(self.paths) is None:
                self.log("node", "the node program set is gone (uninstall --all?): loading it")
                self.ensure_node()
            with lifecycle.bpffs_lock(self.bpffs):
                gone = lifecycle.remove_stale(self.paths)
            for name in gone:
                self._gone(name, "its network namespace was deleted without uninstall")
            regs = self.registrations()
        except (ConfigError, InstallError, kernel.HostError, OSError) as e:
            self.log("sync-failed", str(e))
            return
        self._watch(regs)
        changed = store.fingerprint(self.state_dir) != self._store_seen
        due = self._retry_at is not None and time.monotonic() >= self._retry_at
        if changed or due or self._missing_since:
            self.apply_store("store changed" if changed else "retry" if due else "awaited")

    def _gone(self, name, why):
        """A registered namespace was destroyed: its watcher goes, and its stored
        configuration too, unless its path already names a namespace again (made anew
        under the same name: the store applies to it)."""
        self.stats["gc"] += 1
        w = self.watched.pop(name, None)
        if w is not None:
            w.sock.close()
        forgotten = False
        s = store.read_if_any(self.state_dir, name)
        if s is not None and netns.inode_of(s.netns) is None:
            forgotten = store.forget(self.state_dir, name)
        self.log("gc", f"removed {name!r}: {why}", stored=forgotten)

    def _watch(self, regs):
        for name in list(self.watched):
            w = self.watched[name]
            meta = regs.get(name)
            # A watcher's socket keeps its namespace alive: once the path that reached it
            # is gone (the bind mount removed, the process exited), let go of it, so that
            # a namespace deleted without uninstall is destroyed and its sk_lookup link
            # says so (remove_stale). Found again under another path, it is watched again.
            if meta is None or meta.get("netns_inode") != w.inode or \
                    netns.inode_of(w.path) != w.inode:
                w.sock.close()
                del self.watched[name]
        unwatched = {m.get("netns_inode") for n, m in regs.items()
                     if n not in self.watched and m.get("complete", True)}
        found = self._find(unwatched)
        for name, meta in regs.items():
            if name in self.watched or not meta.get("complete", True):
                continue
            inode = meta.get("netns_inode")
            path = found.get(inode)
            if path is None:
                continue
            try:
                sock = netns.run_in(path, _watch_socket)
            except (ConfigError, OSError) as e:
                self.log("watch-failed", f"{name!r}: {e}")
                continue
            self.watched[name] = Watched(name, inode, path, sock)
            self.log("watching", f"addresses of {name!r}", netns=path)
            # Addresses may have changed while nobody watched (agent restarted).
            self.refresh_addresses(name, meta)

    def _find(self, inodes):
        """{inode: a path reaching it} for the namespaces that can be reached: the path
        that did last time, else one scan of /run/netns and /proc for all of them."""
        out, missing = {}, set()
        for inode in inodes:
            path = self.path_of.get(inode)
            if path is not None and netns.inode_of(path) == inode:
                out[inode] = path
            else:
                missing.add(inode)
        if missing:
            for inode, path in netns.find_all(missing).items():
                out[inode] = self.path_of[inode] = path
        return out

    def refresh_addresses(self, name, meta=None):
        """Apply a namespace's configuration again if its local networks changed."""
        w = self.watched.get(name)
        if w is None:
            return
        if meta is None:
            meta = self.registrations().get(name)
            if meta is None:
                return
        try:
            now = netns.run_in(w.path, netinfo.local_networks)
        except (ConfigError, OSError) as e:
            self.log("watch-failed", f"{name!r}: cannot read its addresses: {e}")
            return
        ipv6 = (meta.get("config") or {}).get("ipFamilyMode") == "dualstack"
        now = namespace.local_set(now, ipv6)
        before = meta.get("local_networks")
        if meta.get("local_digest"):
            # The description shortens a long list; its digest is whole.
            if namespace.local_digest(now) == meta["local_digest"]:
                return
        elif now == before:
            return
        self.stats["address_changes"] += 1
        if isinstance(before, list):
            self.log("addresses", f"{name!r} changed",
                     added=",".join(sorted(set(now) - set(before))) or "-",
                     removed=",".join(sorted(set(before) - set(now))) or "-")
        else:
            self.log("addresses", f"{name!r} changed", local=len(now))
        try:
            settings = self._settings_in_force(name, meta)
        except ConfigError as e:
            self.log("apply-failed", f"{name!r}: {e}")
            self.stats["apply_failures"] += 1
            return
        self.apply(name, w.path, settings, meta.get("cgroup"),
                   precondition=unchanged_since(name, meta))

    def _settings_in_force(self, name, meta):
        """The Settings a registration was installed with: the stored ones if they are
        (complete, whatever their length), else read back from its description."""
        s = store.read_if_any(self.state_dir, name)
        if s is not None and _in_force(s.settings, meta):
            return s.settings
        try:
            return settings_of_meta(name, meta)
        except ConfigError as e:
            raise ConfigError(f"its configuration cannot be read back from its description "
                              f"({e}); install it with --store, which keeps it whole") from None

    def apply_store(self, why):
        """Apply every stored configuration that is not in force. A namespace whose path
        does not exist is waited for (it may be made after the agent started at boot) and
        dropped from the store after store_grace seconds; a failed apply is tried again
        with a growing delay."""
        fingerprint = store.fingerprint(self.state_dir)
        try:
            stored, bad = store.read_all(self.state_dir)
            regs = self.registrations()
        except (ConfigError, OSError) as e:
            self.log("state-error", str(e))
            self.stats["state_file_errors"] += 1
            self._store_seen = fingerprint
            self._failed()
            return
        for line in bad:
            if line not in self._bad_seen:
                self.stats["state_file_errors"] += 1
                self.log("state-error", f"{line} (that namespace is skipped)")
        self._bad_seen = set(bad)
        ok, now = True, time.monotonic()
        names = {s.name for s in stored}
        for name in list(self._missing_since):
            if name not in names:
                del self._missing_since[name]
        for s in stored:
            inode = netns.inode_of(s.netns)
            if inode is None:
                if s.name in regs:
                    continue   # gone, but sk_lookup has not said so yet: sync removes it
                first = self._missing_since.setdefault(s.name, now)
                if now - first >= self.store_grace:
                    del self._missing_since[s.name]
                    self.stats["gc"] += 1
                    store.forget(self.state_dir, s.name)
                    self.log("gc", f"dropped {s.name!r} from the store: {s.netns} has not "
                             f"existed for {self.store_grace} s", stored=True)
                elif first == now:
                    self.log("waiting", f"{s.name!r}: {s.netns} does not exist; applied when "
                             f"it does, dropped from the store after {self.store_grace} s")
                continue
            reason = why
            if self._missing_since.pop(s.name, None) is not None:
                reason = f"{s.netns} appeared"
            if s.settings.bpffs_path != self.bpffs:
                self._say_once(("bpffs", s.file), "state-error",
                               f"{s.file}: stored for bpffs {s.settings.bpffs_path}, this "
                               f"agent serves {self.bpffs} (skipped)")
                continue
            meta = regs.get(s.name)
            if meta and meta.get("netns_inode") == inode and _in_force(s.settings, meta):
                continue
            ok &= self.apply(s.name, s.netns, s.settings, None, why=reason,
                             precondition=self._still_stored(s))
        self._store_seen = fingerprint
        if ok:
            self._retry_at, self._backoff = None, 1.0
        else:
            self._failed()

    def _failed(self):
        """Try the store again after a growing delay (a change to it retries at once)."""
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, RETRY_MAX_S)

    def _still_stored(self, s):
        def check(paths):
            # Under the bpffs lock, which the CLI holds while it changes the store: an
            # install or uninstall since the file was read wins.
            try:
                cur = store.read(self.state_dir, s.name)
            except ConfigError:
                return "its stored configuration is gone"
            if cur.netns != s.netns or config.digest_of(cur.settings) != \
                    config.digest_of(s.settings):
                return "its stored configuration changed meanwhile"
            m = _meta(paths, s.name)
            if m and m.get("netns_inode") == netns.inode_of(s.netns) and \
                    _in_force(s.settings, m):
                return "already in force"
            return None
        return check

    def _say_once(self, key, event, msg):
        if key not in self._said:
            self._said.add(key)
            self.log(event, msg)

    def apply(self, name, path, settings, cgroup, why="addresses changed", precondition=None):
        """lifecycle.install, in the namespace at path (only if precondition, checked under
        the bpffs lock, still holds). False if it failed."""
        try:
            cgroup = cgroup or kernel.resolve_cgroup(settings.cgroup_path)
            p = netns.run_in(path, lifecycle.install, settings, cgroup,
                             precondition=precondition)
        except lifecycle.Skipped as e:
            self.log("skipped", f"{name!r}: {e}")
            return True
        except Exception as e:   # one namespace's failure stops no other's
            self.stats["apply_failures"] += 1
            self.log("apply-failed", f"{name!r}: {e}", netns=path)
            return False
        self.stats["applied"] += 1
        self.path_of[p["netns_inode"]] = path
        for w in p.get("warnings", []):
            self.log("warning", f"{name!r}: {w}")
        self.log("applied", f"{name!r} ({why})", netns=path,
                 generation=p.get("generation"), local=len(p.get("local_networks", [])))
        return True


def _drain(fd):
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _drain_sock(sock):
    """Read what the watcher got; whether any of it may change the local networks."""
    hit = False
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return hit
        except OSError:
            return True   # ENOBUFS: events were lost; read the addresses again
        if not data:
            return hit
        hit = hit or relevant(data)
