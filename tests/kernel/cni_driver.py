"""A CNI runtime for the tests, behaving as libcni (containernetworking/cni libcni/api.go)
does when containerd or CRI-O run a conflist:

  - each plugin gets its entry plus the network's name and cniVersion, the previous
    plugin's result as prevResult (ADD; DEL and CHECK get the cached result of the ADD),
    and runtimeConfig with the capability arguments its entry declares (only those);
  - ADD runs the plugins in order, DEL in reverse order; a failed ADD is followed by DEL,
    as a runtime does;
  - CNI_* variables per the spec; CNI_ARGS as containerd sets them for a pod;
  - GC sends both keys libcni has used for the valid attachments.
Plugins run in the test's "node" network namespace (nsenter --net: the mounts stay, so the
bpffs and cgroup2 mounts are seen), never in the host's.
"""
import json
import os
import subprocess
import time

# containernetworking-plugins: Debian's path, else Fedora's.
REFERENCE_PLUGINS = next((d for d in ("/usr/lib/cni", "/usr/libexec/cni")
                          if os.path.exists(os.path.join(d, "bridge"))), "/usr/lib/cni")


class CNIFailure(Exception):
    def __init__(self, plugin, code, msg, stdout, stderr):
        super().__init__(f"{plugin}: code {code}: {msg}")
        self.plugin, self.code, self.msg, self.stdout, self.stderr = \
            plugin, code, msg, stdout, stderr


class Runtime:
    def __init__(self, node_ns, bin_dir, conflist, env=None):
        self.node_ns, self.bin_dir, self.conflist = node_ns, bin_dir, conflist
        self.env = dict(env or os.environ)
        self.cache = {}       # (container id, ifname) -> the ADD's final result
        self.timings = []     # (plugin type, verb, seconds)

    def _conf(self, plugin, prev, capability_args):
        conf = dict(plugin)
        conf["name"] = self.conflist["name"]
        conf["cniVersion"] = self.conflist["cniVersion"]
        caps = plugin.get("capabilities") or {}
        rc = {k: v for k, v in capability_args.items() if caps.get(k)}
        if rc:
            conf["runtimeConfig"] = rc
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def exec_plugin(self, plugin, command, conf, container_id="", netns="", ifname="",
                    args=""):
        env = dict(self.env, CNI_COMMAND=command, CNI_PATH=self.bin_dir)
        for k, v in (("CNI_CONTAINERID", container_id), ("CNI_NETNS", netns),
                     ("CNI_IFNAME", ifname), ("CNI_ARGS", args)):
            if v:
                env[k] = v
        exe = os.path.join(self.bin_dir, plugin["type"])
        start = time.monotonic()
        r = subprocess.run(["nsenter", f"--net=/run/netns/{self.node_ns}", exe],
                           input=json.dumps(conf).encode(), capture_output=True, env=env,
                           timeout=120)
        self.timings.append((plugin["type"], command, time.monotonic() - start))
        out = r.stdout.decode()
        if r.returncode != 0:
            try:
                err = json.loads(out)
            except ValueError:
                err = {"code": None, "msg": out or r.stderr.decode()}
            raise CNIFailure(plugin["type"], err.get("code"), err.get("msg"), out,
                             r.stderr.decode())
        return json.loads(out) if out.strip() else None

    @staticmethod
    def pod_args(pod_ns, pod_name, container_id):
        # containerd's CNI_ARGS for a pod sandbox (internal/cri/server/sandbox_run.go).
        return (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod_ns};K8S_POD_NAME={pod_name};"
                f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=uid-{container_id}")

    def add(self, container_id, netns, ifname="eth0", args="", capability_args=None):
        """The chain's ADD; on a failure, DEL (as the runtime does) and re-raise."""
        prev = None
        try:
            for plugin in self.conflist["plugins"]:
                prev = self.exec_plugin(plugin, "ADD",
                                        self._conf(plugin, prev, capability_args or {}),
                                        container_id, netns, ifname, args)
        except CNIFailure:
            self.delete(container_id, netns, ifname, args, capability_args)
            raise
        self.cache[(container_id, ifname)] = prev
        return prev

    def delete(self, container_id, netns, ifname="eth0", args="", capability_args=None):
        prev = self.cache.pop((container_id, ifname), None)
        for plugin in reversed(self.conflist["plugins"]):
            self.exec_plugin(plugin, "DEL", self._conf(plugin, prev, capability_args or {}),
                             container_id, netns, ifname, args)

    def check(self, container_id, netns, ifname="eth0", args="", capability_args=None):
        prev = self.cache[(container_id, ifname)]
        for plugin in self.conflist["plugins"]:
            self.exec_plugin(plugin, "CHECK", self._conf(plugin, prev, capability_args or {}),
                             container_id, netns, ifname, args)

    def gc(self, plugin, attachments):
        conf = self._conf(plugin, None, {})
        valid = [{"containerID": c, "ifname": i} for c, i in attachments]
        conf["cni.dev/valid-attachments"] = valid
        conf["cni.dev/attachments"] = valid
        return self.exec_plugin(plugin, "GC", conf)

    def status(self, plugin):
        return self.exec_plugin(plugin, "STATUS", self._conf(plugin, None, {}))
