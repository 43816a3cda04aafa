"""A pod's transparent-proxy configuration, as Kuma CNI derives it.

Precedence (Kuma's pkg/transparentproxy/kubernetes/kubernetes_config.go):
  1. `traffic.kuma.io/transparent-proxy-config`: Kuma's whole config document (YAML/JSON),
     written by Kuma's injector; when present it is the configuration, over Kuma's defaults;
  2. otherwise the individual annotations (the injector writes them too; the legacy Kuma CNI
     read these), over the node's defaults (the control plane's
     KUMA_RUNTIME_KUBERNETES_* variables, given to the plugin in its conflist entry by
     `ebpf-tproxy cni install`), over Kuma's Kubernetes defaults.
The node owns where the programs live: bpffs and cgroup come from the plugin's
configuration whatever a pod says.

A value that does not parse is a ConfigError naming the annotation (or variable): the CNI
ADD fails with it, so the pod never starts uncaptured.
"""
from .. import config
from ..config import ConfigError

CONFIG_ANNOTATION = "traffic.kuma.io/transparent-proxy-config"
SIDECAR_INJECTED = "kuma.io/sidecar-injected"

# Annotation -> Kuma config key (values in Kuma's own formats: comma lists of ports, port
# ranges, IPs or CIDRs; `;` between uid rules).
ANNOTATIONS = {
    "traffic.kuma.io/exclude-inbound-ports": "redirect.inbound.excludePorts",
    "traffic.kuma.io/exclude-outbound-ports": "redirect.outbound.excludePorts",
    "traffic.kuma.io/exclude-inbound-ips": "redirect.inbound.excludePortsForIPs",
    "traffic.kuma.io/exclude-outbound-ips": "redirect.outbound.excludePortsForIPs",
    "traffic.kuma.io/exclude-outbound-ports-for-uids": "redirect.outbound.excludePortsForUIDs",
    "kuma.io/sidecar-uid": "kumaDPUser",
    "kuma.io/transparent-proxying-inbound-port": "redirect.inbound.port",
    "kuma.io/transparent-proxying-outbound-port": "redirect.outbound.port",
    "kuma.io/transparent-proxying-ip-family-mode": "ipFamilyMode",
    "kuma.io/builtin-dns-port": "redirect.dns.port",
}
GATEWAY = "kuma.io/gateway"                     # a gateway: no inbound redirect
BUILTIN_DNS = "kuma.io/builtin-dns"             # DNS capture (all UDP/TCP 53, as Kuma)
PROBE_PORT = "kuma.io/application-probe-proxy-port"   # kept out of inbound capture

# The control plane's variables (pkg/config/plugins/runtime/k8s/config.go) -> the same keys.
ENV = "KUMA_RUNTIME_KUBERNETES_"
NODE_DEFAULTS = {
    ENV + "SIDECAR_TRAFFIC_EXCLUDE_INBOUND_PORTS": "redirect.inbound.excludePorts",
    ENV + "SIDECAR_TRAFFIC_EXCLUDE_OUTBOUND_PORTS": "redirect.outbound.excludePorts",
    ENV + "SIDECAR_TRAFFIC_EXCLUDE_INBOUND_IPS": "redirect.inbound.excludePortsForIPs",
    ENV + "SIDECAR_TRAFFIC_EXCLUDE_OUTBOUND_IPS": "redirect.outbound.excludePortsForIPs",
    ENV + "INJECTOR_SIDECAR_CONTAINER_UID": "kumaDPUser",
    ENV + "INJECTOR_SIDECAR_CONTAINER_REDIRECT_PORT_INBOUND": "redirect.inbound.port",
    ENV + "INJECTOR_SIDECAR_CONTAINER_REDIRECT_PORT_OUTBOUND": "redirect.outbound.port",
    ENV + "INJECTOR_SIDECAR_CONTAINER_IP_FAMILY_MODE": "ipFamilyMode",
    ENV + "INJECTOR_BUILTIN_DNS_PORT": "redirect.dns.port",
}
NODE_BUILTIN_DNS = ENV + "INJECTOR_BUILTIN_DNS_ENABLED"
NODE_PROBE_PORT = ENV + "APPLICATION_PROBE_PROXY_PORT"
KNOWN_NODE_DEFAULTS = set(NODE_DEFAULTS) | {NODE_BUILTIN_DNS, NODE_PROBE_PORT}

# Kuma's Kubernetes defaults (the control plane's, not kumactl's: no port excluded, built-in
# DNS on, the probe proxy on 9001, the sidecar as uid 5678).
K8S_DEFAULTS = {
    "kumaDPUser": "5678",
    "redirect.inbound.excludePorts": [],
}
DEFAULT_BUILTIN_DNS = True
DEFAULT_PROBE_PORT = 9001


def kuma_bool(value, what):
    """Kuma's annotation booleans: enabled|disabled|true|false|yes|no."""
    s = str(value).strip().lower()
    if s in ("enabled", "true", "yes"):
        return True
    if s in ("disabled", "false", "no"):
        return False
    raise ConfigError(f"{what}: {value!r} is not a boolean; use enabled or disabled")


