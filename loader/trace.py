"""ebpf-tproxy trace: every decision of the node program set, live, one line each.

The programs send an event for each decision of a namespace whose configuration carries
TP_F_TRACE (bpf/tproxy_trace.h); this module switches that flag on for the namespaces
traced, tells the kernel what to leave out (tp_trace_filter), reads tp_events (a ring
buffer, or before 5.8 a perf event array with one buffer per CPU) and switches the flag
off again when it ends.

The flag carries a lease: the tracer's claim on the bpffs (loader/claim.py), an flock
the kernel drops however the tracer dies. A flag found on with nobody holding the
lease is stale: install, status, the agent and the next trace clear it (clear_stale).
One tracer at a time per bpffs: the filter and, on 5.7, the perf buffers are the node's.

Overhead: a namespace nobody traces pays one test of a flag in the configuration its
program already read. A traced one pays, per decision that passes the filter, about the
cost of copying 88 bytes to the buffer; the events its reader cannot keep up with are
counted as lost, never waited for (make bench, "trace").
"""
import contextlib
import ctypes as ct
import dataclasses
import errno
import ipaddress
import os
import time

from . import abi, bpfsys, claim, config
from .config import ConfigError

PERF_PAGES = 64            # per CPU, on kernels without a ring buffer (256 KiB each)
POLL_MS = 100              # how often a quiet trace checks --duration and new namespaces


def lease_path(bpffs):
    return claim.path("trace", bpffs)


def hold_lease(bpffs):
    """The tracer's claim (loader/claim.py). Returns the fd to keep open; raises
    ConfigError naming the holder if another trace runs."""
    fd = claim.hold(lease_path(bpffs))
    if fd is None:
        raise ConfigError(f"another 'ebpf-tproxy trace' (pid {claim.holder(lease_path(bpffs))})"
                          f" is tracing {bpffs}; one at a time: end it first (Ctrl-C)")
    return fd


def drop_lease(bpffs, fd):
    claim.drop(lease_path(bpffs), fd)


def lease_alive(bpffs):
    """Whether a trace holds the lease on this bpffs now."""
    return claim.held(lease_path(bpffs))


# ------------------------------------------------------------------------ the flag

def set_flag(maps, cookies, on):
    """Switch TP_F_TRACE on or off for these namespaces (cookies). Each tp_ns value is
    replaced whole, as install does. Call under the bpffs lock: install's own switch
    would otherwise race this one. Returns the cookies changed."""
    changed = []
    for cookie in cookies:
        cfg = maps.config(cookie)
        if cfg is None or bool(cfg.flags & abi.TP_F_TRACE) == on:
            continue
        cfg.flags = (cfg.flags | abi.TP_F_TRACE) if on else (cfg.flags & ~abi.TP_F_TRACE)
        maps.ns.update(ct.c_uint64(cookie), cfg)
        changed.append(cookie)
    return changed


def traced_cookies(maps):
    return [k.value for k in maps.ns.keys()
            if (maps.config(k.value) or abi.TpConfig()).flags & abi.TP_F_TRACE]


def clear_stale(maps):
    """A flag left on by a trace that died (its lease is free): off again. Returns how many
    namespaces it was on for. Call under the bpffs lock."""
    if lease_alive(maps.paths.bpffs):
        return 0
    cleared = set_flag(maps, traced_cookies(maps), False)
    if cleared:
        write_filter(maps.paths, abi.TpTraceFilter())   # nobody reads: not active
    return len(cleared)


# ------------------------------------------------------------------------ the filter

