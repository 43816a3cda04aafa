"""`ebpf-tproxy trace`: each decision of a real connection, DNS query or SO_ORIGINAL_DST
answer arrives as one event naming the process, the addresses, the reason (the counters'
names) and where it was sent; filters apply; a flood with a reader that does not read
loses events (counted), not capture; the flag goes off however trace ends."""
import json
import os
import signal
import subprocess
import sys

import pytest

from loader import abi, namespace, node, probe, trace
from loader.lab import APP_IP4, APP_IP6, REMOTE_IP4, REMOTE_IP6

from .conftest import DP_UID, DP_USER, install, requires

# Each test reads the whole node (every namespace's flag, the one namespace's counters),
# and the perf-event-array case builds the node set itself: make test-neighbours runs
# them on a node of their own.
pytestmark = pytest.mark.alone("reads every registration's flag; builds its own node set")

LS = [sys.executable, "-m", "loader.lab.servers"]
COMM = os.path.basename(sys.executable)[:15]   # what the kernel calls the lab's clients
# Connect, then print this process's pid: the pid the events must name.
CLIENT = ("import json, os, sys\n"
          "from loader.lab.servers import connect_once\n"
          "line, _ = connect_once(sys.argv[1], int(sys.argv[2]))\n"
          "print(json.dumps({'pid': os.getpid(), 'line': line}))\n")


