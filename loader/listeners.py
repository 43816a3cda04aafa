"""Registering a proxy that was already listening before install.

sock_ops registers the proxy's inbound listener when it calls listen(), and bind4/6 mark
the proxy's listeners with their namespace (tp_sk_ns) when they bind. A proxy started
before install has done both already, so install finds its listening sockets itself: the
namespace's listening sockets (sock_diag, which walks only the listening hash: /proc/net/tcp
walks every connection of every namespace on the host, 8 ms a read on a busy node) give
the inode of each socket listening on a redirect port, /proc/PID/fd gives a process of the captured cgroup that
holds it, and pidfd_getfd() (Linux >= 5.6) gives install a copy of the descriptor to put
in tp_listeners (inbound port) and to mark in tp_sk_ns (both ports). Later restarts are
the programs' job again.
"""
import ctypes as ct
import os
import socket

from . import abi, bpfsys, kernel

SYS_PIDFD_GETFD = 438   # the same number on x86_64 and arm64
TCP_LISTEN = 10


def _loopback(addr):
    """A listening address that is loopback: 127.0.0.0/8, ::1, or ::ffff:127.x.x.x, as
    tp_addr_is_loopback_net() in BPF."""
    import ipaddress
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def listening_inodes(port, loopback=False):
    """{inode: TP_LISTENER_V4/V6} of sockets listening on port in this namespace, except
    loopback-only ones unless asked (sock_ops never registers those for inbound: they never
    receive connections from other hosts)."""
    from pyroute2.netlink.diag import DiagSocket
    out = {}
    # Made in the calling thread, so in its namespace (the agent enters one per thread).
    with DiagSocket() as diag:
        diag.bind()
        for family, key in ((socket.AF_INET, abi.TP_LISTENER_V4),
                            (socket.AF_INET6, abi.TP_LISTENER_V6)):
            for msg in diag.get_sock_stats(family=family, states=1 << TCP_LISTEN):
                if msg["idiag_sport"] == port and \
                        (loopback or not _loopback(msg["idiag_src"])):
                    out[msg["idiag_inode"]] = key
    return out


def _in_cgroup(pid, cgroup_rel):
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    path = line[3:].strip()
                    return path == cgroup_rel or path.startswith(cgroup_rel.rstrip("/") + "/")
    except OSError:
        pass
    return False


def _holders(inodes, cgroup_rel):
    """(pid, fd, inode) for each wanted socket, held by a process of the cgroup subtree."""
    want = {f"socket:[{i}]": i for i in inodes}
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if not _in_cgroup(pid, cgroup_rel):
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in want and want[target] not in found:
                found[want[target]] = (int(pid), int(fd))
    return found


def _dup_from(pid, fd):
    libc = ct.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        new = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            raise OSError(ct.get_errno(), os.strerror(ct.get_errno()))
        return new
    finally:
        os.close(pidfd)


SO_COOKIE = 57


def _socket_cookie(fd):
    s = socket.socket(fileno=os.dup(fd))
    try:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
    finally:
        s.close()


def _slots(ns_index, family):
    base = (ns_index * 2 + family) * abi.TP_LISTENER_SLOTS
    return range(base, base + abi.TP_LISTENER_SLOTS)


def _cookies(sockmap, ns_index, family):
    """{slot: socket cookie} of the family's occupied slots in the namespace's row."""
    out = {}
    for key in _slots(ns_index, family):
        try:
            v = sockmap.lookup(ct.c_uint32(key))
        except OSError:
            v = None
        if v is not None:
            out[key] = v.value
    return out


def _mark(pin, fd, cookie):
    """tp_sk_ns of the socket: its namespace, as bind4/6 would have set it."""
    with bpfsys.PinnedMap(pin, ct.c_int, ct.c_uint64) as storage:
        storage.update(ct.c_int(fd), ct.c_uint64(cookie))


def register_existing(paths, ns_index, netns_cookie, settings, cgroup_path):
    """Mark the proxy sockets already listening on the namespace's redirect ports with the
    namespace, and put those on the inbound port into free slots of its row of
    tp_listeners (each socket of a SO_REUSEPORT group takes one, as sock_ops does at
    listen()); a socket already there (an upgrade in place keeps the map) stays where it is.
    Returns (lines for --verbose, warnings every user must see)."""
    root = kernel.cgroup2_mount() or "/"
    cgroup_rel = "/" + os.path.relpath(cgroup_path, root).lstrip(".")
    ports = [settings.outbound_port] + ([settings.inbound_port]
                                        if settings.inbound_enabled else [])
    lines, warnings = [], []
    for port in ports:
        inbound = settings.inbound_enabled and port == settings.inbound_port
        inodes = listening_inodes(port, loopback=True)
        registrable = listening_inodes(port) if inbound else {}
        if not registrable and inbound:
            lines.append(f"no proxy listens on port {port} yet: it is registered when it "
                         "does")
        if not inodes:
            continue
        holders = _holders(inodes, cgroup_rel)
        if registrable and not any(i in registrable for i in holders):
            warnings.append(f"something listens on port {port} outside {cgroup_path}: it is "
                            "not the proxy of this cgroup, so inbound connections are refused "
                            "until the proxy listens")
        for inode, (pid, fd) in holders.items():
            try:
                mine = _dup_from(pid, fd)
            except OSError as e:
                warnings.append(f"cannot take the listener of pid {pid} on port {port} ({e}): "
                                + ("inbound connections are refused until the proxy restarts"
                                   if inbound else "restart the proxy"))
                continue
            try:
                _mark(paths.map("tp_sk_ns"), mine, netns_cookie)
                if inode in registrable:
                    lines.append(_register_one(paths.map("tp_listeners"), ns_index,
                                               inodes[inode], mine, pid, port, warnings))
            finally:
                os.close(mine)
    return [ln for ln in lines if ln], warnings


def _register_one(pin, ns_index, family, fd, pid, port, warnings):
    with bpfsys.PinnedMap(pin, ct.c_uint32, ct.c_uint64) as sockmap:
        taken = _cookies(sockmap, ns_index, family)
        if _socket_cookie(fd) in taken.values():
            return f"the listener of pid {pid} on port {port} is registered"
        free = [k for k in _slots(ns_index, family) if k not in taken]
        if not free:
            warnings.append(f"all {abi.TP_LISTENER_SLOTS} listener slots are taken: the "
                            f"listener of pid {pid} on port {port} is not registered (its "
                            "reuseport group still is, if any member is)")
            return None
        sockmap.update(ct.c_uint32(free[0]), ct.c_uint64(fd))
        return f"registered the listener of pid {pid} on port {port}"


def registered(sockmap_pin, ns_index):
    """{"ipv4"/"ipv6": [socket cookie, ...]} of the namespace's listeners sk_lookup steers
    to now."""
    out = {}
    if ns_index is None:
        return out
    with bpfsys.PinnedMap(sockmap_pin, ct.c_uint32, ct.c_uint64) as sockmap:
        for family, name in ((abi.TP_LISTENER_V4, "ipv4"), (abi.TP_LISTENER_V6, "ipv6")):
            cookies = list(_cookies(sockmap, ns_index, family).values())
            if cookies:
                out[name] = cookies
    return out
