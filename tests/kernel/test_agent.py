"""The node agent (`ebpf-tproxy agent`) as a real process on the lab's bpffs, with real
netlink events, real traffic and a real Prometheus: addresses followed, stored namespaces
brought back after the bpffs is emptied (a reboot), SIGKILL and SIGHUP under traffic with
no connection lost, bad state files skipped, the node set kept for the next install.

The agent runs in the lab's remote namespace (a stand-in for the node's own, so that its
metrics listener and Prometheus stay inside the lab); it reaches every namespace by path,
as it does on a node."""
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from loader import netns
from loader.lab import APP_IP4, PYTHON, REMOTE_IP4

from .conftest import DP_UID, DP_USER, listeners, pod_netns, reached

LS = [sys.executable, "-m", "loader.lab.servers"]
NEW_IP = "10.99.0.7"     # an address the test adds to the app namespace after install


class Agent:
    """One `ebpf-tproxy agent` process of the lab; its log in a file."""

    def __init__(self, lab, state_dir, *extra):
        assert state_dir == lab.state_dir   # the lab's store: EBPF_TPROXY_STATE_DIR
        self.lab, self.extra = lab, extra
        self.proc = self.log_path = self.port = None

    def start(self):
        self.proc, self.log_path, self.port = self.lab.start_agent(*self.extra,
                                                                   ns=self.lab.remote_ns)
        return self

    def text(self):
        with open(self.log_path) as f:
            return f.read()

    def lines(self):
        return self.text().splitlines()

    def events(self):
        """The event names logged so far (text format: '<time> <event>: ...')."""
        out = []
        for ln in self.lines():
            if ln.startswith("{"):
                out.append(json.loads(ln)["event"])
            else:
                out.append(ln.split(" ", 2)[1].rstrip(":"))
        return out

    def get(self, path):
        """(status, body) of GET path, from inside the namespace the agent listens in."""
        def fetch():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                            timeout=10) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()
        return netns.run_in(f"/run/netns/{self.lab.remote_ns}", fetch)

    def metric(self, name, **labels):
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        line = f"{name}{{{want}}}" if labels else name
        for ln in self.get("/metrics")[1].splitlines():
            if ln.startswith(line + " "):
                return float(ln.split()[-1])
        return None

    def applied_after(self, t):
        """Seconds from t to the first "applied" line logged after it (text format),
        waiting for it (the switch is in force a moment before the line is written)."""
        def seconds():
            for ln in self.lines():
                stamp, _, rest = ln.partition(" ")
                when = datetime.datetime.fromisoformat(stamp)
                if rest.startswith("applied:") and when >= t:
                    return (when - t).total_seconds()
            return None
        self.lab.wait_for(lambda: seconds() is not None, f"an 'applied' line after {t}")
        return seconds()

    def send(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@pytest.fixture
def state_dir(lab):
    """The lab's store (also EBPF_TPROXY_STATE_DIR of every lab command)."""
    lab.shared_file("marker", "")   # makes lab.tmpdir, for the agents' logs
    return lab.state_dir


def install(lab, state_dir, *args, ns=None, name="default"):
    extra = ["--netns", f"/run/netns/{ns}", "--name", name] if ns else []
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--state-dir", state_dir, *args,
                   *extra, netns=ns is None)
    assert r.returncode == 0, r.stderr
    return r


def status(lab):
    r = lab.tproxy("status", "--output", "json")
    assert r.returncode == 0, r.stderr
    return {e["name"]: e for e in json.loads(r.stdout)}


def stored(state_dir):
    from loader import store
    return store.names(state_dir)


def first(lab, host, port):
    return reached(lab, host, port)["line"].split()[0]