def selected(annotations, selector):
    """Kuma CNI captures only pods its injector prepared: every selector key with exactly
    its value (default kuma.io/sidecar-injected: "true")."""
    return all(annotations.get(k) == v for k, v in selector.items())


def check_node_defaults(node_defaults):
    unknown = sorted(set(node_defaults) - KNOWN_NODE_DEFAULTS)
    if unknown:
        raise ConfigError(f"node_defaults: unknown variable {unknown[0]}; the plugin reads "
                          f"{', '.join(sorted(KNOWN_NODE_DEFAULTS))}")


def settings_for(annotations, node_defaults, name, bpffs_path, cgroup_path):
    """(Settings, warnings) for one pod. annotations: the pod's (a dict of strings);
    node_defaults: {KUMA_RUNTIME_KUBERNETES_*: value} from the plugin's configuration."""
    owned = {"ebpf.bpffsPath": bpffs_path}
    if cgroup_path:   # else the default: the cgroup2 mount's root
        owned["ebpf.cgroupPath"] = cgroup_path
    node_owned = ("plugin configuration", owned)
    warnings = []
    doc = annotations.get(CONFIG_ANNOTATION)
    if doc is not None:
        where = f"annotation {CONFIG_ANNOTATION}"
        vals, unknown = config.parse_document(str(doc), where)
        # Kuma ignores keys it does not know; so do we, saying which.
        warnings += [f"{where}: unknown key {k!r} ignored" for k in unknown]
        layers = [("Kuma's Kubernetes defaults", dict(K8S_DEFAULTS)), (where, vals), node_owned]
    else:
        layers = _individual([("Kuma's Kubernetes defaults", dict(K8S_DEFAULTS))],
                             annotations, node_defaults)
        layers.append(node_owned)
    values = config.merge(config.Layers(files=layers))
    return config.settings_from(values, name=name, environ={}, pod_uid=True), warnings


def _individual(layers, annotations, node_defaults):
    """layers plus those of the individual settings: node defaults, then annotations.
    Built-in DNS and the probe port are settled across both before they become keys."""
    for var, path in NODE_DEFAULTS.items():
        if var in node_defaults:
            if path == "kumaDPUser" and config.parse_uint(str(node_defaults[var])) is None:
                raise ConfigError(f"{var}: {node_defaults[var]!r} is not a uid")
            layers.append((f"node default {var}", {path: node_defaults[var]}))
    for key, path in ANNOTATIONS.items():
        if key in annotations:
            value = annotations[key]
            if path == "kumaDPUser" and config.parse_uint(str(value).strip()) is None:
                # The user exists in the pod's image, not in the node's user database.
                raise ConfigError(f"annotation {key}: {value!r} is not a uid; give the "
                                  "sidecar's uid (Kuma's default is 5678)")
            if path == "redirect.outbound.excludePortsForUIDs":
                value = [v for v in str(value).split(";") if v.strip()]
            layers.append((f"annotation {key}", {path: value}))
    dns = DEFAULT_BUILTIN_DNS
    if NODE_BUILTIN_DNS in node_defaults:
        dns = kuma_bool(node_defaults[NODE_BUILTIN_DNS], NODE_BUILTIN_DNS)
    if BUILTIN_DNS in annotations:
        dns = kuma_bool(annotations[BUILTIN_DNS], f"annotation {BUILTIN_DNS}")
    # Kuma's built-in DNS captures every DNS query of the pod (its injector sets captureAll).
    layers.append(("built-in DNS", {"redirect.dns.enabled": dns,
                                    "redirect.dns.captureAll": dns}))
    gateway = False
    if GATEWAY in annotations:
        gateway = kuma_bool(annotations[GATEWAY], f"annotation {GATEWAY}")
    probe = DEFAULT_PROBE_PORT
    if NODE_PROBE_PORT in node_defaults:
        probe = _port_or_zero(node_defaults[NODE_PROBE_PORT], NODE_PROBE_PORT)
    if PROBE_PORT in annotations:
        probe = _port_or_zero(annotations[PROBE_PORT], f"annotation {PROBE_PORT}")
        if gateway and probe:
            raise ConfigError(f"annotation {PROBE_PORT}: a gateway (annotation {GATEWAY}) "
                              "has no application probe proxy; remove one of them")
    if gateway:
        layers.append((f"annotation {GATEWAY}", {"redirect.inbound.enabled": False}))
    elif probe:
        # The kubelet's probes reach the probe proxy directly: Kuma keeps its port out of
        # inbound capture, whatever else is excluded.
        excluded = config.merge(config.Layers(files=layers))["redirect.inbound.excludePorts"]
        layers.append((f"application probe proxy port {probe}",
                       {"redirect.inbound.excludePorts": sorted(set(excluded) | {probe})}))
    return layers


def _port_or_zero(value, what):
    s = str(value).strip()
    return 0 if s == "0" else config.parse_port(s, what)
