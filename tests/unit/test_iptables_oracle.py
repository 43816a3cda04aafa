"""The oracle writes Kuma's nat rules rule for rule: the default set and the multi-flag set
of ../shared/reference/kuma-transparent-proxy.md (tests/golden/), in the same order."""
import os
import pwd
import subprocess

import pytest

from loader import config, iptables_oracle

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "golden")
DP = pwd.getpwuid(65534).pw_name


def settings(**flags):
    flags.setdefault("kumaDPUser", DP)
    # Kuma's own default excludes no inbound port; ours keeps SSH (22) reachable.
    flags.setdefault("redirect.inbound.excludePorts", "")
    return config.load([], environ={}, flags=flags)[0]


def appended(text):
    return [line for line in text.splitlines() if line.startswith("-A ")]


def golden(name):
    with open(os.path.join(GOLDEN, name)) as f:
        return f.read().splitlines()


def test_default_rule_set():
    assert appended(iptables_oracle.rules(settings(), dp_uid=5678)) == golden("kuma-default.nat")


def test_multi_flag_rule_set():
    s = settings(**{
        "redirect.dns.captureAll": "true",
        "redirect.outbound.excludePortsForUIDs": ["53,3000-5000:106-108"],
        "redirect.outbound.excludePortsForIPs": ["10.0.0.1,192.168.0.0/24"],
        "redirect.outbound.excludePorts": "1,22,333",
        "redirect.inbound.excludePorts": "4444,55555",
        "redirect.inbound.excludePortsForIPs": ["192.168.0.1,172.32.16.8/16"]})
    assert appended(iptables_oracle.rules(s, dp_uid=5678)) == golden("kuma-multi.nat")


def test_ipv6_uses_its_own_loopback_and_passthrough_addresses():
    text = iptables_oracle.rules(settings(), family=6, dp_uid=5678)
    assert "-A KUMA_MESH_OUTBOUND -s ::6/128 -o lo -j RETURN" in text
    assert "! -d ::1/128 -o lo" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="iptables-restore --test needs root")
def test_iptables_restore_accepts_the_rules():
    # --test parses and checks the whole table without committing it: the host's rules
    # are not touched.
    s = settings(**{"redirect.dns.captureAll": "true",
                    "redirect.outbound.excludePortsForUIDs": ["tcp:53,3000-5000:106-108"]})
    for family, tool in ((4, "iptables-restore"), (6, "ip6tables-restore")):
        r = subprocess.run([tool, "--test"], input=iptables_oracle.rules(s, family=family),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