def test_an_address_added_after_install_is_local_within_a_second(lab, state_dir):
    """Kuma's rule: a non-DP connection to an address of the namespace itself goes
    direct (iptables' -o lo RETURN); to any other address it is captured."""
    listeners(lab)
    agent = Agent(lab, state_dir).start()
    install(lab, state_dir)
    lab.wait_for(lambda: "watching" in agent.events(), "the agent watching 'default'")
    assert first(lab, NEW_IP, 8000) == "out"          # not ours yet: captured
    added = datetime.datetime.now(datetime.timezone.utc)
    lab.ip(lab.app_ns, "addr", "add", f"{NEW_IP}/32", "dev", "lo")
    lab.wait_for(lambda: first(lab, NEW_IP, 8000) == "local", f"{NEW_IP} local")
    # Within a second by the agent's own clock (its "applied" line), not the test's polls.
    assert agent.applied_after(added) <= 1.0
    assert f"{NEW_IP}/32" in status(lab)["default"]["meta"]["local_networks"]
    removed = datetime.datetime.now(datetime.timezone.utc)
    lab.ip(lab.app_ns, "addr", "del", f"{NEW_IP}/32", "dev", "lo")
    lab.wait_for(lambda: first(lab, NEW_IP, 8000) == "out", f"{NEW_IP} no longer local")
    assert agent.applied_after(removed) <= 1.0
    assert f"{NEW_IP}/32" not in status(lab)["default"]["meta"]["local_networks"]
    assert agent.metric("ebpf_tproxy_agent_address_changes_total") == 2
    assert agent.get("/healthz") == (200, "ok\n")


def test_an_emptied_bpffs_gets_every_stored_namespace_back_and_no_gone_one(lab, state_dir):
    """The reboot case: the bpffs is empty when the agent starts; each stored namespace
    that exists is captured again, one that no longer exists is dropped from the store."""
    listeners(lab)
    agent = Agent(lab, state_dir).start()
    install(lab, state_dir, "--store", "--exclude-outbound-ports", "8001")
    pod, gone = pod_netns(lab), pod_netns(lab)
    install(lab, state_dir, "--store-firewalld", "--redirect-inbound=false", ns=pod,
            name="pod")
    install(lab, state_dir, "--store", "--redirect-inbound=false", ns=gone, name="gone")
    install(lab, state_dir, "--redirect-inbound=false", ns=lab.add_netns(), name="unstored")
    assert stored(state_dir) == ["default", "gone", "pod"]
    assert agent.stop() == 0
    # The reboot: every pin gone with the bpffs (its links detach), one namespace gone.
    subprocess.run(["umount", lab.bpffs], check=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", lab.bpffs], check=True)
    lab.ip(gone, "link", "del", "d0")
    subprocess.run(["ip", "netns", "del", gone], check=True)
    lab.extra_ns.remove(gone)
    assert first(lab, REMOTE_IP4, 8000) == "remote"   # nothing captures now
    agent = Agent(lab, state_dir, "--store-grace", "0").start()
    st = status(lab)
    assert sorted(st) == ["default", "pod"], st
    assert st["default"]["meta"]["config"]["redirect"]["outbound"]["excludePorts"] == "8001"
    assert stored(state_dir) == ["default", "pod"]
    assert first(lab, REMOTE_IP4, 8000) == "out"      # captured again
    assert first(lab, REMOTE_IP4, 8001) == "remote"   # with its stored exclusion
    assert agent.get("/readyz")[0] == 200


def test_a_namespace_deleted_while_watched_is_removed_from_the_maps_and_the_store(
        lab, state_dir):
    """The agent's own watcher socket must not keep a deleted namespace alive."""
    listeners(lab)
    agent = Agent(lab, state_dir).start()
    install(lab, state_dir, "--store")
    pod = pod_netns(lab)
    install(lab, state_dir, "--store", "--redirect-inbound=false", ns=pod, name="pod")
    lab.wait_for(lambda: agent.text().count("watching") == 2, "both namespaces watched")
    lab.ip(pod, "link", "del", "d0")
    subprocess.run(["ip", "netns", "del", pod], check=True)
    lab.extra_ns.remove(pod)
    lab.wait_for(lambda: "gc" in agent.events(), "the agent removing 'pod'")
    assert "removed 'pod'" in agent.text()
    assert sorted(status(lab)) == ["default"] and stored(state_dir) == ["default"]
    assert agent.metric("ebpf_tproxy_agent_gc_total") == 1
    assert first(lab, REMOTE_IP4, 8000) == "out"     # the other namespace: untouched


def test_store_follows_install_and_a_process_path_is_refused(lab, state_dir):
    listeners(lab)
    install(lab, state_dir, "--store")
    assert stored(state_dir) == ["default"]
    r = install(lab, state_dir)                       # without --store: forgotten
    assert stored(state_dir) == [] and "no longer stored" in r.stderr
    holder = lab.spawn(LS + ["listen", "x:9999"], ns=pod_netns(lab), in_cgroup=False)
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--state-dir", state_dir, "--store",
                   "--name", "bypid", "--netns", f"/proc/{holder.pid}/ns/net", netns=False)
    assert r.returncode == 2 and "names a process" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(status(lab)) == ["default"] and stored(state_dir) == []


