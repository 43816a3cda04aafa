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
    """[(attach type, program id)] attached to this cgroup itself, for every cgroup hook
    the programs use: BPF_PROG_QUERY through libbpf. (bpftool 7's `cgroup list` also asks
    about attach types newer than the kernel and fails on 5.10.)"""
    import ctypes as ct
    from loader import bpfsys
    from loader.programs import PROGRAMS
    lib = bpfsys.libbpf()
    lib.bpf_prog_query.argtypes = [ct.c_int, ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32),
                                   ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32)]
    out = []
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for atype in sorted({p.attach_type for p in PROGRAMS if p.target == "cgroup"}):
            ids = (ct.c_uint32 * 64)()
            cnt, flags = ct.c_uint32(64), ct.c_uint32(0)
            ret = lib.bpf_prog_query(fd, atype, 0, ct.byref(flags), ids, ct.byref(cnt))
            if ret < 0:
                raise OSError(-ret if ret != -1 else ct.get_errno(),
                              f"BPF_PROG_QUERY {cgroup} type {atype}")
            out += [(atype, ids[i]) for i in range(cnt.value)]
    finally:
        os.close(fd)
    return out


def wait_back_to(before, timeout=60.0):
    """Poll until links, programs and maps are exactly those of `before` (the kernel frees
    programs and maps asynchronously after the last reference goes). Returns the diff."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot()
        extra = {k: now[k] - before[k] for k in now}
        if not any(extra.values()) or time.monotonic() > deadline:
            return {k: v for k, v in extra.items() if v}
        time.sleep(0.1)   # polling for the kernel's deferred frees


# Pins that were there when the test began: the node set and the links of the namespaces
# a neighbours lab registered before it (conftest.add_neighbours); empty otherwise.
BASELINE_PINS = set()


def pins(bpffs):
    """Our pins in the bpffs, but those of the test's neighbours."""
    out = []
    for root, dirs, files in os.walk(os.path.join(bpffs, "ebpf-tproxy")):
        out += [os.path.join(root, n) for n in dirs + files]
    if os.path.isdir(os.path.join(bpffs, "ebpf-tproxy")):
        out.append(os.path.join(bpffs, "ebpf-tproxy"))
    return [p for p in out if p not in BASELINE_PINS]
