"""--ebpf-accelerate: bytes between a captured application and the local proxy move socket
to socket (sk_msg on tp_accel). Shown with Debian's HAProxy in the middle and an echo
server on the lab's remote host: every byte must come back, in order, while the counters
prove the bytes took the accelerated path; sockets leave tp_accel when they close.

Acceleration is on by default where the kernel supports it (5.15+), so `make test` runs the
whole kernel suite accelerated there; `make test-no-accelerate` runs it again on TCP with
Kuma-style KUMA_TRANSPARENT_PROXY_EBPF_ACCELERATE=false for every install the tests make."""
import ctypes as ct
import json
import os
import subprocess
import sys
import time

import pytest

from loader import abi, bpfsys, node
from loader.lab import REMOTE_IP4, REMOTE_IP6

from .conftest import DP_UID, has, haproxy_config, install, requires
from .residue import snapshot, wait_back_to

# make kernels-ci runs every test here but test_switched_off_with_false (the same code path
# as auto on a kernel without acceleration, which test_auto_... covers there).
CI = pytest.mark.kernel_ci

ACCEL = ("sockhash/sk_msg + sk_storage", "sock_ops netns cookie")
needs_accel = requires(*ACCEL)
HAS_ACCEL = all(has(f) for f in ACCEL)


def status(lab):
    r = lab.tproxy("status", "--output", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]