def test_program_run_statistics_while_bpf_stats_is_enabled(lab, state_dir):
    from loader import bpfsys
    from .residue import bpftool
    listeners(lab)
    agent = Agent(lab, state_dir).start()
    install(lab, state_dir)
    assert agent.metric("ebpf_tproxy_program_runs_total", program="connect4") == 0
    fd = bpfsys.enable_stats()   # counted while this fd is open (BPF_ENABLE_STATS)
    try:
        r = lab.py("connect", REMOTE_IP4, "8000", "--count", "10")
        assert r.returncode == 0, r.stderr
        runs = agent.metric("ebpf_tproxy_program_runs_total", program="connect4")
        secs = agent.metric("ebpf_tproxy_program_run_seconds_total", program="connect4")
    finally:
        os.close(fd)
    assert runs >= 10 and secs > 0
    prog = next(p for p in bpftool("prog", "list") if p.get("name") == "connect4" and
                p.get("run_cnt") == runs)   # the same figure bpftool reads
    assert prog["run_time_ns"] / 1e9 == pytest.approx(secs)


def test_a_stored_namespace_made_after_the_agent_started_is_applied_when_it_appears(
        lab, state_dir):
    """Boot order: the agent may start before the service that makes a named namespace."""
    listeners(lab)
    pod = pod_netns(lab)
    install(lab, state_dir, "--store", "--redirect-inbound=false", ns=pod, name="pod")
    doc = json.load(open(os.path.join(state_dir, "namespaces", "pod.json")))
    lab.tproxy("uninstall", "--name", "pod")           # forgets it: store it back by hand
    late = f"tp-{lab.id}-late"
    doc["netns"] = f"/run/netns/{late}"
    with open(os.path.join(state_dir, "namespaces", "pod.json"), "w") as f:
        json.dump(doc, f)
    agent = Agent(lab, state_dir).start()
    assert "waiting" in agent.events() and sorted(status(lab)) == []
    subprocess.run(["ip", "netns", "add", late], check=True)
    lab.extra_ns.append(late)
    lab.wait_for(lambda: "pod" in status(lab), "the late namespace registered")
    assert f"/run/netns/{late} appeared" in agent.text()
    assert stored(state_dir) == ["pod"]


def test_a_failed_apply_is_tried_again_without_a_signal(lab, state_dir):
    """A stored configuration whose cgroup does not exist yet (made later at boot) fails,
    and is applied once it can be, with no file change or SIGHUP."""
    listeners(lab)
    later = os.path.join(lab.cgroup, "later")
    install(lab, state_dir, "--store")
    path = os.path.join(state_dir, "namespaces", "default.json")
    doc = json.load(open(path))
    doc["config"]["ebpf"]["cgroupPath"] = later
    with open(path, "w") as f:
        json.dump(doc, f)
    r = lab.tproxy("uninstall", "--name", "default", "--state-dir", "/nonexistent-keep")
    assert r.returncode == 0, r.stderr                  # the store (lab's) keeps it
    agent = Agent(lab, state_dir).start()
    assert "apply-failed" in agent.events() and status(lab) == {}
    lab.child_cgroups.append(later)
    os.mkdir(later)
    lab.wait_for(lambda: "default" in status(lab), "the retry applying it")
    assert "(retry)" in agent.text()
    assert status(lab)["default"]["meta"]["cgroup"] == later


def test_an_uninstall_while_an_address_change_is_applied_wins(lab, state_dir):
    """The agent's apply carries what it read; under the bpffs lock, an uninstall (or
    install) since then wins and the apply is skipped: nothing is registered again."""
    from loader import lifecycle
    from loader.agent import settings_of_meta, unchanged_since
    listeners(lab)
    install(lab, state_dir)
    meta = status(lab)["default"]["meta"]
    assert lab.tproxy("uninstall").returncode == 0
    with pytest.raises(lifecycle.Skipped, match="uninstalled meanwhile"):
        netns.run_in(f"/run/netns/{lab.app_ns}", lifecycle.install,
                     settings_of_meta("default", meta), meta["cgroup"],
                     precondition=unchanged_since("default", meta))
    assert status(lab) == {}
    assert first(lab, REMOTE_IP4, 8000) == "remote"


