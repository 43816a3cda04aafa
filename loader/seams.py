"""Test seams of install, each off unless its environment variable is set (the kernel tests
set them to stop, fail or hold an install at a given step)."""
import os


class SeamFailure(RuntimeError):
    """EBPF_TPROXY_TEST_FAIL asked install to fail here."""


def pause(step):
    """EBPF_TPROXY_TEST_PAUSE=<step> stops install at that step (after saying so on stderr)
    until the test kills it, to prove recovery from a loader killed mid-way;
    EBPF_TPROXY_TEST_FAIL=<step> fails there, to prove the rollback."""
    if os.environ.get("EBPF_TPROXY_TEST_FAIL") == step:
        raise SeamFailure(f"failing at {step} as EBPF_TPROXY_TEST_FAIL asks")
    if os.environ.get("EBPF_TPROXY_TEST_PAUSE") == step:
        import signal
        import sys
        sys.stderr.write(f"paused at {step}\n")
        sys.stderr.flush()
        while True:
            signal.pause()


def hold(step):
    """With EBPF_TPROXY_TEST_HOLD=1, install says 'held at <step>' on stderr and waits for a
    line on stdin before going on, so a test can make connections at each step of an
    upgrade (tests/kernel/test_lifecycle.py)."""
    if os.environ.get("EBPF_TPROXY_TEST_HOLD") != "1":
        return
    import sys
    sys.stderr.write(f"held at {step}\n")
    sys.stderr.flush()
    sys.stdin.readline()


def after_link(what):
    pause("after-link")
    hold(f"after-link {what}")
