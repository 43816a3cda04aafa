"""Version floor and flag handling, fed fake inputs (no root needed)."""
from loader import kernel
from loader.cli import flags_from


def test_old_kernel_is_refused_with_a_fix():
    c = kernel.check_kernel_version("5.4.0-150-generic")
    assert not c.ok and "5.7" in c.fix and "kumactl" in c.fix


def test_floor_and_newer_kernels_pass():
    for rel in ("5.7.0", "5.10.0-30-amd64", "6.18.44-fc-v509"):
        assert kernel.check_kernel_version(rel).ok, rel


def test_repeated_port_flag_last_wins_and_ips_accumulate():
    flags = flags_from({"exclude_outbound_ports": ("1,2", "3"),
                        "exclude_outbound_ips": ("10.0.0.1", "10.0.0.2,10.0.0.3"),
                        "exclude_outbound_ports_for_uids": ("1:2", "3:4")})
    assert flags["redirect.outbound.excludePorts"] == "3"
    assert flags["redirect.outbound.excludePortsForIPs"] == ["10.0.0.1", "10.0.0.2,10.0.0.3"]
    assert flags["redirect.outbound.excludePortsForUIDs"] == ["1:2", "3:4"]


def test_uids_are_translated_through_the_user_namespace_map(tmp_path):
    import pytest
    m = tmp_path / "uid_map"
    m.write_text("         0     100000      65536\n")
    assert kernel.kernel_uid(5678, str(m)) == 105678
    assert kernel.kernel_uid(0, str(m)) == 100000
    with pytest.raises(kernel.HostError, match="no mapping"):
        kernel.kernel_uid(70000, str(m))
    ident = tmp_path / "ident"
    ident.write_text("0 0 4294967295\n")
    assert kernel.kernel_uid(65534, str(ident)) == 65534


def test_redirect_dns_and_all_dns_traffic_are_exclusive():
    import pytest
    from loader.config import ConfigError
    with pytest.raises(ConfigError, match="exclusive"):
        flags_from({"redirect_dns": "true", "redirect_all_dns_traffic": "true"})
    assert flags_from({"redirect_dns": "true"})["redirect.dns.enabled"] == "true"


def test_listening_loopback_addresses_match_the_bpf_check():
    from loader.listeners import _loopback
    assert _loopback("127.0.0.1") and _loopback("127.0.0.6")
    assert not _loopback("198.18.0.1")
    assert _loopback("::1") and _loopback("::ffff:127.0.0.1")
    assert not _loopback("::") and not _loopback("0.0.0.0")
    assert not _loopback("::ffff:198.18.0.1")