def test_forty_addresses_are_applied_once_not_on_every_restart(lab, state_dir):
    """The description shortens a list of over 32 local networks; the agent compares a
    digest of them, so it does not take them for changed every time it looks."""
    listeners(lab)
    agent = Agent(lab, state_dir).start()
    install(lab, state_dir)
    lab.wait_for(lambda: "watching" in agent.events(), "the agent watching 'default'")
    before = len(status(lab)["default"]["meta"]["local_networks"])
    for i in range(40):
        lab.ip(lab.app_ns, "addr", "add", f"10.98.0.{i + 1}/32", "dev", "lo")
    lab.wait_for(lambda: status(lab)["default"]["meta"]["local_networks"].get(
        "count") == before + 40 if isinstance(status(lab)["default"]["meta"][
            "local_networks"], dict) else False, "the 40 addresses applied")
    assert agent.stop() == 0
    agent = Agent(lab, state_dir).start()               # looks at them all again
    assert "watching" in agent.events()                 # (before it said ready)
    assert "addresses" not in agent.events() and "applied" not in agent.events()


def test_the_cookie_is_learned_in_an_agent_thread_without_so_netns_cookie(lab, monkeypatch):
    """Before 5.14 (no SO_NETNS_COOKIE) a child makes a socket in a cgroup of its own; from
    one of the agent's threads that child must be in the thread's namespace."""
    from loader import bpfsys, node, probe
    install(lab, lab.state_dir)
    paths = node.NodePaths(lab.bpffs)
    loaded = node.ensure_loaded(paths)
    path = f"/run/netns/{lab.app_ns}"
    try:
        real = netns.run_in(path, bpfsys.netns_cookie)
        monkeypatch.setattr(bpfsys, "netns_cookie", lambda: 0)
        got, how = netns.run_in(path, probe.learn_netns_cookie,
                                (loaded.fd("learn_netns_cookie"),
                                 paths.map("tp_learned_cookie")))
    finally:
        loaded.close()
    assert real and got == real, how
    assert "sock_create" in how


def traffic(lab):
    """A client in the app namespace connecting through the proxy to the remote service,
    over and over, until stop(traffic) says how each connection ended."""
    # Its log to a file: a line per connection into an unread pipe would stop it at 64 KiB.
    log = lab.shared_file("proxy.log", "")
    os.chmod(log, 0o666)
    lab.spawn(LS + ["proxy", "--port", "15001", "--log", log], user=DP_UID)
    lab.spawn(LS + ["listen", "remote:8000", "remote:8001"], ns=lab.remote_ns,
              in_cgroup=False)
    return lab.spawn(LS + ["loop", REMOTE_IP4, "8000"], stdin=subprocess.PIPE)


def stop(loop):
    loop.stdin.write(b"\n")
    loop.stdin.flush()
    return json.loads(loop.stdout.readline())


def redirected(lab):
    return status(lab)["default"]["counters"]["redirected_outbound"]


def excluded(lab):
    return status(lab)["default"]["counters"]["excluded_port"]


def more_traffic(lab, n=30):
    start = redirected(lab)
    lab.wait_for(lambda: redirected(lab) >= start + n, f"{n} more captured connections")


def test_sigkill_under_traffic_loses_nothing_and_a_restart_picks_up(lab, state_dir):
    loop = traffic(lab)
    agent = Agent(lab, state_dir).start()
    install(lab, state_dir, "--store")
    more_traffic(lab)
    agent.stop(signal.SIGKILL)
    more_traffic(lab)                                  # no agent: capture goes on
    assert status(lab)["default"]["problems"] == []
    agent = Agent(lab, state_dir).start()
    assert "built" not in agent.text()                 # the pinned set, no build
    assert "already loaded" in agent.text()
    lab.wait_for(lambda: "watching" in agent.events(), "the new agent watching 'default'")
    more_traffic(lab)
    result = stop(loop)
    assert set(result["results"]) == {"remote"} and result["connections"] > 90, result
    # Resynced: it follows the namespace's addresses again.
    lab.ip(lab.app_ns, "addr", "add", f"{NEW_IP}/32", "dev", "lo")
    lab.wait_for(lambda: f"{NEW_IP}/32" in status(lab)["default"]["meta"]["local_networks"],
                 "the restarted agent applying an address change")
    # ... and that was all it applied: the store and the addresses were in force already.
    assert agent.text().count(" applied: ") == 1, agent.text()


