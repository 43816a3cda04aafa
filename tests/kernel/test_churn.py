"""Churn: tens of thousands of captured connections opened and closed. Every
SO_ORIGINAL_DST answer is right, and the connection table returns to its starting size
(entries are freed at close, never left for LRU eviction)."""
import json
import time

from loader.lab import REMOTE_IP4, REMOTE_IP6

from .conftest import install, listeners

N = 20000


def tracked(lab):
    st = json.loads(lab.tproxy("status", "--output", "json").stdout)
    return st[0]["tracked_connections"], st[0]["counters"]


def wait_tracked(lab, want, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        n, counters = tracked(lab)
        if n == want or time.monotonic() > deadline:
            return n, counters
        time.sleep(0.2)   # polling the map until the last closes are processed


def test_churn_every_answer_right_and_table_drains(lab):
    listeners(lab)
    install(lab)
    start, _ = tracked(lab)
    assert start == 0
    for host, orig, lo, count in ((REMOTE_IP4, f"{REMOTE_IP4}:8000", "127.0.0.1", N),
                                  (REMOTE_IP6, f"[{REMOTE_IP6}]:8000", "[::1]", N // 4)):
        r = lab.py("connect", host, "8000", "--count", str(count), timeout=600)
        assert r.returncode == 0, r.stderr
        results = json.loads(r.stdout)["results"]
        # One kind of reply only: every connection reached the proxy with the right answer.
        assert list(results) == [f"out orig={orig} local={lo}:15001"], results
        assert results[f"out orig={orig} local={lo}:15001"] == count
    end, counters = wait_tracked(lab, start)
    assert end == start, counters
    total = N + N // 4
    assert counters["orig_dst_answered"] == total
    assert counters["conn_tracked"] == total == counters["conn_released"]
    assert counters["conn_track_failed"] == 0
