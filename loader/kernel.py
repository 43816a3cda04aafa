"""Facts about the running kernel and host, and the prerequisite checks behind `check`.

Every check returns a Check(name, ok, detail, fix). Features are decided by probing
(loading a tiny program per hook), never by version number: distribution kernels
backport. The version floor (5.7: BPF links for cgroups) is the one exception, checked
first so that an old kernel gets a clear refusal instead of a verifier message.
"""
import ctypes as ct
import dataclasses
import errno
import os
import platform
import re

from . import netns
from .config import ConfigError

CGROUP2_SUPER_MAGIC = 0x63677270
BPF_FS_MAGIC = 0xCAFE4A11
MIN_KERNEL = (5, 7)

# Capabilities (linux/capability.h)
CAP_SETGID, CAP_SETUID, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 6, 7, 12, 21, 39


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def resolve_cgroup(path):
    """--ebpf-cgroup-path: the cgroup to attach at (default: the cgroup2 mount's root)."""
    root = cgroup2_mount()
    if root is None:
        raise ConfigError("no cgroup2 mount found in /proc/self/mounts; mount one "
                          "(mount -t cgroup2 none /sys/fs/cgroup/unified) and retry")
    path = path or root   # absolute, without . or .. (config.parse_path)
    if not is_cgroup2(path) or os.path.islink(path):
        raise ConfigError(f"--ebpf-cgroup-path: {path} is not a directory in the cgroup2 "
                          f"mount; give a cgroup under {root}")
    return path


class HostError(RuntimeError):
    """The host cannot do what was asked: one line naming the cause and the fix."""


def kernel_version(release=None):
    release = release or platform.release()
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        raise HostError(f"cannot read the kernel version from {release!r}")
    return int(m.group(1)), int(m.group(2))


def check_kernel_version(release=None):
    release = release or platform.release()
    ver = kernel_version(release)
    ok = ver >= MIN_KERNEL
    return Check("kernel >= 5.7", ok, f"running {release}",
                 "" if ok else "cgroup BPF links need Linux 5.7 or newer: upgrade the kernel, "
                 "or use kumactl install transparent-proxy (iptables)")