def test_sighup_applies_a_changed_stored_configuration_without_a_lost_connection(
        lab, state_dir):
    loop = traffic(lab)
    agent = Agent(lab, state_dir).start()
    install(lab, state_dir, "--store", "--exclude-outbound-ports", "8002")
    more_traffic(lab)
    assert first(lab, REMOTE_IP4, 8001) == "remote"   # through the proxy ...
    assert excluded(lab) == 0                          # ... as the counters say
    path = os.path.join(state_dir, "namespaces", "default.json")
    doc = json.load(open(path))
    doc["config"]["redirect"]["outbound"]["excludePorts"] = "8001"
    with open(path + ".new", "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    os.rename(path + ".new", path)
    # SIGHUP reads it now; the once-a-second change check (which sees any rewrite: inode,
    # size, mtime, ctime) may get there first. Either way one apply, no connection lost.
    agent.send(signal.SIGHUP)
    lab.wait_for(lambda: "applied" in agent.events(), "the agent applying the new file")
    lab.wait_for(lambda: "reload" in agent.events(), "the SIGHUP reload")
    assert agent.text().count(" applied: ") == 1, agent.text()
    assert status(lab)["default"]["meta"]["config"]["redirect"]["outbound"][
        "excludePorts"] == "8001"
    assert first(lab, REMOTE_IP4, 8001) == "remote"   # now direct:
    assert excluded(lab) == 1
    more_traffic(lab)
    result = stop(loop)
    assert set(result["results"]) == {"remote"}, result
    assert agent.metric("ebpf_tproxy_agent_reloads_total") == 1


def test_a_changed_stored_file_is_applied_without_a_signal(lab, state_dir):
    listeners(lab)
    agent = Agent(lab, state_dir).start()
    install(lab, state_dir, "--store")
    assert first(lab, REMOTE_IP4, 8001) == "out"
    path = os.path.join(state_dir, "namespaces", "default.json")
    doc = json.load(open(path))
    doc["config"]["redirect"]["outbound"]["excludePorts"] = "8001"
    with open(path + ".new", "w") as f:
        json.dump(doc, f)
    os.rename(path + ".new", path)
    lab.wait_for(lambda: "(store changed)" in agent.text(), "the change applied")
    assert first(lab, REMOTE_IP4, 8001) == "remote"
    assert "reload" not in agent.events()


def test_bad_state_files_are_one_line_each_and_the_others_apply(lab, state_dir):
    listeners(lab)
    agent = Agent(lab, state_dir, "--log-format", "json").start()
    install(lab, state_dir, "--store")
    agent.stop()
    subprocess.run(["umount", lab.bpffs], check=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", lab.bpffs], check=True)
    good = json.load(open(os.path.join(state_dir, "namespaces", "default.json")))
    bad = {"truncated": json.dumps(good)[:50],
           "types": json.dumps(dict(good, name="types", netns=["x"])),
           "version": json.dumps(dict(good, name="version", version=7))}
    for name, text in bad.items():
        with open(os.path.join(state_dir, "namespaces", f"{name}.json"), "w") as f:
            f.write(text)
    agent = Agent(lab, state_dir, "--log-format", "json").start()
    assert sorted(status(lab)) == ["default"]
    assert first(lab, REMOTE_IP4, 8000) == "out"
    errors = [json.loads(ln) for ln in agent.lines() if '"state-error"' in ln]
    assert sorted(e["msg"].split(":")[0] for e in errors) == sorted(
        f"state file {state_dir}/namespaces/{n}.json" for n in bad), errors
    lab.wait_for(lambda: agent.metric("ebpf_tproxy_agent_state_file_errors_total") == 3,
                 "the errors counted")
    assert agent.proc.poll() is None
    for ln in agent.lines():
        json.loads(ln)   # every line is JSON


def test_the_agent_keeps_the_node_set_for_the_next_install_and_removes_it_when_it_stops(
        lab, state_dir):
    from .residue import cgroup_attachments, pins
    agent = Agent(lab, state_dir).start()
    assert pins(lab.bpffs)                          # loaded before any install
    install(lab, state_dir)
    assert cgroup_attachments(lab.cgroup)
    r = lab.tproxy("uninstall")
    assert r.returncode == 0, r.stderr
    assert pins(lab.bpffs)                          # kept: the agent runs ...
    assert not cgroup_attachments(lab.cgroup)       # ... attached nowhere unused
    r = install(lab, state_dir, "--verbose")        # and the next install builds nothing
    assert "already loaded: no build needed" in r.stderr, r.stderr
    assert lab.tproxy("uninstall").returncode == 0
    r = subprocess.run(agent.lab.command([PYTHON, "-m", "loader.cli", "agent",
                                          "--ebpf-bpffs-path", lab.bpffs, "--state-dir",
                                          state_dir, "--metrics-address", ""]),
                       capture_output=True, text=True, env=lab.env(), timeout=60)
    assert r.returncode != 0 and "another agent already serves" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert agent.stop() == 0
    assert not pins(lab.bpffs)                      # clean stop, nothing registered
    assert not os.path.exists("/run/ebpf-tproxy/agent-" +
                              lab.bpffs.strip("/").replace("/", "_") + ".lock")


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="Debian's prometheus is not installed (make setup installs it)")
def test_a_real_prometheus_scrapes_the_counters(lab, state_dir):
    listeners(lab)
    agent = Agent(lab, state_dir).start()
    install(lab, state_dir)
    r = lab.py("connect", REMOTE_IP4, "8000", "--count", "25")
    assert r.returncode == 0, r.stderr
    want = status(lab)["default"]["counters"]["redirected_outbound"]
    assert want >= 25
    cfg = lab.shared_file("prometheus.yml", (
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: ebpf-tproxy\n"
        # The counters' own label "instance" (the registration's name) is also the label
        # Prometheus gives each target: honor_labels keeps ours (README says so).
        "    honor_labels: true\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{agent.port}']}}]\n"))
    data = os.path.join(lab.tmpdir, "prometheus-data")
    port = netns.run_in(f"/run/netns/{lab.remote_ns}", _free_port)   # for Prometheus
    lab.spawn(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={data}",
               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
              ns=lab.remote_ns, in_cgroup=False, ready=None)
    query = ('ebpf_tproxy_decisions_total{instance="default",reason="redirected_outbound"}')

    def scraped():
        def ask():
            url = f"http://127.0.0.1:{port}/api/v1/query?" + \
                urllib.parse.urlencode({"query": query})
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    return json.load(resp)
            except OSError:
                return None
        res = netns.run_in(f"/run/netns/{lab.remote_ns}", ask)
        vals = (res or {}).get("data", {}).get("result", [])
        return vals and float(vals[0]["value"][1]) == want
    lab.wait_for(scraped, "Prometheus returning the agent's counter", timeout=90)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_in_a_containers_cgroup_namespace_the_agent_finds_a_proxy_listening_before(
        lab, state_dir):
    """The DaemonSet: the agent in a container's private cgroup namespace (containerd's
    default on cgroup v2) with the host's PIDs. In the reboot case the proxy has listened
    on 15006 all along; only the agent can put that socket in tp_listeners, and it finds
    the socket's holder by the paths in /proc/PID/cgroup, which read relative to the
    reader's cgroup namespace."""
    listeners(lab)
    agent = Agent(lab, state_dir).start()
    install(lab, state_dir, "--store")
    assert agent.stop() == 0
    subprocess.run(["umount", lab.bpffs], check=True)          # the reboot: pins gone
    subprocess.run(["mount", "-t", "bpf", "bpf", lab.bpffs], check=True)
    _, log_path, _ = lab.start_agent(ns=lab.remote_ns, cgroup=lab.sibling_cgroup("agent"),
                                     private_cgroupns=True)
    with open(log_path) as f:
        assert "joined the host's cgroup namespace" in f.read()
    # A connection from the remote namespace to the application's address lands on the
    # proxy's inbound listener.
    r = reached(lab, APP_IP4, 8000, ns=lab.remote_ns)
    assert r["line"].startswith("in "), r
