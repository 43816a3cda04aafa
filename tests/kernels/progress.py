"""pytest plugin for the guest (guest.py loads it with -p): each test's outcome and the
first lines of its failure, appended to $KERNELS_PROGRESS (JSON lines) as soon as it is
known, so a guest stopped at its time limit still tells what failed and why."""
import json
import os
import time


def pytest_runtest_logreport(report):
    path = os.environ.get("KERNELS_PROGRESS")
    if not path or (report.when != "call" and report.passed):
        return
    if report.when == "call" or report.failed or report.skipped:
        outcome = report.outcome if report.when == "call" else (
            "error" if report.failed else "skipped")
        msg = ""
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            msg = crash.message if crash else str(report.longrepr)[-2000:]
        elif report.skipped and isinstance(report.longrepr, tuple):
            msg = report.longrepr[2]
        with open(path, "a") as f:
            f.write(json.dumps({"test": report.nodeid, "when": report.when,
                                "outcome": outcome, "seconds": round(report.duration, 1),
                                "message": msg[:2000], "time": time.time()}) + "\n")
