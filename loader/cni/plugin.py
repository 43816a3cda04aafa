"""The CNI verbs of `ebpf-tproxy` (a chained plugin: it adds no interface and passes the
previous result on).

  ADD     a pod the mesh injected (selector, default kuma.io/sidecar-injected: "true"; pods
          of excluded Kubernetes namespaces never) gets its network namespace registered in
          the node program set: map writes and a link, never a compile (with no node set
          loaded the ADD fails with "try again later": the agent loads it). A bad annotation
          fails the ADD naming it, so the pod never starts uncaptured.
  DEL     removes the registration; succeeds when it, or the namespace, is already gone.
  CHECK   the registration is there, complete, of this namespace, with the configuration
          the pod's annotations give now.
  STATUS  ready when the node program set is loaded and current.
  GC      removes this network's registrations of attachments the runtime no longer has.

Each registration is named from (network, container id, interface), as CNI identifies an
attachment, and labelled with them and the pod, for GC and `ebpf-tproxy status`.

handle() runs one invocation anywhere: in the agent (loader/cni/server.py, warm) or in its
own process (main(), the `ebpf-tproxy-cni` command, where loader is importable).
"""
import hashlib
import os
import sys
import threading

from .. import config, kernel, lifecycle, netns, node, seams
from ..config import ConfigError
from ..node import InstallError, NodePaths
from . import podconfig, proto
from .proto import CNIError

PLUGIN_TYPE = "ebpf-tproxy"
ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
DEFAULT_SELECTOR = {podconfig.SIDECAR_INJECTED: "true"}
DEFAULT_SOCKET = "/run/ebpf-tproxy/cni.sock"


_sink = threading.local()   # the agent collects each request's lines (loader/cni/server.py)


def log(msg):
    line = f"ebpf-tproxy-cni: {msg}"
    lines = getattr(_sink, "lines", None)
    if lines is not None:
        lines.append(line)
    else:
        print(line, file=sys.stderr, flush=True)


def handle_collecting(environ, stdin_bytes):
    """handle(), with the log lines returned instead of written: (code, stdout, lines)."""
    _sink.lines = []
    try:
        code, out = handle(environ, stdin_bytes)
        return code, out, _sink.lines
    finally:
        _sink.lines = None


class PluginConf:
    """The plugin's entry in the conflist (validated; a bad one is CNI error 7)."""

    def __init__(self, conf):
        def get(key, kind, default):
            v = conf.get(key, default)
            if not isinstance(v, kind):
                raise CNIError(proto.INVALID_CONFIG, f"{key}: expected {kind.__name__}, got "
                               f"{type(v).__name__}")
            return v
        k8s = get("kubernetes", dict, {})
        self.bpffs_path = get("bpffs_path", str, "/sys/fs/bpf")
        self.cgroup_path = get("cgroup_path", str, "")
        self.selector = get("selector", dict, DEFAULT_SELECTOR)
        self.node_defaults = get("node_defaults", dict, {})
        self.kubeconfig = k8s.get("kubeconfig", "")
        self.exclude_namespaces = k8s.get("exclude_namespaces", [])
        self.api_attempts = get("api_attempts", int, 30)
        self.agent_socket = get("agent_socket", str, DEFAULT_SOCKET)
        try:
            for what, path in (("bpffs_path", self.bpffs_path),
                               ("cgroup_path", self.cgroup_path or "/")):
                config.parse_path(path, what)
            podconfig.check_node_defaults(self.node_defaults)
        except ConfigError as e:
            raise CNIError(proto.INVALID_CONFIG, str(e)) from None
        if not all(isinstance(x, str) for x in self.exclude_namespaces):
            raise CNIError(proto.INVALID_CONFIG, "kubernetes.exclude_namespaces: a list of "
                           "namespace names")
        self.paths = NodePaths(self.bpffs_path)


def registration_name(network, container_id, ifname):
    """CNI's attachment key as a registration name (fits config.NAME_RE)."""
    h = hashlib.sha256(f"{network}\0{container_id}\0{ifname}".encode()).hexdigest()
    return "cni-" + h[:40]


def _pod(req):
    return req.args.get("K8S_POD_NAMESPACE", ""), req.args.get("K8S_POD_NAME", "")


