"""End to end with a real container runtime: podman (CNI backend, runc) runs a pod on a
network whose conflist chains ebpf-tproxy after the reference bridge + host-local; the pod's
containers are the host's root filesystem (--rootfs /:O: no image, no registry). The
sidecar is an unmodified HAProxy as Kuma's uid 5678; the application is curl and an HTTP
server. podman runs inside the lab's "node" network namespace, so its bridge and veths never
touch the host's; its storage and configuration are the lab's own directories, and its
pods' cgroups are under the lab's cgroup (--cgroup-parent), where the node set is attached.

podman passes no pod annotations and no K8S_POD_NAMESPACE (only K8S_POD_NAME: podman
issue 12083), so the entry selects every container on the network ("selector": {}) and the
node defaults apply: Kuma's Kubernetes ones, the sidecar as uid 5678."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from loader import kernel
from loader.lab import PROJECT_DIR

from .cni_driver import REFERENCE_PLUGINS
from .cni_node import SIDECAR_UID, SUBNET, Node
from .conftest import haproxy_config

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(REFERENCE_PLUGINS, "bridge")),
                                reason="make setup installs containernetworking-plugins")

NETWORK = "tp-pods"
GATEWAY = SUBNET.replace("0/24", "1")
# What podman (and libcni, runc, its image cache) create outside the directories it is
# given; removed afterwards when the test made them.
HOST_DIRS = ("/var/lib/cni", "/var/lib/containers", "/run/runc", "/dev/shm/libpod_lock")


class Podman:
    def __init__(self, lab, node):
        self.lab, self.node = lab, node
        self.dir = os.path.join(lab.tmpdir, "podman")
        conf_dir = os.path.join(self.dir, "net.d")
        os.makedirs(conf_dir)
        entry = dict(node.entry, selector={})
        with open(os.path.join(conf_dir, f"{NETWORK}.conflist"), "w") as f:
            json.dump(dict(node.conflist, plugins=[node.conflist["plugins"][0], entry]), f)
        self.conf = os.path.join(self.dir, "containers.conf")
        with open(self.conf, "w") as f:
            # These machines cap open files at 20,000 and podman's default asks runc for
            # 1,048,576 (runc: "error setting rlimit type 7: operation not permitted").
            # cgroupfs: no systemd as PID 1 here; with it, --cgroup-parent is a path.
            f.write('[containers]\ndefault_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]\n'
                    '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
                    'runtime = "runc"\n'
                    f'[network]\nnetwork_backend = "cni"\ncni_plugin_dirs = ["{node.bin_dir}"]\n'
                    f'network_config_dir = "{conf_dir}"\n')
        self.cgroup_parent = "/" + os.path.relpath(lab.cgroup, kernel.cgroup2_mount())

    def __call__(self, *args, check=True, timeout=180):
        argv = ["nsenter", f"--net=/run/netns/{self.node.ns}", "podman",
                "--root", os.path.join(self.dir, "root"),
                "--runroot", os.path.join(self.dir, "run"),
                "--tmpdir", os.path.join(self.dir, "tmp"), *args]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env=dict(self.lab.env(), CONTAINERS_CONF=self.conf))
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {r.returncode}: {r.stderr}")
        return r

    def container(self, pod, *argv, user=None, detach=False):
        """A container of the pod, from the host's root filesystem (an overlay, so nothing
        it writes reaches the host's)."""
        opts = ["--pod", pod] + (["--user", str(user)] if user else [])
        # --rootfs makes the first argument the root: every option goes before it.
        return self("run", *(["-d"] if detach else ["--rm"]), *opts, "--rootfs", "/:O", *argv)

    def cleanup(self):
        for args in (("pod", "rm", "-f", "--all"), ("rm", "-f", "--all")):
            try:
                self(*args, check=False, timeout=60)
            except subprocess.TimeoutExpired:
                pass   # whatever it left is killed below
        # The pods' cgroups are gone with the pods unless podman failed: then their
        # processes are killed here, deepest first. runc's cgroupfs manager also made the
        # parent in every cgroup v1 hierarchy of a hybrid host.
        for root in [kernel.cgroup2_mount(), *kernel.mounts("cgroup")]:
            top = os.path.join(root, self.cgroup_parent.lstrip("/"))
            for d, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                if d != self.lab.cgroup:   # the lab removes its own
                    self.lab.kill_cgroup(d)


