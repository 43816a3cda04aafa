"""Where a new connection's CPU goes: no capture vs eBPF capture vs eBPF + acceleration.

    python bench/conn_profile.py [--seconds 3] [--reps 3] [--variant nbthread1]

make bench reports what new connections cost as a ratio; this says why. In the bench lab
(HAProxy, nginx, wrk with Connection: close; bench/run.py's set-ups) each mode runs wrk
while `perf record -a -g` samples every CPU at 999 Hz. Each sample is put in the first
bucket one of its kernel frames belongs to (leaf first):
  our programs     bpf_prog_* of the node set (connect4, sock_ops, getsockopt, ...)
  sk_storage       creating and freeing our per-socket storage (bpf_sk_storage_*,
                   bpf_local_storage_*)
  sockmap          acceleration: joining and leaving the sockhash, sk_msg redirects
                   (tcp_bpf_*, sock_map_*, sk_psock_*, sk_msg_*)
  getsockopt       the proxy's getsockopt(SO_ORIGINAL_DST) syscall (around our program)
  getsockname      getsockname()/getpeername() syscalls
  other kernel     everything else in the kernel (TCP/IP, scheduler, ...)
  user             HAProxy's, nginx's and wrk's own code
and reported as CPU microseconds per connection (samples / 999 / connections), with
the difference to no capture. Python (the bench itself) is left out. CPU time, not wall
time: it adds up both cores, so it is steadier than a rate on a busy VM, but frequency
and steal still move it (a few per cent between repetitions here).

Overhead: perf's sampling (~1 %); about 2 minutes. Needs root and perf (linux-perf).
"""
import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as bench  # noqa: E402
from loader.lab import Lab  # noqa: E402
from loader.programs import PROGRAMS  # noqa: E402

FREQ = 999
MODES = ("none", "ebpf", "ebpf-accel")
BUCKETS = ("our programs", "sk_storage", "sockmap", "getsockopt", "getsockname",
           "other kernel", "user")
# the kernel names a program by its BTF name, or the 15 characters it keeps without BTF
OURS = tuple({n for p in PROGRAMS for n in (p.name, p.name[:15])})
RULES = (("sk_storage", re.compile(r"^(bpf_sk_storage_|bpf_local_storage_|"
                                   r"bpf_selem_)")),
         ("sockmap", re.compile(r"^(tcp_bpf_|sock_map_|sk_psock_|sk_msg_|bpf_tcp_ingress)")),
         ("getsockopt", re.compile(r"^__sys_getsockopt$")),
         ("getsockname", re.compile(r"^__sys_get(sock|peer)name$")))
SKIP_COMMS = ("python", "perf")


def parse(script):
    """perf script output -> Counter of buckets (samples)."""
    counts = collections.Counter()
    for block in script.split("\n\n"):
        lines = block.strip().splitlines()
        if not lines:
            continue
        comm = lines[0].split()[0]
        if comm.startswith(SKIP_COMMS):
            continue
        frames, user_leaf = [], None
        for line in lines[1:]:
            parts = line.split(None, 2)
            if len(parts) < 2:
                continue
            sym = parts[1].split("+")[0]
            dso = parts[2] if len(parts) > 2 else ""
            if user_leaf is None:
                user_leaf = "kernel.kallsyms" not in dso and "[bpf_prog]" not in dso and \
                    not sym.startswith("bpf_prog_")
            frames.append(sym)
        if not frames:
            continue
        b = None
        for f in frames:
            if f.startswith("bpf_prog_") and any(f.endswith("_" + n) for n in OURS):
                b = "our programs"
                break
            for name, rx in RULES:
                if rx.match(f):
                    b = name
                    break
            if b:
                break
        counts[b or ("user" if user_leaf else "other kernel")] += 1
    return counts


def profile_mode(lab, modes, mode, seconds, cpu):
    on, off, _ = modes.switch(mode)
    if on:
        on()
    try:
        url = bench.url_of(mode, modes.family)
        bench.wrk(lab, url + "/", 1, close=True, cpu=cpu)   # uncounted warm-up
        with tempfile.TemporaryDirectory() as d:
            data = os.path.join(d, "perf.data")
            perf = subprocess.Popen(["perf", "record", "-a", "-g", "-F", str(FREQ), "-o", data,
                                     "--", "sleep", str(seconds + 1)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            res = bench.wrk(lab, url + "/", seconds, close=True, cpu=cpu)
            perf.wait()
            script = subprocess.run(["perf", "script", "-i", data, "-F", "comm,ip,sym,dso"],
                                    capture_output=True, text=True).stdout
    finally:
        if off:
            off()
    counts = parse(script)
    # the perf window is the wrk run plus up to a second around it: count its connections
    # at the run's own rate over the window's length
    conns = res["rps"] * (seconds + 1)
    return {b: counts.get(b, 0) / FREQ / conns * 1e6 for b in BUCKETS}, res["rps"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variant", default="nbthread1", choices=list(bench.VARIANTS))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("conn_profile needs root (namespaces, cgroup, BPF, perf)")
    v = bench.VARIANTS[args.variant]
    got = {m: [] for m in MODES}
    with Lab("prof") as lab:
        servers = bench.Servers(lab)
        bench.register_others(lab, 1)      # keeps the node set loaded (bench/run.py)
        cpu = servers.start(v)
        modes = bench.Modes(lab, v.get("family", 4))
        try:
            for rep in range(args.reps):
                for m in MODES:
                    us, rate = profile_mode(lab, modes, m, args.seconds, cpu)
                    got[m].append(us)
                    print(f"  {m:10} {rate:8.0f} conn/s  {sum(us.values()):6.1f} µs CPU per "
                          "connection", flush=True)
        finally:
            servers.stop()
    med = {m: {b: statistics.median(r[b] for r in got[m]) for b in BUCKETS} for m in MODES}
    print(f"\nCPU µs per new connection, {v['label']}; medians of {args.reps} runs of "
          f"{args.seconds} s (perf -a -g at {FREQ} Hz):\n")
    print("| where | " + " | ".join(MODES) + " | " +
          " | ".join(f"{m} − none" for m in MODES[1:]) + " |")
    print("|---|" + "---|" * (2 * len(MODES) - 1))
    for b in BUCKETS + ("total",):
        vals = {m: (sum(med[m].values()) if b == "total" else med[m][b]) for m in MODES}
        print(f"| {b} | " + " | ".join(f"{vals[m]:.1f}" for m in MODES) + " | " +
              " | ".join(f"{vals[m] - vals['none']:+.1f}" for m in MODES[1:]) + " |")


if __name__ == "__main__":
    main()
