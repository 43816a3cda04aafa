"""A config file that sets every key of Kuma's schema, loaded through a file, stdin, the
environment and flags: every key is accepted with Kuma's spelling and types, and each
layer overrides the one before it."""
import io
import json
import pwd

import yaml

from loader import config

DP = pwd.getpwuid(65534).pw_name

EVERY_KEY = {
    "kumaDPUser": DP,
    "ipFamilyMode": "dualstack",
    "redirect": {
        "inbound": {"enabled": True, "port": 16006, "includePorts": [8080, 8081],
                    "excludePorts": "22,2222", "excludePortsForIPs": ["10.0.0.0/8"],
                    "excludePortsForUIDs": [], "insertRedirectInsteadOfAppend": True},
        "outbound": {"enabled": True, "port": 16001, "includePorts": [],
                     "excludePorts": [1, 2], "excludePortsForIPs": "10.1.0.1,fd00::/8",
                     "excludePortsForUIDs": ["tcp:53:106-108"],
                     "insertRedirectInsteadOfAppend": True},
        "dns": {"enabled": True, "port": 16053, "captureAll": False,
                "skipConntrackZoneSplit": True, "resolvConfigPath": "/etc/resolv.conf"},
        "vnet": {"networks": []},
    },
    "ebpf": {"enabled": True, "instanceIP": "", "instanceIPEnvVarName": "",
             "bpffsPath": "/sys/fs/bpf", "cgroupPath": "/sys/fs/cgroup", "tcAttachIface": "eth0",
             "programsSourcePath": "/tmp/kuma-ebpf",
             "accelerate": True},   # ebpf-tproxy's own key (docs/kuma-compatibility.md)
    "retry": {"maxRetries": 5, "sleepBetweenRetries": "3s"},
    "iptablesExecutables": {"iptables": "/usr/sbin/iptables"},
    "log": {"enabled": True, "level": 6},
    "comments": {"disabled": True},
    "wait": 7,
    "waitInterval": 1,
    "dropInvalidPackets": True,
    "storeFirewalld": True,
    "cniMode": True,
    "dryRun": False,
    "verbose": True,
}


def leaves(doc, prefix=""):
    for k, v in doc.items():
        if isinstance(v, dict) and k != "iptablesExecutables":
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_the_file_names_every_key_of_the_schema():
    assert set(leaves(EVERY_KEY)) == set(config.LEAVES)


def check(s):
    assert (s.inbound_port, s.outbound_port, s.dns_port) == (16006, 16001, 16053)
    assert s.inbound_include_ports == (8080, 8081) and s.inbound_exclude_ports == (22, 2222)
    assert s.outbound_exclude_ports == (1, 2)
    assert s.outbound_exclude_ips == ("10.1.0.1/32", "fd00::/8")
    assert [r.describe() for r in s.uid_rules] == ["tcp:53:106-108"]
    assert s.dns_enabled and not s.dns_capture_all and s.verbose and s.accelerate


def test_every_key_from_a_file_yaml_and_json(tmp_path):
    for name, text in (("c.yaml", yaml.safe_dump(EVERY_KEY)), ("c.json", json.dumps(EVERY_KEY))):
        f = tmp_path / name
        f.write_text(text)
        s, notes = config.load([str(f)], environ={})
        check(s)
        # every iptables-only switch set above gets its one line
        assert len(notes) == len(config.IPTABLES_ONLY), notes


def test_every_key_from_stdin():
    s, _ = config.load(["-"], environ={}, stdin=io.StringIO(yaml.safe_dump(EVERY_KEY)))
    check(s)


def test_every_key_from_the_environment():
    env = {}
    for path in config.LEAVES:
        node = EVERY_KEY
        for part in path.split("."):
            node = node[part]
        if isinstance(node, list):
            node = ";".join(node) if path.endswith("ForUIDs") else ",".join(map(str, node))
        elif isinstance(node, bool):
            node = str(node).lower()
        elif isinstance(node, dict):
            node = json.dumps(node)
        env[config.env_name(path)] = str(node)
    s, _ = config.load([], environ=env)
    check(s)


def test_layers_override_in_kumas_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(EVERY_KEY))
    env = {"KUMA_TRANSPARENT_PROXY_REDIRECT_OUTBOUND_PORT": "17001",
           "KUMA_TRANSPARENT_PROXY_REDIRECT_DNS_PORT": "17053"}
    s, _ = config.load([str(f)], environ=env, flags={"redirect.dns.port": "18053"})
    assert (s.inbound_port, s.outbound_port, s.dns_port) == (16006, 17001, 18053)
