"""The agent's store (loader/store.py) and the configuration documents it keeps: written
whole, read back to the same Settings, and every kind of bad file refused with one line
naming it. No root needed."""
import json
import os
import pwd

import pytest

from loader import config, store
from loader.config import ConfigError

DP = pwd.getpwuid(65534).pw_name

CONFIGS = [
    {},
    {"redirect.outbound.excludePorts": "22,80-90", "ipFamilyMode": "ipv4",
     "redirect.outbound.excludePortsForIPs": ["10.0.0.0/8", "fd00::/8"],
     "redirect.outbound.excludePortsForUIDs": ["tcp:22,80:1000", "106-108"]},
    {"redirect.inbound.enabled": "false", "ebpf.accelerate": "false",
     "ebpf.cgroupPath": "/sys/fs/cgroup/kubepods", "ebpf.instanceIP": "10.1.2.3"},
    {"redirect.dns.captureAll": "true", "redirect.outbound.includePorts": "80,443",
     "redirect.inbound.excludePorts": "9901,15090", "redirect.inbound.port": "16006",
     "redirect.dns.resolvConfigPath": "/etc/netns/pod1/resolv.conf"},
    {"redirect.outbound.excludePortsForIPs": [f"10.{i // 256}.{i % 256}.0/24"
                                              for i in range(300)]},
]


def settings(flags, name="default"):
    return config.load([], environ={}, flags=dict(flags, kumaDPUser=DP), name=name)[0]


@pytest.fixture
def state_dir(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return str(d)


@pytest.mark.parametrize("flags", CONFIGS)
def test_a_stored_configuration_reads_back_to_the_same_settings(state_dir, flags):
    s = settings(dict(flags, storeFirewalld="true"))
    path = store.save(state_dir, "default", "/run/netns/pod1", s)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    got = store.read(state_dir, "default")
    assert got.settings == s and got.netns == "/run/netns/pod1"
    assert config.digest_of(got.settings) == config.digest_of(s)
    # Whether it is stored does not change what it captures.
    assert config.digest_of(settings(flags)) == config.digest_of(s)


def test_a_changed_configuration_has_another_digest():
    assert config.digest_of(settings({})) != config.digest_of(
        settings({"redirect.outbound.excludePorts": "8001"}))


def test_save_replaces_whole_and_forget_removes(state_dir):
    store.save(state_dir, "a", "/proc/1/ns/net", settings({}))
    store.save(state_dir, "a", "/proc/1/ns/net", settings({"redirect.outbound.port": "15011"}))
    assert store.read(state_dir, "a").settings.outbound_port == 15011
    assert os.listdir(os.path.join(state_dir, "namespaces")) == ["a.json"]   # no temp file
    assert store.names(state_dir) == ["a"]
    assert store.forget(state_dir, "a") and not store.forget(state_dir, "a")
    assert store.names(state_dir) == []


def test_the_fingerprint_changes_with_any_stored_file(state_dir):
    before = store.fingerprint(state_dir)
    store.save(state_dir, "a", "/proc/1/ns/net", settings({}))
    after = store.fingerprint(state_dir)
    assert after != before
    store.save(state_dir, "a", "/proc/1/ns/net", settings({"redirect.outbound.port": "15011"}))
    assert store.fingerprint(state_dir) != after


@pytest.mark.parametrize("path", ["/proc/1234/ns/net", "/proc/self/ns/net"])
def test_a_process_path_cannot_be_stored(state_dir, path):
    with pytest.raises(ConfigError, match="names a process"):
        store.save(state_dir, "a", path, settings({}))
    assert store.names(state_dir) == []


BAD = {
    "truncated": (lambda doc: json.dumps(doc)[:40], "not JSON"),
    "wrong-types": (lambda doc: json.dumps(dict(doc, netns=5)), "'netns' must be"),
    "config-not-object": (lambda doc: json.dumps(dict(doc, config=[1])), "'config' must be"),
    "unknown-version": (lambda doc: json.dumps(dict(doc, version=99)), "state version 99"),
    "other-name": (lambda doc: json.dumps(dict(doc, name="other")), "names 'other'"),
    "bad-value": (lambda doc: json.dumps(dict(doc, config={"redirect": {"outbound": {
        "port": 70000}}})), "70000"),
    "unknown-key": (lambda doc: json.dumps(dict(doc, config={"redirect": {"outbund": {}}})),
                    "unknown key 'redirect.outbund'"),
    "not-utf8": (lambda doc: b"\xff\xfe", "not JSON"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_state_file_is_one_line_and_the_others_still_read(state_dir, kind):
    store.save(state_dir, "good", "/proc/1/ns/net", settings({}))
    doc = {"version": 1, "name": kind, "netns": "/proc/1/ns/net",
           "config": config.document_of(settings({}))}
    make, needle = BAD[kind]
    data = make(doc)
    with open(os.path.join(state_dir, "namespaces", f"{kind}.json"), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    good, bad = store.read_all(state_dir)
    assert [s.name for s in good] == ["good"]
    assert len(bad) == 1 and "\n" not in bad[0], bad
    assert f"{kind}.json" in bad[0] and needle in bad[0], bad[0]


def test_a_state_directory_others_can_write_is_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(ConfigError, match="writable by another user"):
        store.check_dir(str(d))
    assert store.check_dir(str(tmp_path / "missing")) is False
    assert store.check_dir(str(tmp_path / "made"), create=True) is True
    assert oct(os.stat(tmp_path / "made" / "namespaces").st_mode & 0o777) == "0o700"
