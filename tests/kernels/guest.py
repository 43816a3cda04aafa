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


def fast_mounts(specs):
    """Mount run.py's extra 9p exports (tag:path) with cache=loose over the same paths.
    /usr/lib/modules (a tmpfs with the symlink to the kernel's modules, made by virtme-ng)
    is under /usr on a merged-/usr host: made again on top."""
    rel = platform.release()
    modlink = f"/lib/modules/{rel}"
    target = os.readlink(modlink) if os.path.islink(modlink) else None
    done = []
    for spec in specs:
        tag, path = spec.split(":", 1)
        if sh("mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L,cache=loose,"
              "msize=512000,ro", tag, path):
            done.append(path)
    if target and not (os.path.islink(modlink) and os.readlink(modlink) == target):
        sh("mount", "-t", "tmpfs", "none", "/lib/modules")
        os.symlink(target, modlink)
    return done


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
    ap.add_argument("--fast-mount", action="append", default=[])
    ap.add_argument("--test-timeout", type=int, default=900)
    ap.add_argument("--args-file", help="JSON list of pytest arguments (run.py writes it: "
                    "the command itself travels on the guest's kernel command line)")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args()
    if args.args_file:
        with open(args.args_file) as f:
            args.pytest_args += json.load(f)
    t0 = time.monotonic()
    rel = platform.release()
    say(f"started on {rel}")
    if args.fast_mount:
        t = time.monotonic()
        say(f"9p with caching at {', '.join(fast_mounts(args.fast_mount))} "
            f"({time.monotonic() - t:.1f} s)")
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
    os.environ["KERNELS_PROGRESS"] = os.path.join(args.out, "progress.jsonl")
    cmd = [sys.executable, "-m", "pytest", "-ra", "-v", "-p", "no:cacheprovider",
           "-p", "tests.kernels.progress",
           "--durations=15", f"--timeout={args.test_timeout}", f"--junitxml={junit}",
           *args.pytest_args]
    say("running " + " ".join(cmd[1:]))
    t = time.monotonic()
    info["pytest_exit"] = subprocess.run(cmd, cwd=PROJECT).returncode
    info["pytest_seconds"] = round(time.monotonic() - t, 1)
    info["guest_seconds"] = round(time.monotonic() - t0, 1)
    with open(os.path.join(args.out, "dmesg.txt"), "w") as f:
        subprocess.run(["dmesg"], stdout=f, stderr=subprocess.DEVNULL)
    with open(os.path.join(args.out, "guest.json"), "w") as f:
        json.dump(info, f, indent=2)
    say(f"pytest exit {info['pytest_exit']} after {info['pytest_seconds']} s")
    return info["pytest_exit"]


if __name__ == "__main__":
    sys.exit(main())
