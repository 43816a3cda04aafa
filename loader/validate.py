"""`ebpf-tproxy validate`: prove, from inside a pod, that the redirect is in place.

Kuma's kuma-validation init container runs `kumactl install transparent-proxy-validator`
as the sidecar's uid with no capabilities, before the application starts, when Kuma CNI
set up the redirect; a pod whose redirect is missing fails there instead of running
uncaptured. This is that check for the eBPF mode, run in the pod's network namespace:

  inbound       Kuma's own test. Listen on 127.0.0.1 (::1) at the inbound port, connect
                from 127.0.0.1 (::1) to 127.0.0.6 (::6) at a random port in 20000-29999
                that --exclude-outbound-ports leaves redirected (Kuma's takes any, and fails
                a pod whose exclusions cover it):
                only the redirect can land that connection on the listener (Kuma rule 4d:
                the DP user calling a local address other than 127.0.0.1 goes to the
                inbound port). The listener sends a token back, so a connection that
                reached anything else does not count.
  outbound      What the eBPF mode adds: a connection from a uid other than the DP user
                to 192.0.2.1 (2001:db8::1), TEST-NET addresses that nothing answers, must
                land on a listener at the outbound port whose getsockopt(SO_ORIGINAL_DST)
                names that address and port. Needs a second uid: run as the DP user
                without CAP_SETUID (as Kuma's validator runs), it is skipped and says so.
  registration  The namespace's entry in the node program set, read from the pinned maps
                when this process may open them (root); else skipped and said so.

Each check is retried until --timeout (Kuma retries while the CNI plugin finishes). Exit
0 when every check that ran passed; otherwise one line on stderr naming what is missing
and the fix, exit 1. Overhead: a few loopback connections per attempt.
"""
import dataclasses
import errno
import ipaddress
import os
import random
import socket
import struct
import time

from . import kernel, netns

SO_ORIGINAL_DST = 80           # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST is also 80
TOKEN = b"ebpf-tproxy-validate"
RETRY_S = 0.5
OUTBOUND_TARGETS = {4: "192.0.2.1", 6: "2001:db8::1"}   # RFC 5737 / RFC 3849
NOBODY = 65534


@dataclasses.dataclass
class Result:
    check: str
    ok: object          # True, False, or None: skipped
    detail: str
    fix: str = ""


class PortTaken(Exception):
    """A listener already holds the port validate must listen on: not worth retrying."""


class Family:
    def __init__(self, version):
        self.version = version
        self.af = socket.AF_INET if version == 4 else socket.AF_INET6
        self.loopback = "127.0.0.1" if version == 4 else "::1"
        self.passthrough = "127.0.0.6" if version == 4 else "::6"

    def __str__(self):
        return f"IPv{self.version}"


def families(settings):
    """IPv4, and IPv6 in dualstack mode where the namespace has ::1 (Kuma validates IPv6
    only where the pod has it)."""
    out = [Family(4)]
    if settings.ipv6:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
                s.bind(("::1", 0))
            out.append(Family(6))
        except OSError:
            pass
    return out


