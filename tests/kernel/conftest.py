"""Kernel tests: real programs on real sockets, in lab namespaces and child cgroups made
by each test and removed afterwards, also when the test fails (loader.lab.Lab.close)."""
import contextlib
import functools
import os
import sys

import pytest

from loader.lab import Lab

DP_USER = "nobody"     # the proxy's user in the lab (exists on every Debian host)
DP_UID = 65534
APP_UID = 0            # the application runs as root: not the DP user
OTHER_UID = 1          # "daemon": a uid for exclude-outbound-ports-for-uids

from loader.programs import PROGRAMS  # noqa: E402

CGROUP_HOOKS = sum(1 for p in PROGRAMS if p.target == "cgroup")   # attachments per install

if os.geteuid() != 0:
    pytest.skip("kernel tests need root (run make test as root)", allow_module_level=True)


@functools.lru_cache(maxsize=None)
def probe_table():
    """What `ebpf-tproxy check` probes on this kernel: (feature, ok, error, programs)."""
    from loader import probe
    return tuple(probe.probe_hooks())


def has(name):
    return any(f == name and ok for f, ok, _, _ in probe_table())


def requires(*names):
    """Skip unless check's probe found every feature named; the reason quotes the probe
    and what a user loses, so `make kernels` shows why a test did not run on a kernel."""
    from loader import probe

    def why(name):
        _, _, err, progs = next(r for r in probe_table() if r[0] == name)
        mine = [p for p in PROGRAMS if p.name in progs]
        loses = mine[0].missing_means if mine else probe.FEATURE_FALLBACK.get(name, "")
        return f"check's probe: {name} unavailable ({err}); {loses}"
    missing = [n for n in names if not has(n)]
    return pytest.mark.skipif(bool(missing), reason="; ".join(why(n) for n in missing))


@pytest.fixture
def conntrack(request):
    """Whether the lab's namespaces have connection tracking active (Lab(conntrack=True)).
    Modules that set CONNTRACK_BOTH = True run every lab test both ways."""
    return getattr(request, "param", False)


# make test-neighbours: every lab test (but those marked alone) in a node that already
# serves other namespaces; make test does that for the NEIGHBOURS_TOO modules only.
NEIGHBOURS_ALWAYS = os.environ.get("EBPF_TPROXY_TEST_NEIGHBOURS") == "1"


@pytest.fixture
def neighbours(request):
    """Whether the lab's node program set already serves other namespaces, each with
    settings of its own, when the test starts (a node of many pods). Modules that set
    NEIGHBOURS_TOO = True run every lab test also that way; under make test-neighbours
    every test does, except those marked alone (they need the node set to themselves)."""
    if hasattr(request, "param"):
        return request.param
    return NEIGHBOURS_ALWAYS and request.node.get_closest_marker("alone") is None


@pytest.fixture
def lab(conntrack, neighbours):
    from . import residue
    residue.BASELINE_PINS = set()
    with Lab("t", conntrack=conntrack) as lab:
        if not neighbours:
            yield lab
            return
        with serving_neighbours(lab):
            yield lab


@contextlib.contextmanager
def serving_neighbours(lab):
    """The lab's node set made to serve three other namespaces first (add_neighbours), all
    removed with the lab."""
    sibling = lab.cgroup + "-neighbours"
    os.mkdir(sibling)
    try:
        add_neighbours(lab, sibling)
        yield lab
    finally:
        lab.close()   # uninstalls everything first, then the cgroup can go
        os.rmdir(sibling)


NEIGHBOUR = "zz-neighbour-"   # the names add_neighbours registers


def own(names):
    """The names (or status entries) of the test's own namespaces: not its neighbours'."""
    return [n for n in names
            if not (n if isinstance(n, str) else n["name"]).startswith(NEIGHBOUR)]


NEIGHBOUR_SETTINGS = (
    ["--exclude-outbound-ports", "8000,8001", "--redirect-inbound=false"],
    ["--redirect-outbound-port", "15011", "--redirect-inbound-port", "15016",
     "--exclude-inbound-ports", "8000"],
    ["--redirect-dns", "--exclude-outbound-ips", "0.0.0.0/0", "--kuma-dp-user", "daemon"],
)