@pytest.fixture
def podman(lab):
    for tool in ("podman", "runc"):
        assert shutil.which(tool), f"make setup installs {tool}"
    version = subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout
    if int(version.split()[-1].split(".")[0]) >= 5:
        pytest.skip(f"{version.strip()}: podman 5 removed the CNI backend (netavark only), "
                    "so no CNI plugin can be chained there; Debian 12 has podman 4")
    existed = {d: os.path.exists(d) for d in HOST_DIRS}
    node = Node(lab)
    lab.start_agent("--cni-socket", node.socket)
    p = Podman(lab, node)
    try:
        yield p
    finally:
        try:
            p.cleanup()
        finally:
            for d, was in existed.items():
                if not was and os.path.isdir(d):
                    shutil.rmtree(d, ignore_errors=True)
                elif not was and os.path.exists(d):
                    os.unlink(d)


def _registration(node, pod):
    regs = [r for r in node.registrations().values()
            if (r.get("meta") or {}).get("labels", {}).get("pod") == pod]
    assert len(regs) <= 1, regs
    return regs[0] if regs else None


def _pod_netns(podman, pod):
    infra = json.loads(podman("pod", "inspect", pod).stdout)
    infra = infra[0] if isinstance(infra, list) else infra
    c = json.loads(podman("inspect", infra["InfraContainerID"]).stdout)[0]
    key, ip = c["NetworkSettings"]["SandboxKey"], \
        c["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
    return os.path.basename(key), ip


def test_a_podman_pods_traffic_goes_through_its_sidecar(lab, podman):
    node = podman.node
    # The application's upstream: a server in the node namespace, on the bridge's address.
    lab.spawn([sys.executable, "-m", "loader.lab.servers", "http", "8080"], ns=node.ns,
              in_cgroup=False)
    lab.wait_listening(8080, ns=node.ns)
    podman("pod", "create", "--name", "app", "--network", NETWORK,
           "--cgroup-parent", podman.cgroup_parent)
    podman("pod", "start", "app")           # the infra container: CNI ADD runs here
    reg = _registration(node, "app")
    assert reg, node.registrations()
    assert reg["meta"]["labels"]["owner"] == "cni"
    assert reg["meta"]["config"]["kumaDPUser"] == str(SIDECAR_UID)
    netns, ip = _pod_netns(podman, "app")
    assert reg["meta"]["netns_inode"] == os.stat(f"/run/netns/{netns}").st_ino

    # The sidecar: outbound on 15001 to each connection's original destination; inbound
    # on 15006 passed on from 127.0.0.6, as Envoy does.
    cfg = lab.shared_file("haproxy.cfg", haproxy_config(15001, "orig 0.0.0.0:0")
                          + "frontend inbound\n    bind 0.0.0.0:15006\n"
                            "    default_backend inbound_passthrough\n"
                            "backend inbound_passthrough\n"
                            "    server app 0.0.0.0:0 source 127.0.0.6\n")
    podman.container("app", "haproxy", "-db", "-f", cfg, user=SIDECAR_UID, detach=True)
    podman.container("app", "/usr/bin/python3", os.path.join(PROJECT_DIR, "loader", "lab",
                                                             "servers.py"), "http", "8080",
                     detach=True)
    lab.wait_listening(15006, ns=netns)
    lab.wait_listening(8080, ns=netns)

    # Outbound: the application container's request reaches the upstream through the
    # sidecar, which learned the original destination.
    r = podman.container("app", "curl", "-sS", "-m", "10", f"http://{GATEWAY}:8080/")
    assert f"server={GATEWAY}:8080" in r.stdout and f"client={ip}:" in r.stdout, r.stdout
    counters = _registration(node, "app")["counters"]
    assert counters["redirected_outbound"] == 1 and counters["orig_dst_answered"] >= 1

    # Inbound: a request from the node to the pod lands on the sidecar's 15006, which
    # passes it to the application from 127.0.0.6.
    r = lab.run(["curl", "-sS", "-m", "10", f"http://{ip}:8080/"], ns=node.ns,
                in_cgroup=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("client=127.0.0.6:") and f"server={ip}:8080" in r.stdout
    assert _registration(node, "app")["counters"]["redirected_inbound"] == 1

    # The sidecar stopped: the application's next request has no way out.
    side = json.loads(podman("ps", "--format", "json", "--filter", "pod=app").stdout)
    haproxy = [c["Id"] for c in side if c.get("Command") and c["Command"][0] == "haproxy"]
    podman("stop", "-t", "0", *haproxy)
    r = podman("run", "--rm", "--pod", "app", "--rootfs", "/:O", "curl", "-sS", "-m", "10",
               f"http://{GATEWAY}:8080/", check=False)
    assert r.returncode != 0 and "server=" not in r.stdout, r.stdout
    assert _registration(node, "app")["counters"]["redirected_outbound"] == 2

    # The pod removed: DEL took its registration with it.
    podman("pod", "rm", "-f", "app")
    assert _registration(node, "app") is None