def _listener(fam, host, port):
    s = socket.socket(fam.af, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam.version == 6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(16)
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise PortTaken(f"port {port} is already taken here (the sidecar is running?)") \
                from None
        raise
    s.settimeout(1.0)
    return s


# A child's exit codes: how its one connection went.
REACHED, REFUSED, TIMED_OUT, OTHER_PEER, FAILED = 0, 2, 3, 4, 5


def _connect_as(uid, fam, target, bind=None):
    """Fork a child that, as uid (None: ours), connects to target and reads the token;
    returns its pid. Forked, not threaded: setuid() applies to every thread of a process."""
    pid = os.fork()
    if pid:
        return pid
    code = FAILED
    try:
        if uid is not None and uid != os.geteuid():
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        with socket.socket(fam.af, socket.SOCK_STREAM) as c:
            c.settimeout(1.0)
            if bind:
                c.bind((bind, 0))
            c.connect(target)
            code = REACHED if c.recv(len(TOKEN)) == TOKEN else OTHER_PEER
    except ConnectionRefusedError:
        code = REFUSED
    except socket.timeout:
        code = TIMED_OUT
    except OSError:
        code = FAILED
    finally:
        os._exit(code)


def _child_code(pid):
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def free_ports(settings):
    """Ports of 20000-29999 that --exclude-outbound-ports leaves redirected: that rule
    comes before every other of Kuma's outbound chain, the DP user's hairpin (4d)
    included, so Kuma's validator fails a pod when its random port is one of them."""
    excluded = set(settings.outbound_exclude_ports)
    return [p for p in range(20000, 30000) if p not in excluded]


def check_inbound(fam, port, dp_uid, ports):
    """One attempt of Kuma's check, the client as the DP user, to one of ports:
    (ok, detail)."""
    if not ports:
        return False, "every port in 20000-29999 is excluded from the outbound redirect", \
            "validate with a configuration that leaves some of them redirected"
    try:
        srv = _listener(fam, fam.loopback, port)
    except OSError as e:
        return False, f"cannot listen on {fam.loopback} port {port}: {e.strerror}"
    target = (fam.passthrough, random.choice(ports))
    where = f"{target[0]} port {target[1]}"
    with srv:
        pid = _connect_as(dp_uid, fam, target, bind=fam.loopback)
        try:
            conn, _ = srv.accept()
            with conn:
                conn.sendall(TOKEN)
        except OSError:
            pass
        code = _child_code(pid)
    if code == REACHED:
        return True, f"{where} landed on {fam.loopback} port {port}"
    if code == REFUSED:
        return False, f"{where}: connection refused, not redirected to port {port}"
    return False, f"{where} did not reach the listener on port {port} (child exit {code})"


def _original_dst(conn, fam):
    if fam.version == 4:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, = struct.unpack("!H", raw[2:4])
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    port, = struct.unpack("!H", raw[2:4])
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def outbound_target(settings, fam):
    """(address, port) a captured application connection would use, or the reason
    there is none (the configuration keeps it direct)."""
    addr = OUTBOUND_TARGETS[fam.version]
    ip = ipaddress.ip_address(addr)
    for cidr in settings.outbound_exclude_ips:
        if ip in ipaddress.ip_network(cidr, strict=False):
            return None, f"{addr} is in --exclude-outbound-ips {cidr}"
    if settings.outbound_include_ports:
        return (addr, settings.outbound_include_ports[0]), None
    free = free_ports(settings)
    if not free:
        return None, "every port in 20000-29999 is excluded"
    return (addr, random.choice(free)), None


def other_uid(settings):
    """A uid that is not the DP user's and has no outbound exclusion."""
    for uid in (NOBODY, NOBODY - 1, 1):
        if uid != settings.dp_uid and \
                not any(r.uid_lo <= uid <= r.uid_hi for r in settings.uid_rules):
            return uid
    return None


def check_outbound(settings, fam, uid):
    """One attempt: a child as uid connects to the target; the listener asks
    SO_ORIGINAL_DST. (ok, detail)."""
    target, why = outbound_target(settings, fam)
    if target is None:
        return None, why
    port = settings.outbound_port
    try:
        srv = _listener(fam, "0.0.0.0" if fam.version == 4 else "::", port)
    except OSError as e:
        return False, f"cannot listen on port {port}: {e.strerror}"
    answer = None
    with srv:
        pid = _connect_as(uid, fam, target)
        try:
            conn, _ = srv.accept()
            with conn:
                try:
                    answer = _original_dst(conn, fam)
                except OSError as e:
                    answer = e
                conn.sendall(TOKEN)
        except OSError:
            pass
        _child_code(pid)
    if answer is None:
        return False, (f"a connection as uid {uid} to {target[0]} port {target[1]} did not "
                       f"reach port {port}")
    if isinstance(answer, OSError):
        return False, f"getsockopt(SO_ORIGINAL_DST) failed: {answer.strerror}"
    if answer != target:
        return False, (f"SO_ORIGINAL_DST answered {answer[0]} port {answer[1]} for a "
                       f"connection to {target[0]} port {target[1]}")
    return True, (f"uid {uid} to {target[0]} port {target[1]} landed on port {port}; "
                  "SO_ORIGINAL_DST named it")


def can_switch_uid():
    """Root with its capabilities dropped (setpriv --bounding-set=-all) may not either."""
    caps = kernel.effective_caps()
    return bool(caps & (1 << kernel.CAP_SETUID)) and bool(caps & (1 << kernel.CAP_SETGID))


def registered_settings(settings):
    """The Settings this namespace is registered with, where readable (root, the node's
    bpffs mounted), else None: the outbound check picks its address, port and uid from
    them rather than from validate's own --config, which may not be the pod's."""
    from . import config
    meta = registration(settings)[3]
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        return None
    try:
        return config.settings_from_document(meta["config"], "validate", "the registration")
    except config.ConfigError:
        return None


def registration(settings):
    """(ok, detail, fix, description): this network namespace's entry in the node program
    set; ok None when it cannot be read from here (a pod mounts no bpffs of the node, and
    the pins are root's)."""
    from .namespace import NodeMaps
    from .node import InstallError, NodePaths, read_meta
    paths = NodePaths(settings.bpffs_path)
    where = settings.bpffs_path
    if not kernel.is_bpffs(where):
        return None, (f"not checked: no bpffs at {where} here; the inbound check stands "
                      "for it"), "", None
    try:
        os.stat(paths.node)
    except FileNotFoundError:
        return None, (f"not checked: no ebpf-tproxy node program set on {where} (not the "
                      "node's bpffs?); the inbound check stands for it"), "", None
    except OSError as e:
        return None, (f"not checked: {paths.root} cannot be read as uid {os.geteuid()} "
                      f"({e.strerror}); the inbound check stands for it"), "", None
    inode = netns.current_inode()
    try:
        if read_meta(paths) is None:
            return False, f"the node program set on {where} is incomplete", \
                "restart the ebpf-tproxy agent on the node", None
        with NodeMaps(paths) as maps:
            mine = [(n, m) for n, m in maps.registrations().items()
                    if m.get("netns_inode") == inode and m.get("complete")]
            if not mine:
                return False, (f"this network namespace (inode {inode}) is not registered "
                               f"in the node program set on {where}"), \
                    ("check that the node's CNI configuration chains ebpf-tproxy and the "
                     "agent's log for this pod"), None
            name, meta = mine[0]
            if not meta.get("netns_cookie") or maps.config(meta["netns_cookie"]) is None:
                return False, f"'{name}' is described but has no configuration entry", \
                    "run ebpf-tproxy status on the node; uninstall it and register it again", \
                    meta
    except (OSError, InstallError) as e:
        return None, f"not checked: the pins on {where} cannot be read here ({e})", "", None
    inbound = ((meta.get("config") or {}).get("redirect") or {}).get("inbound") or {}
    if settings.inbound_enabled and not inbound.get("enabled", True):
        return False, (f"registered as '{name}', but with the inbound redirect off "
                       "(redirect.inbound.enabled=false)"), \
            ("register the pod with inbound capture (no kuma.io/gateway), or validate "
             "with --config giving redirect.inbound.enabled: false"), meta
    if inbound.get("port") not in (None, settings.inbound_port):
        return False, (f"registered as '{name}' with inbound port {inbound.get('port')}, "
                       f"not {settings.inbound_port}"), \
            "give validate the pod's configuration (--config)", meta
    return True, f"registered as '{name}' (network namespace inode {inode})", "", meta


def run(settings, timeout, echo):
    """Every check until it passes or the time is up; returns the failed Result or None."""
    fams = families(settings)
    deadline = time.monotonic() + timeout
    checks = []

    def skipped(name, why):
        checks.append((name, lambda: (None, f"skipped: {why}")))
    # Kuma's test runs whatever the inbound setting: rule 4d (the DP user's call to a
    # local address goes to the inbound port) does not depend on it.
    pod = registered_settings(settings) if can_switch_uid() else None
    ports = free_ports(pod or settings)
    checks += [(f"inbound {f}", lambda f=f: check_inbound(f, settings.inbound_port,
                                                          settings.dp_uid, ports))
               for f in fams]
    uid = other_uid(pod or settings)
    if not settings.outbound_enabled:
        skipped("outbound", "the configuration has no outbound redirect")
    elif not can_switch_uid():
        skipped("outbound", f"needs a connection from a uid other than {settings.dp_uid}, "
                f"and uid {os.geteuid()} may not switch (no CAP_SETUID); run validate as "
                "root to check SO_ORIGINAL_DST")
    elif uid is None:
        skipped("outbound", "no uid outside the DP user and the uid exclusions to connect as")
    else:
        checks += [(f"outbound {f}", lambda f=f: check_outbound(pod or settings, f, uid))
                   for f in fams]
    checks.append(("registration", lambda: registration(settings)[:3]))
    for name, attempt in checks:
        while True:
            try:
                ok, detail, *fix = attempt()
            except PortTaken as e:
                ok, detail, fix = False, str(e), [
                    "run validate before the proxy starts (an init container), or in a "
                    "namespace where nothing listens on the redirect ports"]
                break
            if ok is not False or time.monotonic() >= deadline:
                break
            time.sleep(RETRY_S)   # the CNI plugin may still be registering the pod
        r = Result(name, ok, detail, fix[0] if fix else "")
        echo(r)
        if ok is False:
            return r
    return None


def default_fix(result):
    if result.fix:
        return result.fix
    if result.check.startswith("inbound"):
        return ("the pod's network namespace is not captured: check that the node's CNI "
                "configuration chains ebpf-tproxy and that the ebpf-tproxy agent runs "
                "(kubectl -n kube-system logs ds/ebpf-tproxy)")
    return "run ebpf-tproxy status on the node for this pod's registration"