def _annotations(req, pc):
    """The pod's annotations and, if they came from the API server, its containers; None
    when nothing says (no capability data and no API to ask)."""
    rc = req.runtime_config
    if ANNOTATIONS_CAPABILITY in rc:
        given = rc[ANNOTATIONS_CAPABILITY]
        if given is None:   # a nil Go map: the pod has none
            return {}, None
        if not isinstance(given, dict):
            raise CNIError(proto.DECODING_FAILURE, f"runtimeConfig {ANNOTATIONS_CAPABILITY}:"
                           " expected a map of strings")
        return {str(k): str(v) for k, v in given.items()}, None
    ns, name = _pod(req)
    if pc.kubeconfig and ns and name:
        from . import apiserver
        pod = apiserver.read_pod(pc.kubeconfig, ns, name, attempts=pc.api_attempts)
        return pod.annotations, pod
    return None, None


def _settings(req, pc, name):
    """(Settings, why not) for the pod of this request: Settings None with the reason it is
    not captured."""
    ns, pod_name = _pod(req)
    if ns and ns in pc.exclude_namespaces:
        return None, f"namespace {ns} is excluded"
    annotations, pod = _annotations(req, pc)
    if annotations is None:
        if pc.selector:
            return None, ("no pod annotations (the runtime passed none and no kubeconfig is "
                          "configured)")
        # "selector": {} selects every container on this network: a runtime outside
        # Kubernetes (podman passes neither annotations nor K8S_POD_NAMESPACE, podman
        # issue 12083) gets the node defaults.
        annotations = {}
    if not podconfig.selected(annotations, pc.selector):
        return None, "not selected (" + ", ".join(f"{k}={v}" for k, v in pc.selector.items()) \
            + ")"
    if pod is not None:
        # What Kuma CNI checks when it has the pod: its injector added the sidecar, and did
        # not add kuma-init (which would install the redirect itself).
        if "kuma-init" in pod.init_containers:
            return None, "it has a kuma-init init container"
        if "kuma-sidecar" not in pod.containers:
            return None, "it has no kuma-sidecar container"
    try:
        settings, warnings = podconfig.settings_for(annotations, pc.node_defaults, name,
                                                    pc.bpffs_path, pc.cgroup_path)
    except ConfigError as e:
        raise CNIError(proto.BAD_ANNOTATION, str(e)) from None
    for w in warnings:
        log(f"{ns}/{pod_name}: {w}")
    return settings, None


def _need_current_node(paths):
    """install's precondition: an ADD never compiles (seconds, and a compiler on the pod
    path); the agent loads the node set."""
    if not node.is_current(paths):
        return (f"the node program set is not loaded on {paths.bpffs} (or is of another "
                "version): start the ebpf-tproxy agent (the DaemonSet), which loads it")
    return None


def _registered(pc, name):
    if not kernel.is_bpffs(pc.bpffs_path) or node.read_meta(pc.paths) is None:
        return None
    from ..namespace import NodeMaps
    with NodeMaps(pc.paths) as maps:
        return maps.read_meta(name)


def add(req):
    pc = PluginConf(req.conf)
    try:
        path = netns.resolve(req.netns, "CNI_NETNS")
    except ConfigError as e:
        raise CNIError(proto.INVALID_NETNS, str(e)) from None
    if proto.netns_is_own(path):
        raise CNIError(proto.INVALID_NETNS, f"CNI_NETNS {req.netns} is the plugin's own "
                       "network namespace (the host's?): refusing to capture it")
    name = registration_name(req.network, req.container_id, req.ifname)
    settings, why_not = _settings(req, pc, name)
    ns, pod_name = _pod(req)
    # podman gives K8S_POD_NAME without K8S_POD_NAMESPACE
    pod = (f"{ns}/{pod_name}" if ns else pod_name) if pod_name else ""
    who = f"pod {pod}" if pod else f"container {req.container_id[:12]}"
    if settings is None:
        log(f"ADD {who}: not captured: {why_not}")
        return req.added_result()
    try:
        cgroup = kernel.resolve_cgroup(settings.cgroup_path)
    except ConfigError as e:
        raise CNIError(proto.INVALID_CONFIG, f"cgroup_path: {e}") from None
    try:
        labels = {"owner": "cni", "network": req.network, "container_id": req.container_id,
                  "ifname": req.ifname}
        if pod:
            labels["pod"] = pod
        p = netns.run_in(path, lifecycle.install, settings, cgroup,
                         precondition=_need_current_node, labels=labels)
    except lifecycle.Skipped as e:
        raise CNIError(proto.TRY_AGAIN_LATER, str(e)) from None
    except ConfigError as e:
        raise CNIError(proto.BAD_ANNOTATION, str(e)) from None
    except (kernel.HostError, InstallError, seams.SeamFailure, OSError) as e:
        raise CNIError(proto.INSTALL_REFUSED, f"registering {who}: {e}") from None
    log(f"ADD {who}: captured as {name} (network namespace cookie {p['netns_cookie']})")
    return req.added_result()