def _statfs_type(path):
    class StatFs(ct.Structure):
        _fields_ = [("f_type", ct.c_long), ("rest", ct.c_long * 15)]
    libc = ct.CDLL(None, use_errno=True)
    buf = StatFs()
    if libc.statfs(os.fsencode(path), ct.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def mounts(fstype, mountinfo="/proc/self/mounts"):
    out = []
    with open(mountinfo) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == fstype:
                out.append(parts[1].replace("\\040", " "))
    return out


def cgroup2_mount():
    found = mounts("cgroup2")
    return found[0] if found else None


CLONE_NEWCGROUP = 0x02000000
PROC_CGROUP_INIT_INO = 0xEFFFFFFB   # include/linux/proc_ns.h: the host's cgroup namespace


def join_initial_cgroup_namespace():
    """Join the host's (initial) cgroup namespace when ours is another; True when it
    switched, OSError when no process of it is visible.

    /proc/PID/cgroup shows paths relative to the *reader's* cgroup namespace, and the
    listeners of a proxy that was up before install are found by matching those paths
    against the cgroup2 mount. A container has a private cgroup namespace (containerd's
    and CRI-O's default on cgroup v2) while the DaemonSet mounts the host's cgroup2 tree:
    from inside, a pod's processes read as /../../kubepods/..., and none would match.
    With the host's PIDs (the DaemonSet's hostPID) the host's processes are visible, and
    any of them opens its namespace (PID 1 may not: it can be undumpable). setns with
    CLONE_NEWCGROUP has no single-thread rule and changes nothing but how paths read."""
    # setns acts on the calling thread: it is called before the agent starts any.
    if os.stat("/proc/thread-self/ns/cgroup").st_ino == PROC_CGROUP_INIT_INO:
        return False
    for pid in filter(str.isdigit, os.listdir("/proc")):
        path = f"/proc/{pid}/ns/cgroup"
        try:
            if os.stat(path).st_ino != PROC_CGROUP_INIT_INO:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue   # gone, or not ours to read
        try:
            netns.setns(fd, CLONE_NEWCGROUP)
        except OSError as e:
            raise OSError(e.errno, f"setns(the host's cgroup namespace): {e.strerror}") \
                from None
        finally:
            os.close(fd)
        return True
    raise OSError(errno.ENOENT, "in a cgroup namespace of its own, and no process of the "
                  "host's is visible")


def is_cgroup2(path):
    return os.path.isdir(path) and _statfs_type(path) == CGROUP2_SUPER_MAGIC


def is_bpffs(path):
    return os.path.isdir(path) and _statfs_type(path) == BPF_FS_MAGIC


def check_cgroup2(path=None):
    root = cgroup2_mount()
    if root is None:
        return Check("cgroup2 mounted", False, "no cgroup2 mount in /proc/self/mounts",
                     "mount it: mount -t cgroup2 none /sys/fs/cgroup/unified")
    if path and not is_cgroup2(path):
        return Check("cgroup2 path", False, f"{path} is not a directory in a cgroup2 mount",
                     f"pass --ebpf-cgroup-path under {root}")
    return Check("cgroup2 mounted", True, f"at {root}" + (f", target {path}" if path else ""))


def check_bpffs(path):
    if is_bpffs(path):
        return Check("bpffs", True, f"mounted at {path}")
    if os.path.isdir(path):
        return Check("bpffs", True, f"not mounted at {path}; install mounts it",
                     f"or mount it yourself: mount -t bpf bpf {path}")
    return Check("bpffs", False, f"{path} is not a directory",
                 "pass --ebpf-bpffs-path with a bpffs mount point")


def effective_caps():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges():
    caps = effective_caps()
    need = {"CAP_BPF": CAP_BPF, "CAP_NET_ADMIN": CAP_NET_ADMIN, "CAP_SYS_ADMIN": CAP_SYS_ADMIN}
    missing = [n for n, bit in need.items() if not caps & (1 << bit)]
    if os.geteuid() == 0 and not missing:
        return Check("privileges", True, "root")
    if not missing:
        return Check("privileges", True, "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN")
    return Check("privileges", False, f"missing {', '.join(missing)}",
                 "run as root (sudo ebpf-tproxy ...)")


def check_bcc():
    try:
        import bcc  # noqa: F401
    except ImportError:
        return Check("bcc (python3-bpfcc)", False, "import bcc failed",
                     "apt-get install python3-bpfcc, and run from a venv made with "
                     "--system-site-packages (the PyPI package 'bcc' is unrelated)")
    return Check("bcc (python3-bpfcc)", True, "importable")


def check_headers():
    rel = platform.release()
    build = f"/lib/modules/{rel}/build"
    if os.path.exists(os.path.join(build, "include")) or os.path.exists(
            os.path.join(build, "Makefile")):
        return Check("kernel headers", True, f"{build} -> {os.path.realpath(build)}")
    return Check("kernel headers", False, f"{build} missing",
                 "make setup links the distribution's headers there (BCC compiles with them)")


def ensure_bpffs(path):
    """Mount bpffs at path if it is not one yet. Returns True if this call mounted it.

    Mounted mode 0700: the kernel's default (1777) would let any user make directories in
    it, and pins there are what keeps capture attached (pinfs.py). Two first installs at
    once must not stack two mounts: the check and the mount happen under a lock on the
    directory underneath (both opened it before either mounted), so the second sees the
    first's mount."""
    import fcntl
    if is_bpffs(path):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise HostError(f"--ebpf-bpffs-path: cannot open {path} ({e.strerror}); pass a "
                        "directory to mount bpffs on (default /sys/fs/bpf)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if is_bpffs(path):
            return False
        from . import seams
        seams.hold("before-mount")
        libc = ct.CDLL(None, use_errno=True)
        if libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, b"mode=0700") != 0:
            err = ct.get_errno()
            raise HostError(f"cannot mount bpffs at {path}: {os.strerror(err)}; mount it "
                            f"with 'mount -t bpf -o mode=0700 bpf {path}'")
        return True
    finally:
        os.close(fd)


def unmount(path):
    libc = ct.CDLL(None, use_errno=True)
    libc.umount2(os.fsencode(path), 0)


def kernel_uid(uid, uid_map="/proc/self/uid_map"):
    """A uid of this user namespace as BPF sees it (bpf_get_current_uid_gid() reports uids
    of the initial namespace). Identity on a host; shifted inside a pod or container with
    its own user namespace, where iptables' --uid-owner would use the namespace's view."""
    with open(uid_map) as f:
        for line in f:
            inside, outside, count = (int(x) for x in line.split())
            if inside <= uid < inside + count:
                return outside + (uid - inside)
    raise HostError(f"uid {uid} has no mapping in this user namespace ({uid_map}); give "
                    "a uid that exists here")
