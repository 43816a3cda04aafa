"""What validate's outbound check connects to and as whom, from a configuration (no root):
never a port, address or uid the configuration keeps direct."""
from loader import config, validate

FAM4, FAM6 = validate.Family(4), validate.Family(6)


def settings(**doc):
    base = {"kumaDPUser": "5678"}
    return config.settings_from_document(dict(base, **doc), "v", "test")


def test_the_port_is_never_an_excluded_one():
    s = settings(redirect={"outbound": {"excludePorts": "20000-29990"}})
    for _ in range(50):
        (addr, port), why = validate.outbound_target(s, FAM4)
        assert addr == "192.0.2.1" and 29991 <= port <= 29999 and why is None


def test_include_ports_give_the_first_included_port():
    s = settings(redirect={"outbound": {"includePorts": "8080,9090"}})
    assert validate.outbound_target(s, FAM6) == (("2001:db8::1", 8080), None)


def test_an_excluded_address_or_every_port_excluded_is_a_reason_not_a_target():
    s = settings(redirect={"outbound": {"excludePortsForIPs": ["192.0.2.0/24"]}})
    target, why = validate.outbound_target(s, FAM4)
    assert target is None and "192.0.2.0/24" in why
    s = settings(redirect={"outbound": {"excludePorts": "20000-29999"}})
    target, why = validate.outbound_target(s, FAM4)
    assert target is None and "excluded" in why


def test_the_uid_is_neither_the_dp_users_nor_an_excluded_one():
    assert validate.other_uid(settings()) == 65534
    s = settings(kumaDPUser="65534",
                 redirect={"outbound": {"excludePortsForUIDs": ["tcp:*:65533"]}})
    assert validate.other_uid(s) == 1
