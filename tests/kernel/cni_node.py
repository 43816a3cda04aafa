"""The lab's Kubernetes node for the CNI tests: a "node" network namespace, a CNI bin dir
with Debian's reference plugins and ours, a conflist chaining ebpf-tproxy after bridge +
host-local; the agent that answers the plugin is started by the test."""
import json
import os
import shutil
import uuid

from loader.cni import plugin as cni_plugin, shim
from loader.lab import PYTHON

from .cni_driver import REFERENCE_PLUGINS, Runtime
from .conftest import own

SIDECAR_UID = 5678
INJECTED = {"kuma.io/sidecar-injected": "true"}
SUBNET = "198.19.0.0/24"   # benchmarking range: lab pods only
ANNOTATIONS_CAP = "io.kubernetes.cri.pod-annotations"


class Pod:
    def __init__(self, ns, container_id, ip, name):
        self.ns, self.container_id, self.ip, self.name = ns, container_id, ip, name
        self.netns = f"/run/netns/{ns}"


class Node:
    """A node of the lab: its network namespace, a CNI bin dir and conflist, the agent."""

    def __init__(self, lab, via="shim"):
        """via: "shim", the executable cni install puts in a node's CNI bin dir (it asks the
        agent), or "direct", the plugin in its own process (ebpf-tproxy-cni)."""
        self.lab = lab
        self.ns = lab.add_netns()
        lab.shared_file("cni-node", self.ns)   # makes the lab's own directory
        root = lab.tmpdir
        self.bin_dir = os.path.join(root, "cni-bin")
        os.makedirs(self.bin_dir, exist_ok=True)
        for p in ("bridge", "host-local", "loopback"):
            os.symlink(os.path.join(REFERENCE_PLUGINS, p), os.path.join(self.bin_dir, p))
        exe = os.path.join(self.bin_dir, cni_plugin.PLUGIN_TYPE)
        if via == "shim":
            shutil.copy(shim.__file__, exe)
        else:
            with open(exe, "w") as f:
                f.write(f"#!/bin/sh\nexec {PYTHON} -m loader.cni.plugin\n")
        os.chmod(exe, 0o755)
        self.socket = os.path.join(root, "cni.sock")
        self.entry = {"type": cni_plugin.PLUGIN_TYPE,
                      "capabilities": {ANNOTATIONS_CAP: True, "dns": True},
                      "bpffs_path": lab.bpffs, "cgroup_path": lab.cgroup,
                      "agent_socket": self.socket,
                      "kubernetes": {"exclude_namespaces": ["kube-system"]}}
        self.conflist = {
            "cniVersion": "1.0.0", "name": "tp-pods",
            "plugins": [
                {"type": "bridge", "bridge": "tpbr" + lab.id[-6:], "isGateway": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                          "dataDir": os.path.join(root, "host-local")}},
                self.entry]}
        self.runtime = Runtime(self.ns, self.bin_dir, self.conflist, env=lab.env())
        self.pods = []

    def add(self, annotations, pod_ns="default", name=None):
        ns = self.lab.add_netns()
        cid = uuid.uuid4().hex
        name = name or f"pod-{len(self.pods)}"
        result = self.runtime.add(cid, f"/run/netns/{ns}",
                                  args=Runtime.pod_args(pod_ns, name, cid),
                                  capability_args={ANNOTATIONS_CAP: annotations})
        ip = result["ips"][0]["address"].split("/")[0]
        pod = Pod(ns, cid, ip, name)
        pod.args, pod.annotations = Runtime.pod_args(pod_ns, name, cid), annotations
        self.pods.append(pod)
        return pod

    def delete(self, pod):
        self.runtime.delete(pod.container_id, pod.netns, args=pod.args,
                            capability_args={ANNOTATIONS_CAP: pod.annotations})

    def registrations(self):
        st = json.loads(self.lab.tproxy("status", "--output", "json").stdout or "[]")
        return {s["name"]: s for s in own(st)}   # not make test-neighbours' neighbours

    def registration(self, pod):
        return self.registrations().get(
            cni_plugin.registration_name("tp-pods", pod.container_id, "eth0"))
