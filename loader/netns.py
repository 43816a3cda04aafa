"""Network namespaces by path: which path a --netns value names, and running work inside one.

The CLI enters a namespace for the whole (single-threaded) process. The agent serves many
namespaces from one process, so it enters each in a short-lived thread instead: setns()
with CLONE_NEWNET moves only the calling thread, and every socket that thread opens
(netlink, the cookie probe, sk_lookup's target) belongs to that namespace. Code that asks
"which namespace am I in" therefore reads /proc/thread-self, never /proc/self (the process's
main thread).
"""
import ctypes
import os
import threading

from .config import ConfigError

CLONE_NEWNET = 0x40000000
HOST = "/proc/1/ns/net"   # the namespace of init: the host's, on a host and after a reboot


def current_inode():
    """The calling thread's network namespace, as link info and `ip netns` name it."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def resolve(netns, what="--netns"):
    """The path a --netns value names: a name in /run/netns, or an absolute path to a
    namespace file (/proc/PID/ns/net, a bind mount). ConfigError if it cannot be one."""
    if not netns.strip():
        raise ConfigError(f"{what}: empty; give a name in /run/netns or a path such as "
                          "/proc/PID/ns/net, or leave it out for the namespace this command "
                          "runs in")
    if "/" in netns:
        if not netns.startswith("/"):
            raise ConfigError(f"{what}: {netns!r} is relative; give a name in /run/netns or "
                              "an absolute path such as /proc/PID/ns/net")
        path = netns
    elif netns in (".", ".."):
        raise ConfigError(f"{what}: {netns!r} is not a namespace name; give a name in "
                          "/run/netns")
    else:
        path = f"/run/netns/{netns}"
    if not os.path.exists(path):
        raise ConfigError(f"{what}: {path} does not exist; create it with 'ip netns add' or "
                          "give a path such as /proc/PID/ns/net")
    return path


_LIBC = ctypes.CDLL(None, use_errno=True)


def setns(fd, nstype):
    """setns(2) for the calling thread; OSError on failure."""
    if _LIBC.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter(path, what="--netns"):
    """Move the calling thread into the network namespace at path (ConfigError if not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)   # a FIFO must not block
    except OSError as e:
        raise ConfigError(f"{what}: cannot open {path} ({e.strerror}); give a network "
                          "namespace") from None
    try:
        setns(fd, CLONE_NEWNET)
    except OSError as e:
        raise ConfigError(f"{what}: cannot enter {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def run_in(path, fn, *args, **kwargs):
    """fn(*args, **kwargs) in a thread inside the namespace at path; its result, or its
    exception raised here. The thread ends with it, so no other work runs in that namespace."""
    box = {}

    def body():
        try:
            enter(path)
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:   # handed to the caller's thread
            box["error"] = e
    t = threading.Thread(target=body, name=f"netns {path}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def inode_of(path):
    """The namespace inode at path, or None if it is gone."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def find(inode):
    """A path to the network namespace with this inode: a name in /run/netns, or a process
    living in it; None if none is found."""
    return find_all({inode}).get(inode)


def find_all(inodes):
    """{inode: path} for those of inodes that a name in /run/netns or a process (other than
    this one, whose threads only visit) reaches, in one scan."""
    out, want = {}, set(inodes)
    candidates = [os.path.join("/run/netns", n) for n in sorted(os.listdir("/run/netns"))] \
        if os.path.isdir("/run/netns") else []
    me = str(os.getpid())
    candidates += [f"/proc/{pid}/ns/net" for pid in os.listdir("/proc")
                   if pid.isdigit() and pid != me]
    for path in candidates:
        if not want:
            break
        inode = inode_of(path)
        if inode in want:
            out[inode] = path
            want.discard(inode)
    return out
