"""What the kernel holds, seen through bpftool, to prove that uninstall (and a refused
install) leaves nothing behind."""
import json
import os
import subprocess
import time


def bpftool(*args):
    r = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip() or "[]")


def snapshot():
    return {
        "links": {x["id"] for x in bpftool("link", "list")},
        "progs": {x["id"] for x in bpftool("prog", "list")},
        "maps": {x["id"] for x in bpftool("map", "list")},
    }


def cgroup_attachments(cgroup):
    return bpftool("cgroup", "list", cgroup)


def wait_back_to(before, timeout=15.0):
    """Poll until links, programs and maps are exactly those of `before` (the kernel frees
    programs and maps asynchronously after the last reference goes). Returns the diff."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot()
        extra = {k: now[k] - before[k] for k in now}
        if not any(extra.values()) or time.monotonic() > deadline:
            return {k: v for k, v in extra.items() if v}
        time.sleep(0.1)   # polling for the kernel's deferred frees


def pins(bpffs):
    out = []
    for root, dirs, files in os.walk(os.path.join(bpffs, "ebpf-tproxy")):
        out += [os.path.join(root, n) for n in dirs + files]
    if os.path.isdir(os.path.join(bpffs, "ebpf-tproxy")):
        out.append(os.path.join(bpffs, "ebpf-tproxy"))
    return out
