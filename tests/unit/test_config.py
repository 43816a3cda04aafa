"""Configuration parsing and precedence (defaults < files < env < flags). No root needed."""
import io
import json
import pwd

import pytest

from loader import abi, config
from loader.config import ConfigError

DP = pwd.getpwuid(65534).pw_name  # "nobody": exists on every Debian/Ubuntu host


def load(files=(), env=None, flags=None, stdin=None, name="default"):
    flags = dict(flags or {})
    flags.setdefault("kumaDPUser", DP)
    return config.load(files, environ=env or {}, flags=flags, stdin=stdin, name=name)[0]


def test_defaults_are_kumas():
    s = load()
    assert (s.outbound_port, s.inbound_port, s.ipv6, s.outbound_enabled) == (15001, 15006, True,
                                                                             True)
    assert s.bpffs_path == "/sys/fs/bpf" and s.dp_uid == 65534
    assert s.outbound_exclude_ports == () and s.uid_rules == ()


@pytest.mark.parametrize("text, protos, ports, uids", [
    ("53,3000-5000:106-108", 3, ((53, 53), (3000, 5000)), (106, 108)),
    ("tcp:22:1000", abi.TP_PROTO_TCP, ((22, 22),), (1000, 1000)),
    ("udp:*:0-10", abi.TP_PROTO_UDP, ((1, 65535),), (0, 10)),
    ("1000", 3, ((1, 65535),), (1000, 1000)),
    ("tcp,udp:80:5", 3, ((80, 80),), (5, 5)),
])
def test_uid_rule_forms(text, protos, ports, uids):
    r = config.parse_uid_rule(text)
    assert (r.protos, r.ports, (r.uid_lo, r.uid_hi)) == (protos, ports, uids)


@pytest.mark.parametrize("text", ["tcp:1:2:3", "sctp:80:1", "80:abc", "5-1", "80-70:1",
                                  "70000:1"])
def test_uid_rule_errors(text):
    with pytest.raises(ConfigError, match="--exclude-outbound-ports-for-uids"):
        config.parse_uid_rule(text)


@pytest.mark.parametrize("flags, needle", [
    ({"redirect.outbound.port": "0"}, "0 is not a valid port"),
    ({"redirect.outbound.port": "70000"}, "70000 is not a valid port"),
    ({"redirect.outbound.port": "http"}, "not a port number"),
    ({"redirect.outbound.excludePorts": "22,abc"}, "not a port number"),
    ({"redirect.outbound.excludePortsForIPs": ["10.0.0.0/33"]}, "not an IP address or CIDR"),
    ({"ipFamilyMode": "ipv7"}, "unknown ip family mode"),
    ({"kumaDPUser": "no-such-user-xyz"}, "no user 'no-such-user-xyz'"),
    ({"ebpf.instanceIP": "1.2.3"}, "not an IP address"),
    ({"redirect.outbound.port": "15006"}, "both 15006"),
    ({"redirect.vnet.networks": ["docker0:172.17.0.0/16"]}, "--vnet"),
    ({"redirect.dns.port": "15001"}, "both 15001"),
    ({"ebpf.enabled": "false"}, "only does the eBPF mode"),
])
def test_bad_values_give_one_clear_line(flags, needle):
    with pytest.raises(ConfigError) as e:
        load(flags=flags)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_bad_instance_name():
    with pytest.raises(ConfigError, match="--name"):
        load(name="../etc")


def test_precedence_defaults_files_env_flags(tmp_path):
    f1 = tmp_path / "a.yaml"
    f1.write_text("redirect:\n  outbound:\n    port: 16001\n    excludePorts: [1, 2]\n"
                  "ipFamilyMode: ipv4\n")
    f2 = tmp_path / "b.json"
    f2.write_text(json.dumps({"redirect": {"outbound": {"port": 17001}}}))
    # files in order: the later file wins
    s = load([str(f1), str(f2)])
    assert s.outbound_port == 17001 and s.outbound_exclude_ports == (1, 2) and not s.ipv6
    # env beats files
    env = {"KUMA_TRANSPARENT_PROXY_REDIRECT_OUTBOUND_PORT": "18001",
           "KUMA_TRANSPARENT_PROXY_REDIRECT_OUTBOUND_EXCLUDE_PORTS": "3,4"}
    s = load([f"{f1},{f2}"], env=env)
    assert s.outbound_port == 18001 and s.outbound_exclude_ports == (3, 4)
    # flags beat env
    s = load([str(f1)], env=env, flags={"redirect.outbound.port": "19001"})
    assert s.outbound_port == 19001 and s.outbound_exclude_ports == (3, 4)


def test_config_from_stdin_and_port_list_forms():
    s = load(["-"], stdin=io.StringIO(
        "redirect:\n  outbound:\n    excludePorts: '22, 80-82'\n    includePorts: 9000\n"))
    assert s.outbound_exclude_ports == (22, 80, 81, 82)
    assert s.outbound_include_ports == (9000,)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("redirect: [unclosed\n")
    with pytest.raises(ConfigError, match="does not parse"):
        load([str(bad)])
    with pytest.raises(ConfigError, match="cannot read it"):
        load([str(tmp_path / "missing.yaml")])
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load([str(top)])


