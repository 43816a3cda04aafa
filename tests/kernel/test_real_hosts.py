"""What real hosts have and clean labs hide: several instances side by side and nested,
proxies with SO_REUSEPORT listeners (Envoy), a connection table made full on purpose, TCP
Fast Open, and proxies of other namespaces in the same cgroup. The full table is tried with
conntrack off and on: conntrack changes what the kernel itself answers."""
import json
import os
import subprocess
import sys

import pytest

from loader.lab import APP_IP4, REMOTE_IP4

from .conftest import DP_UID, install, requires, sh_in

LS = [sys.executable, "-m", "loader.lab.servers"]

# make kernels-ci (5.10, a minute a test under emulation) runs what depends on the kernel:
# nested scoping with the learned cookie, listener slots, the handshake table, Fast Open.
CI = pytest.mark.kernel_ci


def status(lab, name=None):
    r = lab.tproxy("status", "--output", "json", *(["--name", name] if name else []))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def counters(lab, name=None):
    return status(lab, name)[0]["counters"]


def install_other(lab, name, cgroup, netns, *args):
    """An instance of its own beside the lab's: another name, cgroup and namespace."""
    r = lab.tproxy("install", "--kuma-dp-user", "nobody", "--name", name,
                   "--ebpf-cgroup-path", cgroup, "--netns", netns, *args, netns=False)
    assert r.returncode == 0, r.stderr
    return r


# ---------------------------------------------------------------- several instances

@pytest.mark.parametrize("layout", ["siblings", "nested", "same-cgroup"])
def test_several_instances_each_answer_for_their_own(lab, layout):
    # Two pods, each with its own instance and configuration. Nested: the outer instance
    # (on the lab's cgroup) also runs for the inner pod's sockets, after the inner one;
    # it must leave the inner instance's SO_ORIGINAL_DST answer alone. Same cgroup: both
    # instances' programs run for both pods' sockets, one after the other.
    other_ns = lab.add_netns()
    if layout == "same-cgroup":
        inner = outer = lab.cgroup
    else:
        inner = lab.child_cgroup("inner")
        outer = lab.child_cgroup("outer") if layout == "siblings" else lab.cgroup
    # pod A: the lab's namespace; port 8001 excluded there only
    lab.spawn(LS + ["listen", "out:15001"], user=DP_UID, in_cgroup=outer)
    lab.spawn(LS + ["listen", "remote:8000", "remote:8001"], ns=lab.remote_ns,
              in_cgroup=False)
    install(lab, "--exclude-outbound-ports", "8001", "--ebpf-cgroup-path", outer)
    # pod B: another namespace, in the inner cgroup, nothing excluded
    lab.spawn(LS + ["listen", "out:15001"], user=DP_UID, ns=other_ns, in_cgroup=inner)
    install_other(lab, "podb", inner, f"/run/netns/{other_ns}")

    def from_pod(ns, cgroup, port):
        r = lab.run(LS + ["connect", REMOTE_IP4, str(port)], ns=ns, in_cgroup=cgroup)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["line"]

    assert from_pod(lab.app_ns, outer, 8000).startswith(f"out orig={REMOTE_IP4}:8000 ")
    assert from_pod(lab.app_ns, outer, 8001).startswith("remote ")
    for port in (8000, 8001):
        assert from_pod(other_ns, inner, port).startswith(f"out orig={REMOTE_IP4}:{port} ")
    assert counters(lab, "podb")["orig_dst_answered"] == 2
    a = counters(lab, "default")
    assert a["orig_dst_answered"] == 1
    assert a["redirected_outbound"] == 1   # pod B's connects were not pod A's to decide


# ---------------------------------------------------------------- Envoy's listeners

@CI
def test_every_reuseport_listener_is_registered_and_one_closing_loses_nothing(lab):
    # Envoy: one listener per worker on 15006, all in one SO_REUSEPORT group. The last one
    # to listen() is the one that used to be registered alone; closing it refused every
    # new connection although three workers still listened.
    lab.spawn(LS + ["http", "8080"])
    install(lab)
    workers = lab.spawn(LS + ["workers", "15006", "--count", "4"], user=DP_UID,
                        stdin=subprocess.PIPE)

    def round_of(n):
        seen = {}
        for _ in range(n):
            r = lab.py("connect", APP_IP4, "8080", ns=lab.remote_ns, in_cgroup=False)
            assert r.returncode == 0, r.stderr
            line = json.loads(r.stdout)["line"]
            assert line.endswith(f"orig={APP_IP4}:8080"), line
            worker = line.split()[0]
            seen[worker] = seen.get(worker, 0) + 1
        return seen

    assert len(round_of(24)) >= 2          # spread by the kernel's reuseport selection
    before_close = status(lab)[0]["inbound_listeners"]
    workers.stdin.write(b"close 3\n")
    workers.stdin.flush()
    assert workers.stdout.readline().strip() == b"closed 3"
    after = round_of(24)
    assert "worker=3" not in after and len(after) >= 2, after
    assert sum(after.values()) == 24
    assert len(before_close["ipv6"]) == 4, before_close
    assert len(status(lab)[0]["inbound_listeners"]["ipv6"]) == 3
    assert counters(lab)["inbound_refused_no_listener"] == 0


# ---------------------------------------------------------------- full connection table

@pytest.mark.parametrize("conntrack", [False, True],
                         ids=["clean", "conntrack"], indirect=True)
