"""The few bpf(2) operations BCC's Python API lacks, through the distribution's libbpf.

BCC attaches cgroup programs with the legacy BPF_PROG_ATTACH, which leaves programs
attached with no owner to find them later. BPF links (kernel >= 5.7) are owned objects:
pinned in bpffs they keep the program attached after the loader exits, `bpf_link_update`
swaps the program atomically (upgrade in place), and removing the last pin detaches.
libbpf.so.1 exports everything needed; only ctypes is involved.
"""
import ctypes as ct
import ctypes.util
import errno
import os
import socket

# enum bpf_attach_type (uapi/linux/bpf.h)
CGROUP_SOCK_OPS = 3
SK_MSG_VERDICT = 7
CGROUP_INET4_BIND = 8
CGROUP_INET6_BIND = 9
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP6_SENDMSG = 15
CGROUP_UDP4_RECVMSG = 19
CGROUP_UDP6_RECVMSG = 20
CGROUP_GETSOCKOPT = 21
CGROUP_INET4_GETPEERNAME = 29
CGROUP_INET6_GETPEERNAME = 30
SK_LOOKUP = 36

# enum bpf_prog_type
PROG_CGROUP_SOCK = 9
CGROUP_INET_SOCK_CREATE = 2
PROG_SOCK_OPS = 13
PROG_SK_MSG = 16
PROG_CGROUP_SOCK_ADDR = 18
PROG_CGROUP_SOCKOPT = 25
PROG_SK_LOOKUP = 30

# enum bpf_link_type
LINK_TYPE_CGROUP = 3
LINK_TYPE_NETNS = 5

SO_NETNS_COOKIE = 71  # kernel >= 5.14


class BpfError(OSError):
    """A bpf(2) call failed; str() names the operation and the errno."""


_lib = None


def libbpf():
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ct.CDLL(name, use_errno=True)
        except OSError as e:
            raise BpfError(errno.ENOENT, f"cannot load libbpf ({name}): {e}; "
                           "install the libbpf1 package") from None
        lib.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
        lib.bpf_link_update.argtypes = [ct.c_int, ct.c_int, ct.c_void_p]
        lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
        lib.bpf_obj_get.argtypes = [ct.c_char_p]
        lib.bpf_link_detach.argtypes = [ct.c_int]
        lib.bpf_prog_attach.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_uint]
        lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
        lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
        lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
        lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
        _lib = lib
    return _lib


MAP_TYPE_PERF_EVENT_ARRAY = 4
MAP_TYPE_RINGBUF = 27


def has_map_type(map_type):
    """Whether the kernel can make maps of this type (libbpf creates a small one)."""
    lib = libbpf()
    lib.libbpf_probe_bpf_map_type.argtypes = [ct.c_int, ct.c_void_p]
    ret = lib.libbpf_probe_bpf_map_type(map_type, None)
    if ret < 0:
        raise BpfError(-ret, f"libbpf_probe_bpf_map_type({map_type}): {os.strerror(-ret)}")
    return ret == 1


def _check(ret, what):
    # libbpf 1.x returns -errno directly (and sets errno).
    if ret < 0:
        err = -ret if ret != -1 else (ct.get_errno() or errno.EINVAL)
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def link_create(prog_fd, target_fd, attach_type):
    return _check(libbpf().bpf_link_create(prog_fd, target_fd, attach_type, None),
                  f"bpf_link_create(attach type {attach_type})")


def prog_attach(prog_fd, target_fd, attach_type):
    """Legacy BPF_PROG_ATTACH, for programs attached to a sockmap/sockhash (no links for
    those before 6.10). Attaching again replaces the map's program for sockets added from
    then on; the attachment lasts as long as the map."""
    _check(libbpf().bpf_prog_attach(prog_fd, target_fd, attach_type, 0),
           f"bpf_prog_attach(attach type {attach_type})")


def link_update(link_fd, new_prog_fd):
    _check(libbpf().bpf_link_update(link_fd, new_prog_fd, None), "bpf_link_update")


def link_detach(link_fd):
    _check(libbpf().bpf_link_detach(link_fd), "bpf_link_detach")


def obj_pin(fd, path):
    _check(libbpf().bpf_obj_pin(fd, os.fsencode(path)), f"bpf_obj_pin({path})")


def obj_get(path):
    return _check(libbpf().bpf_obj_get(os.fsencode(path)), f"bpf_obj_get({path})")


def prog_fd_by_id(prog_id):
    return _check(libbpf().bpf_prog_get_fd_by_id(prog_id), f"bpf_prog_get_fd_by_id({prog_id})")


class _LinkInfo(ct.Structure):
    """struct bpf_link_info, as far as cgroup and netns links need: the union starts at
    16 with cgroup {u64 cgroup_id; u32 attach_type} or netns {u32 netns_ino; u32 ...}."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("prog_id", ct.c_uint32),
                ("pad", ct.c_uint32), ("target", ct.c_uint64), ("rest", ct.c_uint8 * 64)]


def link_info(link_fd):
    """{link_id, prog_id, target_id}: target_id is the cgroup's id (its inode) or the
    network namespace's inode, and 0 once that target is gone (the kernel detaches a link
    whose cgroup was removed or whose namespace was destroyed)."""
    info = _LinkInfo()
    ln = ct.c_uint32(ct.sizeof(info))
    _check(libbpf().bpf_obj_get_info_by_fd(link_fd, ct.byref(info), ct.byref(ln)),
           "bpf_obj_get_info_by_fd")
    target = info.target if info.type == LINK_TYPE_CGROUP else info.target & 0xFFFFFFFF
    return {"link_id": info.id, "prog_id": info.prog_id, "target_id": target}


class _MapInfo(ct.Structure):
    """struct bpf_map_info, as far as sizes go."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16), ("rest", ct.c_uint8 * 64)]


