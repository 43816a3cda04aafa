"""A process's claim on a bpffs (the agent serving it, a trace watching it): an exclusive
flock on a file under /run/ebpf-tproxy, which the kernel drops however the holder dies, so
a claim is never left behind by a crash. The holder writes its pid into the file, for the
message that refuses a second claimant."""
import contextlib
import fcntl
import os
import time

CLAIM_DIR = "/run/ebpf-tproxy"


def path(kind, bpffs):
    return os.path.join(CLAIM_DIR, f"{kind}-" + bpffs.strip("/").replace("/", "_") + ".lock")


def hold(path, patience=1.0):
    """The fd to keep open while the claim is ours, or None if another process holds it
    (tried for `patience` seconds: held()'s probe holds the lock a moment)."""
    deadline = time.monotonic() + patience
    while True:
        os.makedirs(CLAIM_DIR, mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileNotFoundError:   # the directory went meanwhile (drop()'s rmdir)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)   # polling: flock has no wait with a timeout
            continue
        # A holder that stops unlinks the file it held: a lock taken on that inode claims
        # nothing. Only the file at the path counts.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def drop(path, fd):
    """A clean end: the file goes (unlinked while still held, so nobody holds the name
    meanwhile), then the claim, then the directory if nothing else is in it."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(CLAIM_DIR)


def held(path):
    """Whether some process holds this claim now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def holder(path):
    """The pid the holder wrote, or '?'."""
    try:
        with open(path) as f:
            return f.read(32).strip() or "?"
    except OSError:
        return "?"
