"""The CNI protocol and a pod's configuration, without root: what a runtime gets for each
environment and stdin (pkg/skel's rules), and how annotations, node defaults and Kuma's
defaults layer (Kuma's kubernetes_config.go)."""
import json

import pytest

from loader.cni import plugin, podconfig, proto, shim
from loader.config import ConfigError

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}


def serve(env, conf):
    code, out = proto.serve(env, json.dumps(conf).encode() if conf is not None else b"",
                            {"ADD": lambda r: r.added_result(), "DEL": lambda r: None,
                             "CHECK": lambda r: None, "GC": lambda r: None,
                             "STATUS": lambda r: None})
    return code, json.loads(out) if out.strip() else None


def test_the_shim_answers_version_with_the_same_list():
    assert shim.SUPPORTED_VERSIONS == proto.SUPPORTED_VERSIONS


def test_version_echoes_a_supported_version_and_lists_them():
    code, out = serve({"CNI_COMMAND": "VERSION"}, {"cniVersion": "0.4.0"})
    assert code == 0 and out == {"cniVersion": "0.4.0",
                                 "supportedVersions": proto.SUPPORTED_VERSIONS}


@pytest.mark.parametrize("drop", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"])
def test_add_without_a_required_variable_is_error_4(drop):
    env = {k: v for k, v in ENV.items() if k != drop}
    code, out = serve(env, {"cniVersion": "1.0.0", "name": "n", "type": "ebpf-tproxy"})
    assert code == 1 and out["code"] == 4 and drop in out["msg"]


def test_del_needs_no_netns():
    env = {k: v for k, v in ENV.items() if k != "CNI_NETNS"}
    env["CNI_COMMAND"] = "DEL"
    assert serve(env, {"cniVersion": "1.0.0", "name": "n"}) == (0, None)


def test_add_passes_prev_result_on_in_the_request_version():
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
            "ips": [{"address": "198.19.0.2/24", "interface": 0}]}
    code, out = serve(ENV, {"cniVersion": "1.0.0", "name": "n", "prevResult": prev})
    assert code == 0 and out == prev


@pytest.mark.parametrize("verb,version", [("CHECK", "0.3.1"), ("GC", "1.0.0"),
                                          ("STATUS", "1.0.0")])
def test_verbs_newer_than_the_configuration_are_error_1(verb, version):
    code, out = serve(dict(ENV, CNI_COMMAND=verb), {"cniVersion": version, "name": "n"})
    assert code == 1 and out["code"] == 1 and out["cniVersion"] == version


def test_bad_input_gets_the_spec_codes():
    assert serve(ENV, {"cniVersion": "1.0.0"})[1]["code"] == 7            # no name
    assert serve(ENV, {"cniVersion": "9.9.9", "name": "n"})[1]["code"] == 1
    code, out = proto.serve(ENV, b"{not json", {})
    assert code == 1 and json.loads(out)["code"] == 6
    code, out = serve(dict(ENV, CNI_ARGS="K8S_POD_NAME"), {"cniVersion": "1.0.0", "name": "n"})
    assert out["code"] == 4 and "KEY=VALUE" in out["msg"]


def test_cni_args_split_on_the_first_equals_sign():
    assert proto.parse_args("IgnoreUnknown=1;K8S_POD_NAME=a=b;K8S_POD_NAMESPACE=") == \
        {"IgnoreUnknown": "1", "K8S_POD_NAME": "a=b", "K8S_POD_NAMESPACE": ""}


# -------------------------------------------------------------------- pod configuration

def settings(annotations, node=None):
    return podconfig.settings_for(annotations, node or {}, "cni-x", "/sys/fs/bpf", "")[0]


def test_kuma_kubernetes_defaults():
    s = settings({})
    assert (s.dp_uid, s.outbound_port, s.inbound_port, s.dns_port) == (5678, 15001, 15006, 15053)
    assert s.inbound_exclude_ports == (9001,)            # the probe proxy port only
    assert s.dns_enabled and s.dns_capture_all and s.ipv6


