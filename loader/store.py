"""The agent's store: each stored namespace's configuration on disk, so that the agent
applies it again after a reboot (an emptied bpffs) or a crash. The eBPF counterpart of
kumactl's --store-firewalld, which keeps iptables rules across reboots.

`install --store` (or Kuma's --store-firewalld) writes <state-dir>/namespaces/<name>.json,
`uninstall` removes it, the agent reads them all at start, on SIGHUP and when a file
changes. A file holds:

    {"version": 1, "name": "pod1", "netns": "/run/netns/pod1",
     "config": {<Kuma's config document, as `ebpf-tproxy install --config` reads it>}}

Files are written whole or not at all (a temporary file, fsync, rename, fsync of the
directory), 0600 in a 0700 directory owned by root: the configuration decides where every
connection of a namespace goes.
"""
import contextlib
import dataclasses
import json
import os
import stat

from . import config
from .config import ConfigError

STATE_VERSION = 1
DEFAULT_STATE_DIR = "/var/lib/ebpf-tproxy"
MAX_STATE_BYTES = config.MAX_CONFIG_BYTES + 4096


@dataclasses.dataclass(frozen=True)
class Stored:
    name: str
    netns: str        # the namespace's path: /proc/1/ns/net (the host) or a /run/netns name
    settings: config.Settings
    file: str
    mtime_ns: int


def _dir(state_dir):
    return os.path.join(state_dir, "namespaces")


def _file(state_dir, name):
    return os.path.join(_dir(state_dir), name + ".json")


def check_dir(state_dir, create=False):
    """The store's directory: root's (or ours), writable by no one else. Created 0700 if
    asked. ConfigError naming the path otherwise."""
    for path in (state_dir, _dir(state_dir)):
        if create:
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"--state-dir: cannot create {path} ({e.strerror}); give "
                                  "a directory root can write") from None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"--state-dir: {path} is not a directory; give a directory")
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            raise ConfigError(f"--state-dir: {path} is writable by another user (owner uid "
                              f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); make it "
                              "root's, mode 0700")
    return True


def stable_netns_path(path):
    """The path the store keeps for a namespace: one that names it again after a restart
    of the agent or the host. /proc/PID/ns/net of any PID but 1 names another process's
    namespace once that process is gone, so it cannot be stored."""
    if path.startswith("/proc/") and path != "/proc/1/ns/net":
        raise ConfigError(f"--store: {path} names a process, not a namespace that can be "
                          "found again after a restart; name the namespace (ip netns add, or "
                          "a bind mount) and pass that path with --netns")
    return path


def save(state_dir, name, netns_path, settings):
    """Store one namespace's configuration (atomically replacing an earlier one)."""
    check_dir(state_dir, create=True)
    doc = {"version": STATE_VERSION, "name": name, "netns": stable_netns_path(netns_path),
           "config": config.document_of(settings)}
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    path = _file(state_dir, name)
    tmp = f"{path}.tmp.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)   # left by a writer killed mid-way whose pid came round again
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_dir(state_dir)
    return path


def _sync_dir(state_dir):
    dfd = os.open(_dir(state_dir), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def forget(state_dir, name):
    """Remove a namespace's stored configuration. True if there was one."""
    try:
        os.unlink(_file(state_dir, name))
    except FileNotFoundError:
        return False
    _sync_dir(state_dir)
    return True


def stored_for(state_dir, name, bpffs):
    """Whether the stored namespace is one of this bpffs's (True for an unreadable file:
    uninstall --all removes it with the rest)."""
    try:
        return read(state_dir, name).settings.bpffs_path == bpffs
    except ConfigError:
        return True


def names(state_dir):
    d = _dir(state_dir)
    if not os.path.isdir(d):
        return []
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".json"))


def fingerprint(state_dir):
    """What changes when any stored file does (for the agent's change check)."""
    d = _dir(state_dir)
    try:
        out = []
        for e in sorted(os.scandir(d), key=lambda e: e.name):
            st = e.stat(follow_symlinks=False)
            out.append((e.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(out)
    except FileNotFoundError:
        return ()


def read(state_dir, name):
    """One stored namespace: Stored, or ConfigError naming the file and what is wrong."""
    path = _file(state_dir, name)
    where = f"state file {path}"
    fix = "remove it, or store it again with 'ebpf-tproxy install --store'"
    try:
        st = os.lstat(path)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror}); {fix}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{where}: a symlink, never followed; {fix}")
    raw = config.read_bounded(path, MAX_STATE_BYTES, where, fix)
    mtime = st.st_mtime_ns
    try:
        doc = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{where}: not JSON ({e}); store it again with 'ebpf-tproxy "
                          "install --store'") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: not an object; store it again")
    version = doc.get("version")
    if version != STATE_VERSION:
        raise ConfigError(f"{where}: state version {version!r}, this ebpf-tproxy reads "
                          f"version {STATE_VERSION}; store it again with this version's "
                          "'ebpf-tproxy install --store'")
    if doc.get("name") != name:
        raise ConfigError(f"{where}: names {doc.get('name')!r}, not {name!r}; store it again")
    netns_path = doc.get("netns")
    if not isinstance(netns_path, str) or not netns_path.startswith("/"):
        raise ConfigError(f"{where}: 'netns' must be an absolute path; store it again")
    if not isinstance(doc.get("config"), dict):
        raise ConfigError(f"{where}: 'config' must be a Kuma config object; store it again")
    settings = config.settings_from_document(doc["config"], name, where)
    return Stored(name, netns_path, settings, path, mtime)


def read_if_any(state_dir, name):
    """The stored namespace, or None if it is not stored or cannot be read."""
    if name not in names(state_dir):
        return None
    try:
        return read(state_dir, name)
    except ConfigError:
        return None


def read_all(state_dir):
    """([Stored], [problem lines]): every stored namespace that reads, and one line for
    each that does not (the others are not held back by it)."""
    good, bad = [], []
    for name in names(state_dir):
        try:
            config.check_name(name, "state file name")
            good.append(read(state_dir, name))
        except ConfigError as e:
            bad.append(str(e))
    return good, bad
