"""Input a careless operator or a hostile file gives (issue 17): each one is a ConfigError
(one line, exit 2 in the CLI), never a traceback, a hang or an unbounded read, and never a
default in place of an empty value. No root needed."""
import io
import os

import pytest

from loader import config
from loader.config import ConfigError


def load_flags(**flags):
    return config.load(environ={}, flags=flags)


# Kuma's Go parsers (strconv.ParseUint base 10) take ASCII digits only.
@pytest.mark.parametrize("value", ["８０", "٥٦٧٨", "1_000", "+80", "-80", "8 0", "²", "0x50",
                                   "80.0", ""])
def test_ports_are_ascii_digits_only(value):
    with pytest.raises(ConfigError, match="--redirect-outbound-port"):
        load_flags(**{"redirect.outbound.port": value})
    if value:   # an empty port list is a valid list: no port excluded
        with pytest.raises(ConfigError, match="--exclude-outbound-ports"):
            load_flags(**{"redirect.outbound.excludePorts": value})


def test_leading_zeros_are_accepted_as_go_does():
    s, _ = load_flags(**{"redirect.outbound.port": "015001", "kumaDPUser": "65534"})
    assert s.outbound_port == 15001


@pytest.mark.parametrize("value", ["²", "٥٦٧٨", "５６７８"])
def test_dp_user_in_other_scripts_digits_is_a_name_that_does_not_exist(value):
    with pytest.raises(ConfigError, match="no user"):
        load_flags(kumaDPUser=value)
    with pytest.raises(ConfigError):
        config.load(environ={"KUMA_TRANSPARENT_PROXY_KUMA_DP_USER": value})


@pytest.mark.parametrize("value", ["٥", "1_0", "+1", "1-²"])
def test_uid_ranges_are_ascii_digits_only(value):
    with pytest.raises(ConfigError, match="not a uid"):
        load_flags(**{"redirect.outbound.excludePortsForUIDs": [f"tcp:22:{value}"],
                      "kumaDPUser": "65534"})


@pytest.mark.parametrize("key, flag", [("ebpf.cgroupPath", "--ebpf-cgroup-path"),
                                       ("ebpf.bpffsPath", "--ebpf-bpffs-path"),
                                       ("redirect.dns.resolvConfigPath",
                                        "redirect.dns.resolvConfigPath"),
                                       ("kumaDPUser", "--kuma-dp-user")])
def test_empty_is_an_error_never_the_default(key, flag):
    with pytest.raises(ConfigError, match=f"{flag}: empty"):
        load_flags(**{key: ""})
    env = config.env_name(key)
    with pytest.raises(ConfigError, match=f"{env}: empty"):
        config.load(environ={env: "  "})


@pytest.mark.parametrize("value, why", [("x/..", "relative"), ("sys/fs/cgroup", "relative"),
                                        ("/sys/fs/cgroup/x/..", "'..'"),
                                        ("/sys/fs/cgroup/./x", "'.'")])
def test_relative_or_dotted_paths_are_refused(value, why):
    with pytest.raises(ConfigError, match=why):
        load_flags(**{"ebpf.cgroupPath": value, "kumaDPUser": "65534"})


@pytest.mark.parametrize("name", ["", ".", "..", "../../x", "a.b", "A", "-x", "a/b", "x" * 64,
                                  "a\x00b", "é"])
def test_one_name_rule(name):
    with pytest.raises(ConfigError, match="not a valid registration name"):
        config.check_name(name)
    with pytest.raises(ConfigError, match="not a valid registration name"):
        config.load(environ={}, flags={"kumaDPUser": "65534"}, name=name)


def test_good_names():
    for name in ("default", "pod-1", "kube_system-x", "0", "a" * 63):
        assert config.check_name(name) == name


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_nul_byte_in_a_value_from_a_file(tmp_path):
    f = write(tmp_path, "c.yaml", b'kumaDPUser: "no\\0body"\n')
    with pytest.raises(ConfigError, match="kumaDPUser .*NUL"):
        config.load([f], environ={})
    f = write(tmp_path, "d.yaml", b'redirect: {dns: {resolvConfigPath: "/etc/r\\0"}}\n')
    with pytest.raises(ConfigError, match="resolvConfigPath .*NUL"):
        config.load([f], environ={})


def test_a_config_file_that_is_not_utf8(tmp_path):
    f = write(tmp_path, "c.yaml", b"kumaDPUser: nob\xffody\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load([f], environ={})


def test_ports_nested_deep(tmp_path):
    deep = b"redirect: {outbound: {excludePorts: " + b"[" * 5000 + b"22" + b"]" * 5000 + b"}}\n"
    with pytest.raises(ConfigError, match="nested too deep|list inside a list"):
        config.load([write(tmp_path, "c.yaml", deep)], environ={})
    deep_json = b'{"redirect": {"outbound": {"excludePorts": ' + b"[" * 5000 + b"22" + \
        b"]" * 5000 + b"}}}"
    with pytest.raises(ConfigError, match="nested too deep|list inside a list"):
        config.load([write(tmp_path, "c.json", deep_json)], environ={})
    shallow = b"redirect: {outbound: {excludePorts: [[22]]}}\n"
    with pytest.raises(ConfigError, match="list inside a list"):
        config.load([write(tmp_path, "d.yaml", shallow)], environ={})


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    lines = ["a0: &a0 [x,x,x,x,x,x,x,x,x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("redirect: {outbound: {excludePorts: *a9}}")
    f = write(tmp_path, "bomb.yaml", "\n".join(lines).encode())
    with pytest.raises(ConfigError, match="alias \\*a0 .*repeats a list or mapping"):
        config.load([f], environ={})


def test_a_scalar_alias_is_fine(tmp_path):
    f = write(tmp_path, "c.yaml", b"kumaDPUser: &u '65534'\nredirect: {outbound: {port: 15001}}"
                                  b"\nverbose: false\n")
    s, _ = config.load([f], environ={})
    assert s.dp_uid == 65534


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null", "/proc/self"])
def test_reads_are_of_regular_files_only(path):
    with pytest.raises(ConfigError, match="not a regular file|cannot read"):
        config.read_config_file(path)
    with pytest.raises(ConfigError, match="resolvConfigPath"):
        config.read_nameservers(path)


def test_reads_are_capped(tmp_path):
    big = write(tmp_path, "big.yaml", b"#" * (config.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        config.read_config_file(big)
    with pytest.raises(ConfigError, match="larger than"):
        config.read_config_file("-", stdin=io.BytesIO(b"#" * (config.MAX_CONFIG_BYTES + 1)))
    resolv = write(tmp_path, "resolv.conf", b"#" * (config.MAX_RESOLV_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        config.read_nameservers(resolv)


def test_a_fifo_is_not_waited_on(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        config.read_config_file(fifo)


def test_too_many_cidrs_are_refused_while_validating():
    n = config.abi.TP_CIDRS_MAX // 2 + 1
    cidrs = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(n)]
    with pytest.raises(ConfigError, match=f"{n} entries; at most"):
        load_flags(**{"redirect.outbound.excludePortsForIPs": cidrs, "kumaDPUser": "65534"})