def test_annotation_over_node_default_over_kuma_default():
    node = {"KUMA_RUNTIME_KUBERNETES_SIDECAR_TRAFFIC_EXCLUDE_OUTBOUND_PORTS": "22,443",
            "KUMA_RUNTIME_KUBERNETES_INJECTOR_SIDECAR_CONTAINER_UID": "1000",
            "KUMA_RUNTIME_KUBERNETES_APPLICATION_PROBE_PROXY_PORT": "0"}
    s = settings({}, node)
    assert s.outbound_exclude_ports == (22, 443) and s.dp_uid == 1000
    assert s.inbound_exclude_ports == ()
    s = settings({"traffic.kuma.io/exclude-outbound-ports": "8080",
                  "kuma.io/application-probe-proxy-port": "9009"}, node)
    assert s.outbound_exclude_ports == (8080,) and s.dp_uid == 1000
    assert s.inbound_exclude_ports == (9009,)


def test_the_config_annotation_is_the_whole_configuration():
    doc = "kumaDPUser: '1234'\nredirect:\n  outbound:\n    excludePorts: [443]\n"
    s = settings({podconfig.CONFIG_ANNOTATION: doc,
                  "traffic.kuma.io/exclude-outbound-ports": "80"})
    assert s.dp_uid == 1234 and s.outbound_exclude_ports == (443,)


@pytest.mark.parametrize("value,expected", [("enabled", True), ("yes", True), ("true", True),
                                            ("disabled", False), ("no", False)])
def test_kuma_booleans(value, expected):
    assert settings({"kuma.io/builtin-dns": value}).dns_capture_all is expected


@pytest.mark.parametrize("annotations,named", [
    ({"kuma.io/builtin-dns": "sometimes"}, "kuma.io/builtin-dns"),
    ({"kuma.io/sidecar-uid": "kuma-dp"}, "kuma.io/sidecar-uid"),
    ({"kuma.io/gateway": "enabled", "kuma.io/application-probe-proxy-port": "9001"},
     "kuma.io/application-probe-proxy-port"),
    ({"kuma.io/transparent-proxying-ip-family-mode": "ipv5"},
     "kuma.io/transparent-proxying-ip-family-mode"),
])
def test_a_bad_value_names_its_annotation(annotations, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        settings(annotations)


def test_node_defaults_must_be_known_variables():
    with pytest.raises(ConfigError, match="KUMA_RUNTIME_KUBERNETES_TYPO"):
        podconfig.check_node_defaults({"KUMA_RUNTIME_KUBERNETES_TYPO": "1"})


def test_selection_needs_every_selector_value_exactly():
    sel = {"kuma.io/sidecar-injected": "true"}
    assert podconfig.selected({"kuma.io/sidecar-injected": "true"}, sel)
    assert not podconfig.selected({"kuma.io/sidecar-injected": "True"}, sel)
    assert not podconfig.selected({}, sel)


def _podman_request(selector):
    """What podman sends: K8S_POD_NAME only, no annotations in runtimeConfig."""
    entry = {"cniVersion": "1.0.0", "name": "n", "type": "ebpf-tproxy"}
    if selector is not None:
        entry["selector"] = selector
    return proto.Request(
        {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0",
         "CNI_PATH": "/x", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web"},
        json.dumps(entry).encode())


def test_without_annotations_only_an_empty_selector_captures_with_the_node_defaults():
    req = _podman_request(None)
    settings, why_not = plugin._settings(req, plugin.PluginConf(req.conf), "cni-x")
    assert settings is None and "no pod annotations" in why_not
    req = _podman_request({})
    settings, why_not = plugin._settings(req, plugin.PluginConf(req.conf), "cni-x")
    assert why_not is None and settings.dp_uid == 5678   # Kuma's Kubernetes default