@pytest.mark.alone("its node set is built with a table of 4 (EBPF_TPROXY_TEST_CONN_MAX)")
def test_a_full_connection_table_is_counted_and_never_answers_wrong(lab, conntrack):
    # A table of 4 and handshakes held in flight: the proxy accepts one connection (backlog
    # 0) and nothing more until told, so later SYNs wait in the handshake with their
    # entries. Those that found no room must get no answer at all -- with conntrack
    # active, not the kernel's either, which would be the proxy itself.
    proxy = lab.spawn(LS + ["listen", "out:15001", "--backlog", "0", "--gate"], user=DP_UID,
                      stdin=subprocess.PIPE)
    r = lab.tproxy("install", "--kuma-dp-user", "nobody",
                   env=dict(lab.env(), EBPF_TPROXY_TEST_CONN_MAX="4"))
    assert r.returncode == 0, r.stderr
    ports = list(range(9000, 9009))
    client = subprocess.Popen(lab.command(LS + ["connect-many", REMOTE_IP4] +
                                          [str(p) for p in ports]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=lab.env(), preexec_fn=lab._preexec(True))
    try:
        # Every connect() has passed TCP_CONNECT_CB once each one is counted one way or
        # the other; only then may the proxy start accepting.
        def settled():
            c = counters(lab)
            return c["conn_tracked"] + c["conn_track_failed"] >= len(ports)
        lab.wait_for(settled, what="every connect() recorded or counted as failed")
        proxy.stdin.write(b"go\n")
        proxy.stdin.flush()
        out, err = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    lines = json.loads(out)
    c = counters(lab)
    answered = [p for p, line in lines.items() if f"orig={REMOTE_IP4}:{p} " in line]
    unanswered = [p for p, line in lines.items() if " orig=- " in line]
    assert sorted(answered + unanswered) == sorted(str(p) for p in ports), (lines, c)
    assert c["conn_track_failed"] >= len(ports) - 1 - 4 and \
        len(unanswered) == c["conn_track_failed"], (lines, c)
    # Without conntrack the kernel had no answer (ENOENT); with it, its answer would have
    # been the proxy's own address, which is refused.
    refused, missed = c["orig_dst_refused_loop"], c["orig_dst_missed"]
    assert (refused, missed) == ((len(unanswered), 0) if conntrack else
                                 (0, len(unanswered))), c
    assert status(lab)[0]["tracked_connections"] == 0


# ---------------------------------------------------------------- TCP Fast Open

@CI
def test_tcp_fast_open_is_answered(lab):
    # A Fast Open listener creates the proxy's socket at the SYN, before the application's
    # side is established; the proxy can accept and ask at once.
    sh_in(lab.app_ns, "sysctl", "-qw", "net.ipv4.tcp_fastopen=0x207")   # no cookie needed
    log = lab.shared_file("proxy.log", "")
    os.chmod(log, 0o666)
    lab.spawn(LS + ["listen", "out:15001", "--fastopen", "--log", log], user=DP_UID)
    install(lab)
    for i in range(10):
        r = lab.py("connect", REMOTE_IP4, str(8000 + i), "--fastopen")
        assert r.returncode == 0, r.stderr
        line = json.loads(r.stdout)["line"]
        assert line.startswith(f"out orig={REMOTE_IP4}:{8000 + i} "), line
    fast = sh_in(lab.app_ns, "nstat", "-asz", "TcpExtTCPFastOpenPassive").stdout.split()
    assert int(fast[fast.index("TcpExtTCPFastOpenPassive") + 1]) >= 10, fast
    # The proxy's SYN-ACKs dropped: the application's side never gets established, yet
    # the proxy's socket exists from the SYN and its question must be answered already.
    sh_in(lab.app_ns, "iptables", "-w", "-A", "OUTPUT", "-p", "tcp", "--sport", "15001",
          "--tcp-flags", "SYN,ACK", "SYN,ACK", "-j", "DROP")
    r = lab.py("connect", REMOTE_IP4, "8100", "--fastopen")
    assert json.loads(r.stdout)["line"].startswith("ERROR"), r.stdout   # never established
    def lines():
        with open(log) as f:
            return f.read().strip().splitlines()
    lab.wait_for(lambda: len(lines()) >= 11,
                 what="the proxy's line for the half-open Fast Open connection")
    last = lines()[10]
    assert last.startswith(f"out orig={REMOTE_IP4}:8100 "), last


# ---------------------------------------------------------------- other namespaces

@CI
@requires("instance netns cookie")
def test_a_proxy_in_another_namespace_never_gets_our_answer(lab):
    # The same cgroup, another network namespace with a proxy of its own (not an instance's)
    # and a connection with exactly the 4-tuple of one of ours, live at the same time.
    other_ns = lab.add_netns()
    sh_in(other_ns, "ip", "addr", "add", f"{APP_IP4}/32", "dev", "lo")
    lab.spawn(LS + ["echo", "8002"], ns=lab.remote_ns, in_cgroup=False)
    lab.spawn(LS + ["proxy", "--port", "15001"], user=DP_UID)
    lab.spawn(LS + ["listen", "other:15001"], user=DP_UID, ns=other_ns)
    install(lab)
    lab.spawn(LS + ["hold", REMOTE_IP4, "8002"], stdin=subprocess.PIPE)
    # The held connection as the application's socket sees it: APP_IP4:P -> 127.0.0.1:15001
    # (the proxy's accepted socket has source port 15001, so only ours matches).
    ss = lab.run(["ss", "-Htn", "state", "established", "dport = :15001"]).stdout.split()
    ip, _, port = ss[2].rpartition(":")
    assert ip == APP_IP4, ss
    r = lab.py("connect", "127.0.0.1", "15001", "--bind", APP_IP4, "--bind-port", port,
               ns=other_ns)
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout)["line"]
    assert line.startswith("other orig=- "), line
