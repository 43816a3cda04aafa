"""`ebpf-tproxy validate` in pods registered through the CNI chain (cni_node.Node), run as
Kuma runs its validator: in the pod's network namespace and cgroup, as uid 5678 with every
capability dropped; and as root, where it also checks SO_ORIGINAL_DST and the
registration."""
import os
import time

import pytest

from loader.lab import PYTHON

from .cni_driver import REFERENCE_PLUGINS
from .cni_node import INJECTED, SIDECAR_UID, Node

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(REFERENCE_PLUGINS, "bridge")),
                                reason="make setup installs containernetworking-plugins")

DROPPED = ["setpriv", f"--reuid={SIDECAR_UID}", f"--regid={SIDECAR_UID}", "--clear-groups",
           "--inh-caps=-all", "--bounding-set=-all"]
IPV4_ONLY = {"kuma.io/transparent-proxying-ip-family-mode": "ipv4"}


@pytest.fixture
def node(lab):
    n = Node(lab)
    lab.start_agent("--cni-socket", n.socket)
    return n


def validate(lab, ns, *args, unprivileged=True):
    argv = [PYTHON, "-m", "loader.cli", "validate", "--ebpf-bpffs-path", lab.bpffs, *args]
    return lab.run((DROPPED if unprivileged else []) + argv, ns=ns, timeout=120)


def marks(r):
    """{check: mark} of validate's lines."""
    out = {}
    for ln in r.stdout.splitlines():
        mark, _, rest = ln.partition(" ")
        if mark in ("✓", "✗", "-"):
            out[rest.split(":")[0]] = mark
    return out


@pytest.mark.parametrize("mode", ["dualstack", "ipv4"])
def test_passes_as_uid_5678_with_every_capability_dropped(node, mode):
    pod = node.add(dict(INJECTED, **(IPV4_ONLY if mode == "ipv4" else {})))
    r = validate(node.lab, pod.ns, "--ip-family-mode", mode)
    assert r.returncode == 0, r.stdout + r.stderr
    expected = {"inbound IPv4": "✓", "outbound": "-", "registration": "-"}
    if mode == "dualstack":
        expected["inbound IPv6"] = "✓"
    assert marks(r) == expected, r.stdout
    assert "no CAP_SETUID" in r.stdout and "cannot be read as uid 5678" in r.stdout


@pytest.mark.parametrize("mode", ["dualstack", "ipv4"])
def test_as_root_it_also_checks_original_destination_and_the_registration(node, mode):
    pod = node.add(dict(INJECTED, **(IPV4_ONLY if mode == "ipv4" else {})))
    r = validate(node.lab, pod.ns, "--ip-family-mode", mode, unprivileged=False)
    assert r.returncode == 0, r.stdout + r.stderr
    families = ["IPv4", "IPv6"] if mode == "dualstack" else ["IPv4"]
    assert marks(r) == {**{f"{d} {f}": "✓" for d in ("inbound", "outbound") for f in families},
                        "registration": "✓"}, r.stdout
    assert "SO_ORIGINAL_DST named it" in r.stdout
    assert node.registration(pod)["counters"]["orig_dst_answered"] == len(families)


def test_an_unregistered_namespace_fails_within_the_timeout_in_one_line(node):
    ns = node.lab.add_netns()
    start = time.monotonic()
    r = validate(node.lab, ns, "--timeout", "2")
    took = time.monotonic() - start
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "inbound IPv4" in lines[0] and "not redirected" in lines[0] \
        and "fix:" in lines[0], r.stderr
    assert 2 <= took < 60, took   # retried until the timeout, then gave up


def test_inbound_capture_off_fails_naming_it(node):
    """A gateway pod: Kuma's own check still passes there (the DP user's call to 127.0.0.6
    goes to the inbound port whether or not inbound is captured, rule 4d, behind iptables
    too); the registration, readable as root, says inbound capture is off."""
    pod = node.add(dict(INJECTED, **{"kuma.io/gateway": "enabled"}))
    r = validate(node.lab, pod.ns, "--timeout", "1", unprivileged=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "registration" in r.stderr and "inbound redirect off" in r.stderr, r.stderr
    # Validated with the pod's own configuration (inbound off), it passes: Kuma's check
    # still runs (and passes, as said), and the registration agrees.
    cfg = node.lab.shared_file("gateway.yaml", "redirect:\n  inbound:\n    enabled: false\n")
    r = validate(node.lab, pod.ns, "--config", cfg, unprivileged=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert marks(r)["inbound IPv4"] == "✓" and marks(r)["registration"] == "✓", r.stdout


def test_a_port_already_taken_fails_at_once_with_its_own_fix(node, lab):
    """Run beside a running sidecar: not "not captured", and no waiting out the timeout."""
    pod = node.add(INJECTED)
    lab.spawn([PYTHON, "-m", "loader.lab.servers", "listen", "in:15006"], ns=pod.ns,
              user=SIDECAR_UID)
    start = time.monotonic()
    r = validate(lab, pod.ns, "--timeout", "30")
    assert r.returncode == 1 and time.monotonic() - start < 30, r.stdout + r.stderr
    assert "port 15006 is already taken" in r.stderr and "before the proxy starts" in r.stderr


def test_the_outbound_check_uses_the_registered_configuration(node):
    """As root the address, port and uid come from the pod's registration: a pod that
    excludes most of 20000-29999 and uid 65534 still validates."""
    pod = node.add(dict(INJECTED, **{
        "traffic.kuma.io/exclude-outbound-ports": "20000-29990",
        "traffic.kuma.io/exclude-outbound-ports-for-uids": "tcp:*:65534"}))
    r = validate(node.lab, pod.ns, "--ip-family-mode", "ipv4", unprivileged=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert marks(r)["outbound IPv4"] == "✓" and "uid 65533" in r.stdout, r.stdout
