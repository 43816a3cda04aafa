"""loader/abi.py is the Python twin of bpf/tproxy_abi.h: every constant must agree.
(The struct layouts are compared with BCC's compiled view in tests/kernel.)"""
import os
import re

from loader import abi

HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "bpf", "tproxy_abi.h")


def header_defines():
    out = {}
    with open(HEADER) as f:
        for m in re.finditer(r"^#define\s+(TP_\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", f.read(), re.M):
            out[m.group(1)] = int(m.group(2), 0)
    return out


def test_every_constant_matches():
    defs = header_defines()
    reasons = {name: i for i, (name, _) in enumerate(abi.REASONS)}
    reasons.update({name: i for i, (name, _) in enumerate(abi.ACCEL_COUNTERS)})
    assert defs, "no #defines parsed from the header"
    for name, value in defs.items():
        if name in ("TP_R_COUNT", "TP_A_COUNT"):
            assert getattr(abi, name) == value, name
        elif name.startswith(("TP_R_", "TP_A_")):
            assert reasons.get(name) == value, name
        else:
            assert getattr(abi, name) == value, name


def test_every_reason_is_in_the_header():
    defs = header_defines()
    for i, (name, _) in enumerate(abi.REASONS):
        assert defs.get(name) == i, name
    for i, (name, _) in enumerate(abi.ACCEL_COUNTERS):
        assert defs.get(name) == i, name


def test_cidr_keys_keep_families_apart():
    v4 = abi.cidr_key(7, 0, abi.TP_CIDR_EXCLUDE_OUT, "10.0.0.0/8")
    v6 = abi.cidr_key(7, 0, abi.TP_CIDR_EXCLUDE_OUT, "::/0")
    assert (v4.prefixlen, v4.family) == (64 + 32 + 96 + 8, 4)
    assert (v6.prefixlen, v6.family) == (64 + 32, 6)
    assert bytes(v4.addr)[10:12] == b"\xff\xff"


def test_cidr_keys_start_with_the_namespace():
    # The whole cookie is inside every prefix: a namespace's /0 never matches another's.
    a = abi.cidr_key((1 << 40) + 5, 1, abi.TP_CIDR_LOCAL, "0.0.0.0/0")
    assert (a.netns_lo, a.netns_hi) == (5, 1 << 8)
    assert a.prefixlen >= 64


def test_name_keys_are_bounded():
    import pytest
    assert abi.name_key("pod-1").name == b"pod-1"
    with pytest.raises(ValueError):
        abi.name_key("x" * abi.TP_NAME_MAX)


def test_addr16_round_trip():
    for ip in ("198.18.0.1", "fd00::1", "::1"):
        assert str(abi.addr_from16(abi.addr16(ip))) == ip
