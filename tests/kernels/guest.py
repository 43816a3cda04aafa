"""Runs inside the guest that tests/kernels/run.py boots (as root, with the host's root
filesystem as a copy-on-write snapshot): mounts what the guest lacks, records what
`ebpf-tproxy check` finds, runs pytest. Everything it writes goes to --out, a directory
shared with the host.

    .venv/bin/python tests/kernels/guest.py --out DIR [-- PYTEST ARGS]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, PROJECT)

from loader import kernel  # noqa: E402


def say(msg):
    print(f"guest: {msg}", flush=True)


def sh(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        say(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.returncode == 0


def mount_what_is_missing():
    made = []
    if kernel.cgroup2_mount() is None:
        # Like the host: cgroup2 at /sys/fs/cgroup/unified when /sys/fs/cgroup is a tmpfs
        # of v1 hierarchies, else at /sys/fs/cgroup itself.
        target = "/sys/fs/cgroup"
        if os.path.ismount(target) or os.listdir(target):
            target = "/sys/fs/cgroup/unified"
            os.makedirs(target, exist_ok=True)
        if sh("mount", "-t", "cgroup2", "none", target):
            made.append(f"cgroup2 at {target}")
    if not kernel.is_bpffs("/sys/fs/bpf"):
        os.makedirs("/sys/fs/bpf", exist_ok=True)
        if sh("mount", "-t", "bpf", "bpf", "/sys/fs/bpf"):
            made.append("bpffs at /sys/fs/bpf")
    if not os.path.isdir("/sys/kernel/debug/tracing") and os.path.isdir("/sys/kernel/debug"):
        if not os.path.ismount("/sys/kernel/debug"):
            sh("mount", "-t", "debugfs", "debugfs", "/sys/kernel/debug")
    return made


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args()
    t0 = time.monotonic()
    rel = platform.release()
    say(f"started on {rel}")
    info = {"uname": rel, "pytest_args": args.pytest_args}
    build = f"/lib/modules/{rel}/build"
    info["headers"] = os.path.realpath(build) if os.path.exists(build) else None
    if not info["headers"]:
        say(f"{build} is missing: BCC will not compile")
    info["mounted"] = mount_what_is_missing()
    info["cgroup2"] = kernel.cgroup2_mount()
    say(f"mounted {', '.join(info['mounted']) or 'nothing'}; cgroup2 at {info['cgroup2']}; "
        f"headers {info['headers']}")

    say("ebpf-tproxy check --output json")
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "loader.cli", "check", "--output", "json"],
                       cwd=PROJECT, capture_output=True, text=True)
    info["check_seconds"] = round(time.monotonic() - t, 1)
    info["check_exit"] = r.returncode
    with open(os.path.join(args.out, "check.json"), "w") as f:
        f.write(r.stdout)
    try:
        for c in json.loads(r.stdout)["checks"]:
            mark = "ok " if c["ok"] else ("NO " if c["required"] else "no ")
            say(f"  {mark} {c['name']}: {c['detail'] if not c['ok'] else ''}")
    except (ValueError, KeyError):
        say(f"check printed no JSON (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    say(f"check took {info['check_seconds']} s")

    junit = os.path.join(args.out, "junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-ra", "-p", "no:cacheprovider",
           f"--junitxml={junit}", *args.pytest_args]
    say("running " + " ".join(cmd[1:]))
    t = time.monotonic()
    info["pytest_exit"] = subprocess.run(cmd, cwd=PROJECT).returncode
    info["pytest_seconds"] = round(time.monotonic() - t, 1)
    info["guest_seconds"] = round(time.monotonic() - t0, 1)
    with open(os.path.join(args.out, "guest.json"), "w") as f:
        json.dump(info, f, indent=2)
    say(f"pytest exit {info['pytest_exit']} after {info['pytest_seconds']} s")
    return info["pytest_exit"]


if __name__ == "__main__":
    sys.exit(main())