def pod_netns(lab):
    """Another namespace of the lab with an address and a default route (a veth pair of
    its own: no other host is needed)."""
    ns = lab.add_netns()
    n = len(lab.extra_ns)
    for cmd in (["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
                ["link", "set", "d0", "up"], ["link", "set", "d1", "up"],
                ["addr", "add", f"10.77.{n}.2/24", "dev", "d0"],
                ["route", "add", "default", "dev", "d0"]):
        lab.ip(ns, *cmd)
    return ns


def add_neighbours(lab, cgroup):
    """Three namespaces registered in the lab's bpffs before the test, in a sibling cgroup
    (the node set attached there too), named to sort after the test's own."""
    for i, args in enumerate(NEIGHBOUR_SETTINGS):
        ns = pod_netns(lab)
        r = lab.tproxy("install", *(["--kuma-dp-user", DP_USER]
                                    if "--kuma-dp-user" not in args else []),
                       *args, "--name", f"{NEIGHBOUR}{i}", "--netns", f"/run/netns/{ns}",
                       "--ebpf-cgroup-path", cgroup, netns=False)
        assert r.returncode == 0, r.stderr
    from . import residue
    residue.BASELINE_PINS = set(residue.pins(lab.bpffs))


def pytest_generate_tests(metafunc):
    ct = getattr(metafunc.module, "CONNTRACK_BOTH", False) and \
        "conntrack" in metafunc.fixturenames
    nb = getattr(metafunc.module, "NEIGHBOURS_TOO", False) and \
        "neighbours" in metafunc.fixturenames
    # kernels-ci skips the conntrack and neighbours labs: what they change does not depend
    # on the kernel (test_node.py covers several namespaces there), and every test costs a
    # minute or two under emulation, inside CI's 90-minute budget.
    variants = [pytest.param(False, False, id="clean")]
    if ct:
        variants.append(pytest.param(True, False, id="conntrack",
                                     marks=pytest.mark.conntrack_lab))
    if nb:
        variants.append(pytest.param(False, True, id="neighbours",
                                     marks=pytest.mark.neighbours_lab))
    if ct or nb:
        metafunc.parametrize("conntrack,neighbours", variants, indirect=True)


def listeners(lab):
    """The lab's listeners: the proxy's outbound/inbound ports and a local service in the
    app namespace (in the cgroup, like Envoy beside the app), remote services elsewhere."""
    lab.spawn([sys.executable, "-m", "loader.lab.servers", "listen",
               "out:15001", "in:15006", "local:8000"], user=DP_UID)
    lab.spawn([sys.executable, "-m", "loader.lab.servers", "listen",
               "remote:8000", "remote:8001"], ns=lab.remote_ns, in_cgroup=False)


def install(lab, *args, ok=True):
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, *args)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def killed_at(lab, step):
    """An install of the lab's namespace stopped at a seam step (EBPF_TPROXY_TEST_PAUSE)
    and killed there with SIGKILL, as a loader dies mid-way."""
    import signal
    import subprocess
    p = subprocess.Popen(
        [sys.executable, "-m", "loader.cli", "install", "--kuma-dp-user", DP_USER,
         "--netns", lab.app_ns, "--ebpf-bpffs-path", lab.bpffs, "--ebpf-cgroup-path",
         lab.cgroup], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env=dict(lab.env(), EBPF_TPROXY_TEST_PAUSE=step))
    try:
        # Read until the pause is announced (or install ends without reaching it: EOF).
        seen = []
        for line in p.stderr:
            seen.append(line)
            if f"paused at {step}" in line:
                break
        assert seen and f"paused at {step}" in seen[-1], "".join(seen)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stderr.close()


def reached(lab, host, port, user=APP_UID, bind=None, ns=None, close_at_once=False):
    """Which listener a connect() from the app (as user) reached: the reply line."""
    import json
    args = ["connect", host, str(port)] + (["--bind", bind] if bind else [])
    args += ["--close-at-once"] if close_at_once else []
    r = lab.py(*args, user=user, ns=ns)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def haproxy_config(port, server):
    """A TCP-mode HAProxy configuration: one frontend on port, one backend server line.
    `server x 0.0.0.0:0` sends each connection to its SO_ORIGINAL_DST answer. Idle
    timeouts are long: under emulation (make kernels) an install in the middle of a held
    connection takes ~30 s, and HAProxy closed it for idleness (seen on 6.1)."""
    return (f"global\n    maxconn 256\ndefaults\n    mode tcp\n    timeout connect 5s\n"
            f"    timeout client 10m\n    timeout server 10m\nfrontend capture\n"
            f"    bind 0.0.0.0:{port}\n    default_backend original_destination\n"
            f"backend original_destination\n    server {server}\n")


def sh_in(ns, *cmd, input=None):
    """Run a command in a lab namespace (nsenter keeps the mounts; ip netns exec would
    remount /sys)."""
    import subprocess
    r = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *cmd], input=input,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return r
