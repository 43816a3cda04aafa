"""The connection table (tp_conns) behaves like conntrack where it matters: the answer
outlives an application that closes before the proxy accepts, and no entry outlives both
ends, even when the proxy never sees the connection."""
import os
import sys
import time

from loader.lab import REMOTE_IP4

from .conftest import DP_UID, install, reached
from .test_churn import tracked, wait_tracked


def wait_for_line(path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            text = f.read()
        if text.strip():
            return text.strip()
        time.sleep(0.05)   # polling the listener's log
    raise TimeoutError(f"{path} stayed empty")


def test_answer_survives_an_application_that_closes_before_accept(lab):
    log = lab.shared_file("listener.log", "")
    os.chmod(log, 0o666)
    lab.spawn([sys.executable, "-m", "loader.lab.servers", "listen", "out:15001",
               "--log", log, "--accept-delay", "0.5"], user=DP_UID)
    install(lab)
    r = reached(lab, REMOTE_IP4, 8000, close_at_once=True)
    assert r["line"] == "CLOSED"
    assert wait_for_line(log).startswith(f"out orig={REMOTE_IP4}:8000 ")
    assert wait_tracked(lab, 0)[0] == 0


def test_no_leak_when_the_proxy_never_sees_the_connection(lab):
    # The proxy outside the cgroup: sock_ops never sees its end, so the application's
    # close alone must free the entry.
    lab.spawn([sys.executable, "-m", "loader.lab.servers", "listen", "out:15001"],
              user=DP_UID, in_cgroup=False)
    install(lab)
    for _ in range(20):
        assert reached(lab, REMOTE_IP4, 8000)["line"].startswith("out orig=- ")
    n, counters = wait_tracked(lab, 0)
    assert n == 0 and counters["conn_tracked"] == 20 == counters["conn_released"]
    assert tracked(lab)[1]["orig_dst_answered"] == 0