def delete(req):
    pc = PluginConf(req.conf)
    name = registration_name(req.network, req.container_id, req.ifname)
    try:
        if _registered(pc, name) is None:
            return None   # never registered, or already removed: DEL is idempotent
        lifecycle.uninstall(pc.bpffs_path, name=name)
    except (InstallError, OSError) as e:
        raise CNIError(proto.TRY_AGAIN_LATER, f"removing {name}: {e}") from None
    log(f"DEL {name}: removed")
    return None


def check(req):
    pc = PluginConf(req.conf)
    name = registration_name(req.network, req.container_id, req.ifname)
    settings, why_not = _settings(req, pc, name)
    meta = _registered(pc, name)
    if settings is None:
        if meta is not None:
            raise _mismatch(f"{name} is registered, but the pod is not captured now "
                               f"({why_not})")
        return None
    if meta is None or not meta.get("complete"):
        raise _mismatch(f"the pod's network namespace is not registered ({name} "
                           f"{'is incomplete' if meta else 'is missing'}): delete the pod")
    try:
        inode = netns.inode_of(netns.resolve(req.netns, "CNI_NETNS"))
    except (ConfigError, OSError) as e:
        raise CNIError(proto.INVALID_NETNS, str(e)) from None
    if meta.get("netns_inode") != inode:
        raise _mismatch(f"{name} belongs to another network namespace (inode "
                           f"{meta.get('netns_inode')}, not {inode})")
    if meta.get("config_digest") != config.digest_of(settings):
        raise _mismatch(f"{name}'s configuration differs from what the pod's annotations "
                           "give now (they changed after ADD?): delete the pod")
    return None


def _mismatch(msg):
    return CNIError(proto.CHECK_MISMATCH, msg)


def status(req):
    pc = PluginConf(req.conf)
    why = _need_current_node(pc.paths) if kernel.is_bpffs(pc.bpffs_path) else \
        f"{pc.bpffs_path} is not a bpffs mount: the ebpf-tproxy agent mounts it"
    if why:
        raise CNIError(proto.NOT_AVAILABLE, why)
    return None


def gc(req):
    pc = PluginConf(req.conf)
    valid = req.conf.get("cni.dev/valid-attachments")
    if valid is None:   # libcni 1.2 sent this key (containernetworking/cni#1101)
        valid = req.conf.get("cni.dev/attachments") or []
    keep = {(a.get("containerID"), a.get("ifname")) for a in valid if isinstance(a, dict)}
    if not kernel.is_bpffs(pc.bpffs_path) or node.read_meta(pc.paths) is None:
        return None
    from ..namespace import NodeMaps
    with NodeMaps(pc.paths) as maps:
        regs = maps.registrations()
    for name, meta in sorted(regs.items()):
        labels = meta.get("labels") or {}
        if labels.get("owner") != "cni" or labels.get("network") != req.network:
            continue
        if (labels.get("container_id"), labels.get("ifname")) in keep:
            continue
        try:
            lifecycle.uninstall(pc.bpffs_path, name=name)
            log(f"GC {name} ({labels.get('pod') or labels.get('container_id')}): removed")
        except (InstallError, OSError) as e:
            raise CNIError(proto.TRY_AGAIN_LATER, f"GC of {name}: {e}") from None
    return None


HANDLERS = {"ADD": add, "DEL": delete, "CHECK": check, "STATUS": status, "GC": gc}


def handle(environ, stdin_bytes):
    """One invocation: (exit code, stdout bytes)."""
    try:
        return proto.serve(environ, stdin_bytes, HANDLERS)
    except Exception as e:   # a bug must still answer in the protocol, not with a traceback
        import traceback
        traceback.print_exc(file=sys.stderr)
        return 1, proto.dump(CNIError(proto.INTERNAL, f"internal error: {e}").result(
            proto.LATEST))


def main():
    """`ebpf-tproxy-cni`: the plugin in this process (where the package is installed; a
    node's runtime runs the shim, which asks the agent)."""
    code, out = handle(os.environ, sys.stdin.buffer.read(proto.MAX_STDIN + 1))
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