@dataclasses.dataclass
class Filter:
    pid: int = None
    uid: int = None           # as the kernel sees it (kernel.kernel_uid)
    reasons: tuple = ()       # counter names (abi.REASONS)
    dst: str = None           # a network, e.g. "10.0.0.0/8" or "fd00::/64"
    port: int = None

    def struct(self):
        f = abi.TpTraceFilter(flags=abi.TP_TF_ACTIVE)
        if self.pid is not None:
            f.flags |= abi.TP_TF_PID
            f.pid = self.pid
        if self.uid is not None:
            f.flags |= abi.TP_TF_UID
            f.uid = self.uid
        if self.reasons:
            f.flags |= abi.TP_TF_REASONS
            for name in self.reasons:
                f.reasons |= 1 << abi.REASON_INDEX[name]
        if self.dst is not None:
            net = ipaddress.ip_network(self.dst, strict=False)
            f.flags |= abi.TP_TF_DST
            f.dst = abi.addr16(net.network_address)
            f.dst_prefix = net.prefixlen + (96 if net.version == 4 else 0)
        if self.port is not None:
            f.flags |= abi.TP_TF_PORT
            f.port = self.port
        return f


def parse_reasons(value, what="--reason"):
    """A comma list of the counters' reason names (those `status` shows)."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    known = {name for _, name in abi.REASONS if not name.startswith("unused_")}
    for n in names:
        if n not in known:
            raise ConfigError(f"{what}: unknown reason {n!r}; the reasons are the counter "
                              f"names of 'ebpf-tproxy status', e.g. redirected_outbound, "
                              "excluded_port, redirected_inbound, orig_dst_missed")
    if not names:
        raise ConfigError(f"{what}: give at least one reason name")
    return tuple(names)


def parse_dst(value, what="--dst"):
    """CIDR[:PORT], ADDRESS[:PORT], [IPv6-CIDR]:PORT or :PORT -> (network or None, port or
    None)."""
    v = value.strip()
    host, port = v, None
    if v.startswith("["):
        end = v.find("]")
        if end < 0 or (v[end + 1:] and not v[end + 1:].startswith(":")):
            raise ConfigError(f"{what}: {value!r} is not [ADDRESS]:PORT; write e.g. "
                              "[fd00::/64]:443")
        host, port = v[1:end], v[end + 2:] or None
    elif v.count(":") == 1:
        host, port = v.split(":")
        host = host or None
    if port is not None:
        number = config.parse_uint(port)
        if number is None or not 1 <= number <= 65535:
            raise ConfigError(f"{what}: port {port!r} is not 1-65535; write e.g. "
                              "10.0.0.0/8:80")
        port = number
    if host is not None:
        try:
            host = str(ipaddress.ip_network(host, strict=False))
        except ValueError:
            raise ConfigError(f"{what}: {host!r} is not an address or CIDR; write e.g. "
                              "10.0.0.0/8, 10.0.0.5:80 or [fd00::1]:443") from None
    return host, port


# ------------------------------------------------------------------------ events

def _addr(raw, port):
    ip = abi.addr_from16(raw)
    if ip.version == 6:
        return f"[{ip}]:{port}"
    return f"{ip}:{port}"


def _where(ev):
    """Where the decision sent it, as the application or the client would dial it."""
    if not ev.target_port:
        return "-"
    if ev.hook == abi.TP_HOOK_SK_LOOKUP:
        return f"listener :{ev.target_port}"
    if ev.hook == abi.TP_HOOK_GETSOCKOPT:
        return f"proxy :{ev.target_port}"
    v4 = abi.addr_from16(ev.addr).version == 4
    return f"127.0.0.1:{ev.target_port}" if v4 else f"[::1]:{ev.target_port}"


REASON_NAMES = {i: name for i, (_, name) in enumerate(abi.REASONS)}


def describe(ev, names, t0_ns):
    """One event as a dict (the JSON line; the text line shows the same fields)."""
    peer = None
    if not abi.addr_from16(ev.peer).is_unspecified or ev.peer_port:   # unbound: none
        peer = _addr(ev.peer, ev.peer_port)
    answered = ev.hook != abi.TP_HOOK_GETSOCKOPT or any(ev.addr)
    return {
        "time": round((ev.ts_ns - t0_ns) / 1e9, 6),
        # 0 and "": not known where the decision was made (sk_lookup runs in softirq;
        # getsockopt before 5.11 may not ask for the pid)
        "pid": ev.pid or None,
        "comm": ev.comm.decode(errors="replace") or None,
        "uid": ev.uid if ev.hook != abi.TP_HOOK_SK_LOOKUP else None,
        "namespace": names.get(ev.netns_cookie, str(ev.netns_cookie)),
        "netns_cookie": ev.netns_cookie,
        "hook": abi.HOOKS.get(ev.hook, str(ev.hook)),
        "protocol": {6: "tcp", 17: "udp"}.get(ev.proto, str(ev.proto)),
        "address": _addr(ev.addr, ev.port) if answered else None,
        "peer": peer,
        "reason": REASON_NAMES.get(ev.reason, str(ev.reason)),
        "sent_to": _where(ev) if ev.target_port else None,
    }


HEADER = (f"{'TIME(s)':<10} {'PID':<7} {'COMM':<15} {'UID':<6} {'NAMESPACE':<12} "
          f"{'HOOK':<10} {'PROTO':<5} {'ADDRESS':<26} {'PEER':<26} {'DECISION':<28} TO")


def text_line(d):
    def dash(v):
        return "-" if v is None else str(v)
    return (f"{d['time']:<10.3f} {dash(d['pid']):<7} {dash(d['comm']):<15} "
            f"{dash(d['uid']):<6} {d['namespace']:<12} {d['hook']:<10} {d['protocol']:<5} "
            f"{dash(d['address']):<26} {dash(d['peer']):<26} {d['reason']:<28} "
            f"{dash(d['sent_to'])}")


# ------------------------------------------------------------------------ readers

class RingReader:
    """tp_events as a ring buffer (5.8+): one reader over every CPU's events. A poll takes
    at most `limit` events out (libbpf goes on for as long as events keep coming; a
    negative answer from the callback stops it): the rest wait in the ring, and a reader
    whose output is slow never holds more than that in memory."""
    kind = "ring buffer"

    def __init__(self, map_fd, on_event, pending=lambda: 0, limit=4096):
        from bcc.libbcc import _RINGBUF_CB_TYPE, lib
        self._lib = lib

        def cb(_ctx, data, size):
            if pending() >= limit:
                return -1   # this record stays in the ring for the next poll
            if size >= ct.sizeof(abi.TpEvent):
                on_event(abi.TpEvent.from_buffer_copy(ct.string_at(data, ct.sizeof(
                    abi.TpEvent))))
            return 0
        self._cb = _RINGBUF_CB_TYPE(cb)   # kept: the C side holds only the pointer
        self._rb = lib.bpf_new_ringbuf(map_fd, self._cb, None)
        if not self._rb:
            raise OSError(errno.EINVAL, "cannot open the trace ring buffer")

    def poll(self, ms):
        self._lib.bpf_poll_ringbuf(self._rb, ms)

    def close(self):
        if self._rb:
            self._lib.bpf_free_ringbuf(self._rb)
            self._rb = None


class PerfReader:
    """tp_events as a perf event array (5.7): one buffer per online CPU, each put into the
    map at its CPU's index. The map must stay open while the buffers are in it: the kernel
    empties it when its last user space fd closes."""
    kind = "perf event array"

    def __init__(self, map_fd, on_event):
        from bcc.libbcc import _LOST_CB_TYPE, _RAW_CB_TYPE, bcc_perf_buffer_opts, lib
        self._lib, self._fd, self._readers = lib, map_fd, []

        def raw(_cookie, data, size):
            if size >= ct.sizeof(abi.TpEvent):
                on_event(abi.TpEvent.from_buffer_copy(ct.string_at(data, ct.sizeof(
                    abi.TpEvent))))

        def lost(_cookie, n):
            pass   # counted by the programs themselves (tp_trace_lost), for both kinds
        self._raw, self._lost = _RAW_CB_TYPE(raw), _LOST_CB_TYPE(lost)
        try:
            for cpu in _online_cpus():
                opts = bcc_perf_buffer_opts(pid=-1, cpu=cpu, wakeup_events=1)
                r = lib.bpf_open_perf_buffer_opts(self._raw, self._lost, None, PERF_PAGES,
                                                  ct.byref(opts))
                if not r:
                    raise OSError(errno.EINVAL, f"cannot open a perf buffer on CPU {cpu}")
                self._readers.append(r)
                key, fd = ct.c_int(cpu), ct.c_int(lib.perf_reader_fd(r))
                bpfsys._check(bpfsys.libbpf().bpf_map_update_elem(
                    map_fd, ct.byref(key), ct.byref(fd), 0), "bpf_map_update_elem")
        except BaseException:
            self.close()
            raise
        self._array = (ct.c_void_p * len(self._readers))(*self._readers)

    def poll(self, ms):
        self._lib.perf_reader_poll(len(self._readers), self._array, ms)

    def close(self):
        for r in self._readers:
            self._lib.perf_reader_free(r)
        self._readers = []


def _online_cpus():
    with open("/sys/devices/system/cpu/online") as f:
        out = []
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
        return out


QUEUE_MAX = 4096   # events taken out of the ring and not yet shown, at most
TP_RING_EVENTS = abi.TP_TRACE_BYTES // (ct.sizeof(abi.TpEvent) + 8)   # 8: record header


def open_reader(map_fd, on_event, pending=lambda: 0):
    kind = bpfsys.map_info(map_fd)["type"]
    if kind == bpfsys.MAP_TYPE_RINGBUF:
        return RingReader(map_fd, on_event, pending, QUEUE_MAX)
    if kind == bpfsys.MAP_TYPE_PERF_EVENT_ARRAY:
        return PerfReader(map_fd, on_event)
    raise OSError(errno.EPROTO, f"tp_events is a map of type {kind}, not a ring buffer or a "
                                "perf event array")


def lost_total(paths):
    with bpfsys.PinnedMap(paths.map("tp_trace_lost"), ct.c_uint32, ct.c_uint64,
                          percpu=True, max_entries=1) as m:
        v = m.lookup(ct.c_uint32(0))
        return sum(v) if v is not None else 0


def write_filter(paths, flt):
    with bpfsys.PinnedMap(paths.map("tp_trace_filter"), ct.c_uint32, abi.TpTraceFilter,
                          max_entries=1) as m:
        m.update(ct.c_uint32(0), flt)


# ------------------------------------------------------------------------ a session

def run(bpffs, name=None, flt=None, count=None, duration=None, on_event=print,
        on_lost=None, progress=None):
    """Trace until count events were shown, duration seconds passed, or SIGINT/SIGTERM
    (Ctrl-C). on_event gets each event's dict, on_lost the total of events lost so far
    whenever it grows. The flag is off again when this returns, however it returns.
    Returns (events shown, events lost, reader kind)."""
    import signal

    from . import lifecycle, namespace, node
    paths = node.NodePaths(bpffs)
    meta = node.read_meta(paths)
    if meta is None:
        raise node.InstallError(f"nothing is installed on {bpffs}: run 'ebpf-tproxy "
                                "install' first")
    if not os.path.exists(paths.map("tp_events")):
        raise node.InstallError(
            f"the node program set on {bpffs} was built by ebpf-tproxy "
            f"{meta.get('version', '?')}, which has no trace; run 'ebpf-tproxy install' "
            "(it upgrades the set in place) and trace again")
    flt = flt or Filter()
    lease = hold_lease(bpffs)
    state = {"shown": 0, "lost": 0, "stop": False, "kind": None}
    queue = []

    def stop(signum, frame):
        # A flag, not an exception: raised inside the reader's callback (ctypes) an
        # exception would be printed and dropped, and the trace would go on.
        state["stop"] = True
    saved = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with namespace.NodeMaps(paths) as maps:
            names = {m.get("netns_cookie"): n for n, m in maps.registrations().items()}
            if name is not None and name not in names.values():
                raise ConfigError(f"--name: no namespace is registered as {name!r}; "
                                  "'ebpf-tproxy status' lists them")
            if not names:
                raise node.InstallError(f"no namespace is registered on {bpffs}: nothing "
                                        "decides anything to trace")
            write_filter(paths, flt.struct())
            lost0 = lost_total(paths)
            t0 = time.monotonic_ns()   # CLOCK_MONOTONIC, as bpf_ktime_get_ns()
            wanted = [c for c, n in names.items() if name is None or n == name]

            def show():
                for ev in queue:
                    if count is not None and state["shown"] >= count:
                        break
                    # Left in the pinned ring by an earlier trace (killed, or ended by
                    # --count), or by a namespace a dead trace left flagged: not ours.
                    if ev.ts_ns < t0 or (name is not None and ev.netns_cookie not in wanted):
                        continue
                    if ev.netns_cookie not in names:
                        names.update({m.get("netns_cookie"): n
                                      for n, m in maps.registrations().items()})
                    state["shown"] += 1
                    on_event(describe(ev, names, t0))
                queue.clear()

            events_fd = bpfsys.obj_get(paths.map("tp_events"))
            reader = None
            try:
                reader = open_reader(events_fd, queue.append, lambda: len(queue))
                state["kind"] = reader.kind
                # What an earlier trace left in the ring goes first (bounded: a flag a
                # dead trace left on may still be feeding it; show() skips those anyway).
                for _ in range(TP_RING_EVENTS // QUEUE_MAX + 1):
                    reader.poll(0)
                    if not queue:
                        break
                    queue.clear()
                with lifecycle.bpffs_lock(bpffs):
                    # A dead trace's flags on namespaces not traced now go first.
                    set_flag(maps, set(traced_cookies(maps)) - set(wanted), False)
                    set_flag(maps, wanted, True)
                if progress:
                    progress(f"tracing {name or 'every registered namespace'} through a "
                             f"{reader.kind}; Ctrl-C ends")
                deadline = time.monotonic() + duration if duration else None
                next_look = time.monotonic() + 1.0
                while not state["stop"]:
                    reader.poll(POLL_MS)
                    try:
                        show()
                    except BrokenPipeError:   # trace | head: the reader has had enough
                        queue.clear()
                        break
                    if count is not None and state["shown"] >= count:
                        break
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        break
                    if now >= next_look:
                        next_look = now + 1.0
                        _look_again(paths, maps, names, name, on_lost, state, lost0)
            finally:
                # Each step on its own: the flag goes off first, and a step that fails
                # (uninstall --all meanwhile, a closed output) leaves the next to run.
                try:
                    with lifecycle.bpffs_lock(bpffs):
                        set_flag(maps, traced_cookies(maps), False)
                finally:
                    try:
                        write_filter(paths, abi.TpTraceFilter())
                    except OSError:
                        pass   # the node set is gone: nothing to leave active
                    try:
                        # What is still in the buffer was decided while tracing: show it
                        # (the flags are off: nothing more is coming).
                        while reader is not None and (count is None or state["shown"] < count):
                            reader.poll(0)
                            if not queue:
                                break
                            show()
                    except BrokenPipeError:
                        queue.clear()
                    finally:
                        if reader is not None:
                            reader.close()
                        os.close(events_fd)
            with contextlib.suppress(OSError):
                state["lost"] = max(state["lost"], lost_total(paths) - lost0)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        drop_lease(bpffs, lease)
    return state["shown"], state["lost"], state["kind"]


def _look_again(paths, maps, names, name, on_lost, state, lost0):
    """Once a second: namespaces registered since (traced too, unless --name), and lost
    events."""
    from . import lifecycle
    lost = lost_total(paths) - lost0
    if lost > state["lost"]:
        state["lost"] = lost
        if on_lost:
            on_lost(lost)
    if name is not None:
        return
    regs = {m.get("netns_cookie"): n for n, m in maps.registrations().items()}
    names.update(regs)
    configs = {c: maps.config(c) for c in regs}
    untraced = [c for c, cfg in configs.items()
                if cfg is not None and not cfg.flags & abi.TP_F_TRACE]
    if untraced:
        with lifecycle.bpffs_lock(paths.bpffs):
            set_flag(maps, untraced, True)