def fmt(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Trace:
    """`ebpf-tproxy trace --output json ARGS` on the lab's bpffs, started and awaited until
    it says it is tracing; stop() ends it with SIGINT (as Ctrl-C) and returns its events."""

    def __init__(self, lab, *args, env=None, stdout=subprocess.PIPE):
        self.p = subprocess.Popen(
            [sys.executable, "-m", "loader.cli", "trace", "--output", "json",
             "--ebpf-bpffs-path", lab.bpffs, *args],
            stdout=stdout, stderr=subprocess.PIPE, text=True, env=env or lab.env())
        self.said = []
        for line in self.p.stderr:
            self.said.append(line)
            if "Ctrl-C ends" in line:
                break
        assert self.said and "Ctrl-C ends" in self.said[-1], "".join(self.said)

    def stop(self, sig=signal.SIGINT):
        if self.p.poll() is None:
            self.p.send_signal(sig)
        out, err = self.p.communicate(timeout=120)
        self.said.append(err)
        assert self.p.returncode == 0, "".join(self.said)
        lines = [json.loads(x) for x in out.splitlines() if x.strip()]   # every line parses
        self.lost = [x["lost"] for x in lines if "lost" in x]
        return [x for x in lines if "lost" not in x]

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.communicate(timeout=60)


@pytest.fixture
def tracing(lab):
    """Start traces in the lab; every one still running is killed afterwards."""
    started = []

    def start(*args, **kw):
        t = Trace(lab, *args, **kw)
        started.append(t)
        return t
    yield start
    for t in started:
        t.kill()


def client(lab, host, port, user=0):
    r = lab.run([sys.executable, "-c", CLIENT, host, str(port)], user=user)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def traced_flags(lab):
    """{registration name: TP_F_TRACE set?}"""
    with namespace.NodeMaps(node.NodePaths(lab.bpffs)) as maps:
        return {n: bool(maps.config(m["netns_cookie"]).flags & abi.TP_F_TRACE)
                for n, m in maps.registrations().items()}


def one(events, **want):
    found = [e for e in events if all(e.get(k) == v for k, v in want.items())]
    assert len(found) == 1, (want, events)
    return found[0]


@pytest.fixture
def pod(lab):
    lab.proxy = lab.spawn(LS + ["listen", "out:15001", "in:15006"], user=DP_UID)
    lab.spawn(LS + ["listen", "app:8080", "ssh:22"])
    lab.spawn(LS + ["listen", "remote:8000", "remote:8001"], ns=lab.remote_ns,
              in_cgroup=False)
    return lab


EVENT_KINDS = [
    pytest.param("ring", marks=requires(probe.RINGBUF), id="ring-buffer"),
    # The perf event array is what 5.7 has; the test seam builds it on any kernel.
    pytest.param("perf", id="perf-event-array"),
]
# make kernels-ci runs the IPv4 case of each (emulated, every test costs minutes).
IPV4_IN_CI = pytest.param(REMOTE_IP4, marks=pytest.mark.kernel_ci, id="ipv4")


@pytest.mark.parametrize("kind", EVENT_KINDS)
@pytest.mark.parametrize("host", [IPV4_IN_CI, pytest.param(REMOTE_IP6, id="ipv6")])
def test_outbound_decisions_and_answers_name_process_reason_and_target(pod, tracing, host,
                                                                         kind):
    env = dict(pod.env(), EBPF_TPROXY_TEST_PERF_EVENTS="1") if kind == "perf" else None
    r = pod.tproxy("install", "--kuma-dp-user", DP_USER, "--exclude-outbound-ports", "8001",
                   env=env)
    assert r.returncode == 0, r.stderr
    assert traced_flags(pod) == {"default": False}
    t = tracing(env=env)
    assert traced_flags(pod) == {"default": True}
    redirected = client(pod, host, 8000)
    excluded = client(pod, host, 8001)
    dp = client(pod, host, 8000, user=DP_UID)
    direct_to_proxy = client(pod, "127.0.0.1", 15001)
    events = t.stop()
    said = "".join(t.said)
    assert ("perf event array" if kind == "perf" else "ring buffer") in said
    assert traced_flags(pod) == {"default": False}
    assert t.lost == []

    loop = "127.0.0.1" if ":" not in host else "::1"
    e = one(events, pid=redirected["pid"])
    assert (e["reason"], e["address"], e["sent_to"], e["uid"], e["comm"], e["protocol"],
            e["namespace"]) == ("redirected_outbound", fmt(host, 8000), fmt(loop, 15001),
                                0, COMM, "tcp", "default")
    assert e["hook"] == ("connect4" if ":" not in host else "connect6")
    e = one(events, pid=excluded["pid"])
    assert (e["reason"], e["address"], e["sent_to"]) == ("excluded_port", fmt(host, 8001),
                                                         None)
    e = one(events, pid=dp["pid"])
    assert (e["reason"], e["uid"], e["sent_to"]) == ("dp_direct", DP_UID, None)
    e = one(events, pid=direct_to_proxy["pid"])
    assert (e["reason"], e["address"]) == ("app_to_local", "127.0.0.1:15001")
    # The proxy's side: its SO_ORIGINAL_DST answered for the redirected connection, missed
    # for the one dialed to it directly; the peer is the application's end.
    e = one(events, reason="orig_dst_answered")
    assert (e["hook"], e["address"], e["uid"], e["sent_to"]) == (
        "getsockopt", fmt(host, 8000), DP_UID, "proxy :15001")
    assert e["peer"] == redirected["line"].split("peer=")[1].split()[0]
    if probe_has("getsockopt pid and comm (trace)"):
        assert e["pid"] == pod.proxy.pid
    else:
        assert e["pid"] is None
    e = one(events, reason="orig_dst_missed")
    assert (e["address"], e["peer"]) == (None, direct_to_proxy["line"].split("peer=")[1]
                                         .split()[0])
    assert len(events) == 6, events


def probe_has(feature):
    from .conftest import has
    return has(feature)


@pytest.mark.parametrize("host,client_ip", [
    pytest.param(APP_IP4, REMOTE_IP4, marks=pytest.mark.kernel_ci, id="ipv4"),
    pytest.param(APP_IP6, REMOTE_IP6, id="ipv6")])
@requires("netns/sk_lookup")
def test_inbound_decisions_show_the_client(pod, tracing, host, client_ip):
    install(pod)
    t = tracing("--name", "default")
    r = pod.py("connect", host, "8080", ns=pod.remote_ns, in_cgroup=False)
    assert json.loads(r.stdout)["line"].startswith("in "), r.stdout
    client_end = json.loads(r.stdout)["line"].split("peer=")[1].split()[0]
    r = pod.py("connect", host, "22", ns=pod.remote_ns, in_cgroup=False)
    assert json.loads(r.stdout)["line"].startswith("ssh "), r.stdout
    events = t.stop()
    e = one(events, reason="redirected_inbound")
    assert (e["hook"], e["address"], e["peer"], e["sent_to"], e["pid"], e["uid"]) == (
        "sk_lookup", fmt(host, 8080), client_end, "listener :15006", None, None)
    e = one(events, reason="inbound_excluded_port")
    assert (e["address"], e["sent_to"]) == (fmt(host, 22), None)
    assert e["peer"].startswith(fmt(client_ip, "")[:-1])
    e = one(events, reason="inbound_orig_dst_answered")
    assert (e["hook"], e["address"], e["peer"], e["uid"]) == (
        "getsockopt", fmt(host, 8080), client_end, DP_UID)
    assert len(events) == 3, events


@pytest.fixture
def dns(pod):
    pod.spawn(LS + ["dns", "53", "--a", "198.18.0.99", "--aaaa", "fd00:7470::99"],
              ns=pod.remote_ns, in_cgroup=False)
    pod.spawn(LS + ["dns", "15053", "--a", "240.0.0.1", "--aaaa", "fd00::240"], user=DP_UID)
    return pod


@pytest.mark.kernel_ci
def test_dns_decisions_and_restored_replies(dns, tracing):
    install(dns, "--redirect-all-dns-traffic")
    t = tracing()
    r = dns.py("query", REMOTE_IP4, "demo.mesh")
    assert json.loads(r.stdout)["answer"] == "240.0.0.1", r.stdout + r.stderr
    r = dns.py("query", REMOTE_IP4, "demo.mesh", user=DP_UID)
    assert json.loads(r.stdout)["answer"] == "198.18.0.99", r.stdout + r.stderr
    events = t.stop()
    e = one(events, reason="redirected_dns")
    assert (e["hook"], e["protocol"], e["address"], e["sent_to"], e["uid"]) == (
        "sendmsg4", "udp", f"{REMOTE_IP4}:53", "127.0.0.1:15053", 0)
    e = one(events, reason="dns_reply_source_restored")
    assert (e["hook"], e["address"], e["uid"]) == ("recvmsg4", f"{REMOTE_IP4}:53", 0)
    e = one(events, reason="dns_dp_direct")
    assert (e["uid"], e["sent_to"]) == (DP_UID, None)


def test_filters_leave_the_rest_in_the_kernel(pod, tracing):
    install(pod, "--exclude-outbound-ports", "8001")
    by_dst = tracing("--dst", f"{REMOTE_IP4}/32:8001")
    client(pod, REMOTE_IP4, 8000)
    client(pod, REMOTE_IP4, 8001)
    client(pod, REMOTE_IP6, 8001)
    events = by_dst.stop()
    assert [(e["reason"], e["address"]) for e in events] == [
        ("excluded_port", f"{REMOTE_IP4}:8001")]

    by_uid_and_reason = tracing("--uid", DP_USER, "--reason", "dp_direct,excluded_port")
    client(pod, REMOTE_IP4, 8000)                  # root: redirected, not shown
    client(pod, REMOTE_IP4, 8001)                  # root: excluded, but not the uid
    client(pod, REMOTE_IP6, 8000, user=DP_UID)     # shown
    events = by_uid_and_reason.stop()
    # the proxy's getsockopt (its uid) is neither reason: not shown either
    assert [(e["reason"], e["uid"], e["address"]) for e in events] == [
        ("dp_direct", DP_UID, f"[{REMOTE_IP6}]:8000")]

    # --pid, and --count ends the trace by itself.
    looping = pod.spawn(LS + ["loop", REMOTE_IP4, "8000"], stdin=subprocess.PIPE)
    by_pid = tracing("--pid", str(looping.pid), "--count", "5")
    client(pod, REMOTE_IP4, 8001)                  # another process: not shown
    by_pid.p.wait(timeout=120)
    events = by_pid.stop()
    looping.stdin.close()
    assert len(events) == 5 and {e["pid"] for e in events} == {looping.pid}, events
    assert traced_flags(pod) == {"default": False}


def test_a_flood_with_a_reader_that_does_not_read_loses_events_not_capture(dns, tracing):
    """60,000 decisions as fast as one process makes them (DNS datagrams: each one is
    decided and redirected), while trace's output pipe is not read: most must be lost,
    counted, and every datagram still be redirected."""
    install(dns, "--redirect-all-dns-traffic")
    n = 60000
    t = tracing()   # its stdout is a pipe this test leaves unread until the flood is over
    before = counters(dns)["redirected_dns"]
    flood = ("import socket, sys\n"
             "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             "for i in range(int(sys.argv[1])):\n"
             "    s.sendto(b'x', (sys.argv[2], 53))\n")
    r = dns.run([sys.executable, "-c", flood, str(n), REMOTE_IP4], timeout=600)
    assert r.returncode == 0, r.stderr
    assert counters(dns)["redirected_dns"] - before == n   # capture unaffected
    assert client(dns, REMOTE_IP4, 8000)["line"].startswith("out ")   # the node serves on
    events = t.stop()
    summary = t.said[-1]
    lost = int(summary.split(" shown, ")[1].split(" lost")[0])
    shown = sum(1 for e in events if e["reason"] == "redirected_dns")
    assert shown + lost >= n, summary
    # What the reader can hold while it does not read: the ring's 10,922 events (88 bytes
    # and an 8-byte header each), at most QUEUE_MAX taken out of it before its output
    # blocked, and the pipe's few hundred lines. The rest must have been counted lost.
    assert lost >= n - trace.TP_RING_EVENTS - trace.QUEUE_MAX - 1000, summary
    assert traced_flags(dns) == {"default": False}


def trace_filter(lab):
    import ctypes as ct

    from loader import bpfsys
    with bpfsys.PinnedMap(node.NodePaths(lab.bpffs).map("tp_trace_filter"), ct.c_uint32,
                          abi.TpTraceFilter, max_entries=1) as m:
        return m.lookup(ct.c_uint32(0))


def counters(lab):
    with namespace.NodeMaps(node.NodePaths(lab.bpffs)) as maps:
        (m,) = maps.registrations().values()
        return maps.counters_total(m["netns_cookie"])


def test_however_trace_ends_the_flag_goes_off(pod, tracing):
    install(pod)
    t = tracing()
    refused = subprocess.run([sys.executable, "-m", "loader.cli", "trace",
                              "--ebpf-bpffs-path", pod.bpffs], capture_output=True, text=True,
                             env=pod.env(), timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "another 'ebpf-tproxy trace'" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    t.kill()   # SIGKILL: no chance to switch the flag off
    assert traced_flags(pod) == {"default": True}
    r = pod.tproxy("status")
    assert traced_flags(pod) == {"default": False}, r.stdout + r.stderr
    assert trace_filter(pod).flags == 0   # nobody reading: getsockopt looks nothing up
    # SIGTERM and --duration end it as Ctrl-C does: the flag off.
    t = tracing()
    t.stop(signal.SIGTERM)
    assert traced_flags(pod) == {"default": False}
    t = tracing("--duration", "1")
    t.p.wait(timeout=120)
    t.stop()
    assert traced_flags(pod) == {"default": False}
    # An update of the namespace while a trace runs keeps it traced.
    t = tracing()
    install(pod, "--exclude-outbound-ports", "9000")
    assert traced_flags(pod) == {"default": True}
    pid = client(pod, REMOTE_IP4, 8000)["pid"]
    assert one(t.stop(), pid=pid)["reason"] == "redirected_outbound"


@pytest.mark.parametrize("args,says", [
    (["--reason", "nonsense"], "--reason: unknown reason 'nonsense'"),
    (["--dst", "10.0.0.0/33"], "--dst: '10.0.0.0/33' is not an address or CIDR"),
    (["--dst", "10.0.0.1:70000"], "--dst: port '70000' is not 1-65535"),
    (["--uid", "no-such-user-here"], "--uid: no user 'no-such-user-here'"),
    (["--name", "absent"], "--name: no namespace is registered as 'absent'"),
])
def test_bad_input_is_one_line_and_changes_nothing(pod, args, says):
    install(pod)
    r = subprocess.run([sys.executable, "-m", "loader.cli", "trace", "--ebpf-bpffs-path",
                        pod.bpffs, *args], capture_output=True, text=True, env=pod.env(),
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert traced_flags(pod) == {"default": False}