def test_unknown_keys_are_reported(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("redirect:\n  outbound:\n    prot: 1\nfoo: bar\n")
    _, warnings = config.load([str(f)], environ={}, flags={"kumaDPUser": DP})
    assert any("redirect.outbound.prot" in w for w in warnings)
    assert any("'foo'" in w for w in warnings)


def test_env_names_follow_kumas_structure():
    names = set(config.ENV_NAMES)
    for expected in ("KUMA_TRANSPARENT_PROXY_KUMA_DP_USER",
                     "KUMA_TRANSPARENT_PROXY_IP_FAMILY_MODE",
                     "KUMA_TRANSPARENT_PROXY_REDIRECT_OUTBOUND_EXCLUDE_PORTS",
                     "KUMA_TRANSPARENT_PROXY_REDIRECT_OUTBOUND_EXCLUDE_PORTS_FOR_IPS",
                     "KUMA_TRANSPARENT_PROXY_REDIRECT_OUTBOUND_EXCLUDE_PORTS_FOR_UIDS",
                     "KUMA_TRANSPARENT_PROXY_EBPF_CGROUP_PATH",
                     "KUMA_TRANSPARENT_PROXY_EBPF_INSTANCE_IP",
                     "KUMA_TRANSPARENT_PROXY_EBPF_BPFFS_PATH"):
        assert expected in names


def test_uid_rules_and_ips_from_every_layer(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("redirect:\n  outbound:\n    excludePortsForUIDs: ['tcp:22:1000']\n"
                 "    excludePortsForIPs: ['10.0.0.1', '192.168.0.0/24']\n")
    s = load([str(f)])
    assert [r.describe() for r in s.uid_rules] == ["tcp:22:1000"]
    assert s.outbound_exclude_ips == ("10.0.0.1/32", "192.168.0.0/24")
    env = {"KUMA_TRANSPARENT_PROXY_REDIRECT_OUTBOUND_EXCLUDE_PORTS_FOR_UIDS":
           "53,3000-5000:106-108;udp:53:1"}
    s = load([str(f)], env=env)
    assert [r.describe() for r in s.uid_rules] == ["tcp,udp:53,3000-5000:106-108",
                                                   "udp:53:1"]


def test_too_many_uid_rules():
    rules = [f"{i}" for i in range(abi.TP_MAX_UID_RULES + 1)]
    with pytest.raises(ConfigError, match="at most 32"):
        load(flags={"redirect.outbound.excludePortsForUIDs": rules})


def test_port_lists_are_stored_compactly():
    assert config.compact_ports([22, 80, 81, 82, 1000]) == "22,80-82,1000"
    assert config.compact_ports(range(1000, 2001)) == "1000-2000"
    assert config.compact_ports([]) == ""


def test_iptables_only_switches_are_accepted_with_a_note():
    settings, notes = config.load([], environ={}, flags={
        "kumaDPUser": DP, "wait": "10", "storeFirewalld": "true", "log.enabled": "true",
        "redirect.outbound.insertRedirectInsteadOfAppend": "true"})
    assert settings.outbound_port == 15001
    text = "\n".join(notes)
    for flag in ("--wait:", "--iptables-logs:",
                 "--redirect-outbound-insert-instead-of-append:"):
        assert flag in text, flag
    assert len(notes) == 3
    # --store-firewalld means --store here: kept in the agent's store, no note.
    assert settings.store and "--store-firewalld" not in text


def test_redirect_all_dns_traffic_implies_dns():
    s = load(flags={"redirect.dns.captureAll": "true"})
    assert s.dns_enabled and s.dns_capture_all and s.dns_port == 15053


def test_instance_ip_from_an_environment_variable():
    s, _ = config.load([], environ={"INSTANCE_IP": "198.18.0.1"},
                       flags={"kumaDPUser": DP, "ebpf.instanceIPEnvVarName": "INSTANCE_IP"})
    assert s.instance_ip4 == "198.18.0.1"
    with pytest.raises(ConfigError, match="INSTANCE_IP is not set"):
        config.load([], environ={}, flags={"kumaDPUser": DP,
                                           "ebpf.instanceIPEnvVarName": "INSTANCE_IP"})


def test_nameservers_by_family(tmp_path):
    f = tmp_path / "resolv.conf"
    f.write_text("# comment\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n"
                 "nameserver ::1\nsearch mesh\n")
    assert config.read_nameservers(str(f)) == {4: ["10.0.0.2"], 6: ["fe80::1", "::1"]}
    with pytest.raises(ConfigError, match="cannot read"):
        config.read_nameservers(str(tmp_path / "nope"))


@pytest.mark.parametrize("given, expected", [
    (None, None), ("auto", None), ("AUTO", None), ("true", True), ("false", False),
    ("0", False)])
def test_accelerate_is_auto_unless_given(given, expected):
    """ebpf.accelerate: None means install decides from the kernel (on where supported)."""
    flags = {} if given is None else {"ebpf.accelerate": given}
    env = {"KUMA_TRANSPARENT_PROXY_EBPF_ACCELERATE": given} if given else {}
    assert load(flags=flags).accelerate is expected
    assert load(env=env).accelerate is expected


def test_accelerate_rejects_other_words():
    with pytest.raises(ConfigError, match="use auto, true or false"):
        load(flags={"ebpf.accelerate": "maybe"})
