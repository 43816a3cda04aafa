"""Kernel tests: real programs on real sockets, in lab namespaces and child cgroups made
by each test and removed afterwards, also when the test fails (loader.lab.Lab.close)."""
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


@pytest.fixture
def lab(conntrack):
    with Lab("t", conntrack=conntrack) as lab:
        yield lab


def pytest_generate_tests(metafunc):
    if getattr(metafunc.module, "CONNTRACK_BOTH", False) and \
            "conntrack" in metafunc.fixturenames:
        # kernels-ci runs the conntrack lab only where a test asks for it (conntrack_ci):
        # what conntrack changes does not depend on the kernel, and every test there costs
        # a minute under emulation.
        with_ct = pytest.param(True, marks=pytest.mark.conntrack_lab)
        metafunc.parametrize("conntrack", [False, with_ct], ids=["clean", "conntrack"],
                             indirect=True)


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