def map_info(map_fd):
    info = _MapInfo()
    ln = ct.c_uint32(ct.sizeof(info))
    _check(libbpf().bpf_obj_get_info_by_fd(map_fd, ct.byref(info), ct.byref(ln)),
           "bpf_obj_get_info_by_fd")
    return {"type": info.type, "id": info.id, "key_size": info.key_size,
            "value_size": info.value_size, "max_entries": info.max_entries}


class _ProgInfo(ct.Structure):
    """struct bpf_prog_info up to the run statistics (uapi/linux/bpf.h; run_time_ns and
    run_cnt since 5.1, counted only while bpf_stats is enabled)."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("skip1", ct.c_uint8 * 36),          # prog lengths, insns, load_time, uid
                ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64),
                ("name", ct.c_char * 16),
                ("skip2", ct.c_uint8 * 112),         # ifindex .. prog_tags (offsets 80-191)
                ("run_time_ns", ct.c_uint64), ("run_cnt", ct.c_uint64)]


def prog_info(prog_fd):
    """{id, name, run_time_ns, run_cnt} of a program."""
    info = _ProgInfo()
    ln = ct.c_uint32(ct.sizeof(info))
    _check(libbpf().bpf_obj_get_info_by_fd(prog_fd, ct.byref(info), ct.byref(ln)),
           "bpf_obj_get_info_by_fd")
    return {"id": info.id, "name": info.name.decode(errors="replace"),
            "run_time_ns": info.run_time_ns, "run_cnt": info.run_cnt}


BPF_STATS_RUN_TIME = 0


def enable_stats():
    """Count run time and runs of every BPF program for as long as the returned fd is open
    (BPF_ENABLE_STATS, 5.8): unlike the kernel.bpf_stats_enabled sysctl, nothing is left
    on when its holder dies. Raises BpfError where the kernel lacks it."""
    return _check(libbpf().bpf_enable_stats(BPF_STATS_RUN_TIME), "bpf_enable_stats")


class PinnedMap:
    """A pinned map opened by path, for reading and writing from userspace (status,
    uninstall, config updates) without compiling anything."""

    def __init__(self, path, key_type, value_type, percpu=False, max_entries=1 << 20):
        self.fd = obj_get(path)
        self.max_entries = max_entries
        self.key_type, self.value_type, self.percpu = key_type, value_type, percpu
        # Per-CPU values come back as one 8-byte-aligned slot per possible CPU.
        self.ncpu = _possible_cpus() if percpu else 1
        # The kernel copies value_size bytes into the buffer given: a map of another
        # layout read through these types would overrun it. Refuse it instead.
        try:
            info = map_info(self.fd)
        except OSError:
            os.close(self.fd)
            raise
        if (info["key_size"], info["value_size"]) != (ct.sizeof(key_type),
                                                      ct.sizeof(value_type)):
            os.close(self.fd)
            self.fd = -1
            raise BpfError(errno.EPROTO, f"{path}: key and value are {info['key_size']} and "
                           f"{info['value_size']} bytes, this version's "
                           f"{ct.sizeof(key_type)} and {ct.sizeof(value_type)}: the map "
                           "belongs to another layout; run 'ebpf-tproxy uninstall --all'")

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _value_buf(self):
        return (self.value_type * self.ncpu)() if self.percpu else self.value_type()

    def lookup(self, key):
        val = self._value_buf()
        ret = libbpf().bpf_map_lookup_elem(self.fd, ct.byref(key), ct.byref(val))
        if ret < 0:
            if -ret == errno.ENOENT or ct.get_errno() == errno.ENOENT:
                return None
            _check(ret, "bpf_map_lookup_elem")
        return val

    def update(self, key, value):
        _check(libbpf().bpf_map_update_elem(self.fd, ct.byref(key), ct.byref(value), 0),
               "bpf_map_update_elem")

    def delete(self, key):
        ret = libbpf().bpf_map_delete_elem(self.fd, ct.byref(key))
        if ret < 0 and -ret != errno.ENOENT and ct.get_errno() != errno.ENOENT:
            _check(ret, "bpf_map_delete_elem")

    def keys(self):
        """The keys present. A hash map's walk restarts when the previous key is deleted
        under it (churn), so keys are deduplicated and the walk is bounded."""
        out, prev = {}, None
        for _ in range(2 * self.max_entries):
            nxt = self.key_type()
            ret = libbpf().bpf_map_get_next_key(
                self.fd, ct.byref(prev) if prev is not None else None, ct.byref(nxt))
            if ret < 0:
                break
            out.setdefault(bytes(nxt), nxt)
            prev = nxt
        return list(out.values())


def _possible_cpus():
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    n = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def netns_cookie():
    """The cookie of the caller's network namespace (SO_NETNS_COOKIE, kernel >= 5.14);
    0 when this kernel cannot say it here (probe.learn_netns_cookie() asks a program)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError:
            return 0
    return int.from_bytes(raw, "little")


SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}
MEMBARRIER_CMD_GLOBAL = 1


def synchronize_rcu():
    """Wait for an RCU grace period: every BPF program running now has finished when this
    returns (they run in RCU read-side sections). membarrier(MEMBARRIER_CMD_GLOBAL) is
    implemented with synchronize_rcu(). False where it is unavailable (nohz_full kernels,
    unknown architectures)."""
    nr = SYS_MEMBARRIER.get(os.uname().machine)
    if nr is None:
        return False
    libc = ct.CDLL(None, use_errno=True)
    return libc.syscall(nr, MEMBARRIER_CMD_GLOBAL, 0, 0) == 0
