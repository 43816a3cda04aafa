"""Where a new connection's CPU goes: no capture vs eBPF capture vs eBPF + acceleration.

    python bench/conn_profile.py [--seconds 3] [--reps 3] [--variant nbthread1] [--out DIR]

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
and reported (bench/results/conn-<date>.json and a table) as CPU microseconds per connection (samples / 999 / connections), with
the difference to no capture, for all processes and for HAProxy's alone (with nbthread 1
it is the bottleneck: a microsecond more there is a connection rate lower). Python (the
bench itself) is left out; idle CPU is shown apart. CPU time, not wall
time: it adds up both cores, so it is steadier than a rate on a busy VM, but frequency
and steal still move it (a few per cent between repetitions here).

Overhead: perf's sampling (~1 %); about 2 minutes. Needs root and perf (linux-perf).
"""
import argparse
import collections
import datetime
import json
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
    """perf script output -> (Counter of buckets, Counter of the leaf symbols of the
    samples that fell in "other kernel")."""
    counts, leaves = collections.Counter(), collections.Counter()
    for block in script.split("\n\n"):
        lines = block.strip().splitlines()
        if not lines:
            continue
        comm = lines[0].split()[0]
        if comm.startswith(SKIP_COMMS):
            continue
        if comm.startswith("swapper"):
            counts["idle"] += 1            # a CPU waiting: not work
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
        b = b or ("user" if user_leaf else "other kernel")
        counts[b] += 1
        if comm == "haproxy":
            counts["proxy " + b] += 1
        if b == "other kernel":
            leaves[frames[0]] += 1
    return counts, leaves


def profile_mode(lab, modes, mode, seconds, cpu):
    """One new-connection run of the bench (its warm-up and capture checks) with perf
    sampling every CPU for exactly as long as the measured wrk runs."""
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "perf.data")
        res = bench.run_mode(lab, modes, mode, seconds, "conn", cpu,
                             prefix=["perf", "record", "-q", "-a", "-g", "-F", str(FREQ),
                                     "-o", data, "--"])
        script = subprocess.run(["perf", "script", "-i", data, "-F", "comm,ip,sym,dso"],
                                capture_output=True, text=True).stdout
    counts, leaves = parse(script)
    per = 1e6 / FREQ / res["requests"]
    return ({b: counts.get(b, 0) * per for b in BUCKETS + tuple("proxy " + x for x in BUCKETS)
             + ("idle",)},
            {k: v * per for k, v in leaves.items()}, res["rps"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variant", default="nbthread1", choices=list(bench.VARIANTS))
    ap.add_argument("--out", default=bench.RESULTS, help="where conn-<date>.json goes")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("conn_profile needs root (namespaces, cgroup, BPF, perf)")
    v = bench.VARIANTS[args.variant]
    got = {m: [] for m in MODES}
    leaves = {m: collections.Counter() for m in MODES}
    with Lab("prof") as lab:
        servers = bench.Servers(lab)
        bench.register_others(lab, 1)      # keeps the node set loaded (bench/run.py)
        cpu = servers.start(v)
        modes = bench.Modes(lab, v.get("family", 4))
        try:
            for rep in range(args.reps):
                for m in MODES:
                    us, leaf, rate = profile_mode(lab, modes, m, args.seconds, cpu)
                    got[m].append(us)
                    leaves[m].update({k: v / args.reps for k, v in leaf.items()})
                    print(f"  {m:10} {rate:8.0f} conn/s  {sum(us[b] for b in BUCKETS):6.1f} "
                          "µs CPU per connection", flush=True)
        finally:
            servers.stop()
    med = {m: {b: statistics.median(r[b] for r in got[m]) for b in got[m][0]} for m in MODES}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, datetime.datetime.now().strftime("conn-%Y%m%d-%H%M%S.json"))
    with open(path, "w") as f:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "machine": bench.machine(), "variant": args.variant, "label": v["label"],
                   "reps": args.reps, "seconds": args.seconds, "freq_hz": FREQ,
                   "us_per_connection_median": med, "runs": got,
                   "other_kernel_leaves_mean": {m: dict(leaves[m].most_common(40))
                                                for m in MODES}}, f, indent=1)
    print(f"\nCPU µs per new connection, {v['label']}; medians of {args.reps} runs of "
          f"{args.seconds} s (perf -a -g at {FREQ} Hz); all processes, and HAProxy's share "
          "(its process, with the softirq work that ran in it):\n")
    print("| where | " + " | ".join(MODES) + " | " +
          " | ".join(f"{m} − none" for m in MODES[1:]) + " | HAProxy: " +
          " | ".join(MODES) + " |")
    print("|---|" + "---|" * (3 * len(MODES) - 1))
    for b in BUCKETS + ("total", "idle"):
        def val(m, prefix=""):
            if b == "total":
                return sum(med[m][prefix + x] for x in BUCKETS)
            return med[m].get(prefix + b, 0.0)
        proxy = " | ".join(f"{val(m, 'proxy '):.1f}" if b != "idle" else "" for m in MODES)
        print(f"| {b} | " + " | ".join(f"{val(m):.1f}" for m in MODES) + " | " +
              " | ".join(f"{val(m) - val('none'):+.1f}" for m in MODES[1:]) + f" | {proxy} |")
    print(f"\n(written to {path})")
    print("\n\"other kernel\" by the function sampled, the ten that grew most with capture "
          "(µs per connection, mean of the runs; irq-disabled time lands on the function that "
          "re-enables interrupts):\n")
    print("| function | none | ebpf | ebpf-accel |")
    print("|---|---|---|---|")
    grew = sorted(set(leaves["ebpf"]) | set(leaves["ebpf-accel"]),
                  key=lambda k: -(max(leaves["ebpf"][k], leaves["ebpf-accel"][k])
                                  - leaves["none"][k]))
    for k in grew[:10]:
        print(f"| {k} | " + " | ".join(f"{leaves[m][k]:.1f}" for m in MODES) + " |")


if __name__ == "__main__":
    main()