def wait_status(lab, pred, timeout=60.0):
    """Poll status until pred(status) holds (sockets leave tp_accel as the kernel closes
    them, a moment after the processes did)."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(lab)
        if pred(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def echo_lab(lab, proxy="haproxy"):
    lab.spawn([sys.executable, "-m", "loader.lab.servers", "echo", "7000"],
              ns=lab.remote_ns, in_cgroup=False)
    if proxy == "haproxy":
        cfg = lab.shared_file("haproxy.cfg", haproxy_config(15001, "orig 0.0.0.0:0"))
        proc = lab.spawn(["haproxy", "-db", "-f", cfg], user=DP_UID, ready=None)
        lab.wait_listening(15001, proc=proc)
    else:
        lab.spawn([sys.executable, "-m", "loader.lab.servers", "proxy", "--port", "15001"],
                  user=DP_UID)


def transfer(lab, host, nbytes, parallel, chunk=65536):
    r = lab.py("transfer", host, "7000", "--bytes", str(nbytes), "--parallel", str(parallel),
               "--chunk", str(chunk))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def hold_connection(lab):
    """One open connection from the application to the echo server; returns say(line) ->
    the echoed line (say(None) closes it and waits for the process to end)."""
    proc = lab.spawn([sys.executable, "-m", "loader.lab.servers", "hold", REMOTE_IP4, "7000"],
                     stdin=subprocess.PIPE)

    def say(line):
        if line is None:
            proc.stdin.close()
            proc.wait(timeout=10)
            return None
        proc.stdin.write((line + "\n").encode())
        proc.stdin.flush()
        return proc.stdout.readline().decode().strip()
    return say


@CI
@needs_accel
def test_haproxy_bulk_is_byte_exact_and_accelerated(lab):
    echo_lab(lab)
    install(lab, "--ebpf-accelerate")
    out = transfer(lab, REMOTE_IP4, 4 << 20, parallel=8)
    assert out == {"connections": 8, "bytes_back": 8 * (4 << 20), "all_exact": True,
                   "errors": []}
    st = status(lab)
    c = st["counters"]
    # both ends of each of the 8 connections joined; bytes went socket to socket
    assert c["accel_sockets_added"] == 16, c
    assert c["accel_msgs_redirected"] > 0 and c["accel_sockets_failed"] == 0, c
    assert c["orig_dst_answered"] == 8
    st = wait_status(lab, lambda s: s["accelerated_sockets"] == 0
                     and s["tracked_connections"] == 0)
    assert (st["accelerated_sockets"], st["tracked_connections"]) == (0, 0)


@CI
@needs_accel
def test_small_writes_right_after_connect_keep_their_order(lab):
    # Many 1..16-byte writes from the first moment: the application can write before the
    # proxy's socket exists (then TCP carries that connection for good); either way the
    # echo must be exact.
    echo_lab(lab, proxy="lab")
    install(lab, "--ebpf-accelerate")
    out = transfer(lab, REMOTE_IP4, 64 << 10, parallel=16, chunk=16)
    assert out["all_exact"] and out["bytes_back"] == 16 * (64 << 10), out
    c = status(lab)["counters"]
    assert c["accel_msgs_redirected"] > 0, c


@CI
@needs_accel
def test_a_socket_whose_peer_left_stays_on_tcp(lab):
    # The proxy's end leaves tp_accel (removed by the test, as a full map or a race with
    # the final ACK would leave it out): the application's next write finds no peer, goes
    # through TCP, and so does every later one, in order.
    echo_lab(lab)
    install(lab, "--ebpf-accelerate")
    hold = hold_connection(lab)
    assert hold("one") == "one"
    pin = node.NodePaths(lab.bpffs).map("tp_accel")
    with bpfsys.PinnedMap(pin, abi.TpSockKey, ct.c_uint64) as m:
        proxy_end = [k for k in m.keys() if k.local_port == 15001]
        assert len(proxy_end) == 1
        m.delete(proxy_end[0])
    c0 = status(lab)["counters"]
    assert [hold(w) for w in ("two", "three", "four")] == ["two", "three", "four"]
    c = status(lab)["counters"]
    assert c["accel_msgs_via_tcp"] == 1, c
    assert c["accel_msgs_redirected"] == c0["accel_msgs_redirected"], c


@CI
@needs_accel
def test_ipv6_is_accelerated_too(lab):
    echo_lab(lab, proxy="lab")   # HAProxy 2.6 asks SO_ORIGINAL_DST for IPv4 only
    install(lab, "--ebpf-accelerate")
    out = transfer(lab, REMOTE_IP6, 1 << 20, parallel=2)
    assert out["all_exact"] and out["bytes_back"] == 2 << 20, out
    c = status(lab)["counters"]
    assert c["accel_sockets_added"] == 4 and c["accel_msgs_redirected"] > 0, c


def test_switched_off_with_false(lab):
    echo_lab(lab, proxy="lab")
    install(lab, "--ebpf-accelerate=false")
    out = transfer(lab, REMOTE_IP4, 1 << 20, parallel=2)
    assert out["all_exact"], out
    c = status(lab)["counters"]
    assert (c["accel_sockets_added"], c["accel_msgs_redirected"]) == (0, 0), c


@CI
def test_auto_is_on_exactly_where_the_kernel_supports_it(lab):
    """The default (auto): accelerated where check's probes say the kernel can, TCP
    otherwise, and install says which (runs on every kernel: make kernels shows both)."""
    echo_lab(lab, proxy="lab")
    r = install(lab, "--ebpf-accelerate=auto")   # the default; explicit over make's env
    said = r.stdout.split("sockmap acceleration ")[-1].strip()
    expected = (said == "on") if HAS_ACCEL else said.startswith(
        "off (this kernel has no netns cookie")
    assert expected, said
    out = transfer(lab, REMOTE_IP4, 1 << 20, parallel=2)
    assert out["all_exact"], out
    st = status(lab)
    c = st["counters"]
    if HAS_ACCEL:
        assert c["accel_sockets_added"] == 4 and c["accel_msgs_redirected"] > 0, c
    else:
        assert (c["accel_sockets_added"], c["accel_msgs_redirected"]) == (0, 0), c


@CI
@needs_accel
def test_upgrade_and_uninstall_leave_open_connections_working(lab):
    echo_lab(lab)
    before = snapshot()
    install(lab, "--ebpf-accelerate")
    say = hold_connection(lab)
    assert say("one") == "one"
    # switched off in place: no new socket joins, the open one stays accelerated
    install(lab, "--ebpf-accelerate=false")
    assert say("two") == "two"
    assert status(lab)["counters"]["accel_sockets_added"] == 2
    out = transfer(lab, REMOTE_IP4, 1 << 16, parallel=1)
    assert out["all_exact"]
    assert status(lab)["counters"]["accel_sockets_added"] == 2
    install(lab, "--ebpf-accelerate")
    # uninstalled under an accelerated connection: it keeps working; the kernel frees the
    # sockhash and sk_msg_accel with its last socket, and nothing else is left
    r = lab.tproxy("uninstall")
    assert r.returncode == 0, r.stderr
    assert say("three") == "three"
    say(None)
    assert wait_back_to(before) == {}


@CI
@pytest.mark.skipif(HAS_ACCEL, reason="this kernel has what --ebpf-accelerate needs; the "
                    "refusal is shown on kernels without it (make kernels: 5.10)")
def test_refused_on_a_kernel_without_it(lab):
    before = snapshot()
    r = install(lab, "--ebpf-accelerate", ok=False)
    assert r.returncode != 0
    assert "--ebpf-accelerate" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert wait_back_to(before) == {}
