"""Our tree in the bpffs, made and removed so that no other user can steer it.

Whoever can write in <bpffs>/ebpf-tproxy/ can unlink a link pin (and so detach capture for
every namespace) or plant a symlink that root's uninstall would follow. So:
  - a bpffs install mounts is mounted mode 0700 (the kernel's default is 1777);
  - every directory of ours is created 0700 and owned by root, whatever the umask;
  - before install, status or uninstall reads or writes anything, the whole tree is
    checked: every entry owned by root (or by the user running us, if not root), no
    directory writable by group or others, no symlink; the mount point itself owned by
    root and, if others may write in it, sticky
    (as /tmp: then nobody else can rename or remove our directory). Anything else is
    refused with one line naming the path, and nothing is changed;
  - directories are walked without following symlinks (O_NOFOLLOW) and removed with
    shutil.rmtree's descriptor-based walk, which never leaves the tree.
"""
import os
import shutil
import stat

from .config import ConfigError


class UnsafeTree(ConfigError):
    """A path of ours that another user could have made or can change: refused (exit 2)."""


def _refuse(path, why):
    raise UnsafeTree(f"refusing to use {path}: {why}; remove it (after checking who made it) "
                     "and run the command again")


def _check_entry(path, st, top=False):
    if stat.S_ISLNK(st.st_mode):
        _refuse(path, "it is a symlink")
    # root, or the user running us (with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)
    if st.st_uid not in (0, os.geteuid()):
        _refuse(path, f"it is owned by uid {st.st_uid}, not root")
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if stat.S_ISDIR(st.st_mode) and writable and not (top and st.st_mode & stat.S_ISVTX):
        _refuse(path, f"others may write in it (mode {stat.S_IMODE(st.st_mode):04o})")


def check_mount_point(bpffs):
    """The bpffs mount point: root's, and writable by others only if sticky."""
    try:
        st = os.lstat(bpffs)
    except FileNotFoundError:
        return
    _check_entry(bpffs, st, top=True)


def check_tree(bpffs, root):
    """Every entry from the mount point down through root (our directory), recursively."""
    check_mount_point(bpffs)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return
    _check_entry(root, st)
    if not stat.S_ISDIR(st.st_mode):
        _refuse(root, "it is not a directory")
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            _check_entry(p, os.lstat(p))


def makedirs(bpffs, path):
    """mkdir -p below the bpffs mount point: each missing directory 0700 (chmod'ed, so the
    umask does not matter), each existing one checked; never through a symlink."""
    rel = os.path.relpath(path, bpffs)
    if rel.startswith(".."):
        raise ValueError(f"{path} is not under {bpffs}")
    cur = bpffs
    for part in [p for p in rel.split(os.sep) if p not in ("", ".")]:
        cur = os.path.join(cur, part)
        try:
            os.mkdir(cur, 0o700)
            fd = os.open(cur, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
        except FileExistsError:
            st = os.lstat(cur)
            _check_entry(cur, st)
            if not stat.S_ISDIR(st.st_mode):
                _refuse(cur, "it is not a directory")


def rmtree(path, ignore_errors=False):
    """Remove a directory of ours and everything in it (gone already: nothing to do); a
    symlink in its place is refused, never followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    _check_entry(path, st)
    # shutil.rmtree walks by descriptor (openat, O_NOFOLLOW-checked): a symlink inside is
    # unlinked, not followed.
    shutil.rmtree(path, ignore_errors=ignore_errors)
