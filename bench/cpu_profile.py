"""Where the CPU goes, per connection, per request and per megabyte: no capture vs eBPF
capture vs eBPF + acceleration.

    python bench/cpu_profile.py [--workloads conn,latency,bulk] [--seconds 3] [--reps 3]
                                [--variant nbthread1] [--out DIR]

make bench reports each workload as a ratio to no capture; this says why. In the bench
lab (HAProxy, nginx, wrk; bench/run.py's set-ups and workloads: conn = new connections
with Connection: close, latency = keep-alive requests, bulk = an 8 MiB file over
keep-alive) each mode runs wrk while `perf record -a -g` samples every CPU at 999 Hz.
Each sample is put in the first bucket one of its kernel frames belongs to (leaf first;
user-space frames never match, a CPU in its idle loop is idle):
  our programs     bpf_prog_* of the node set (connect4, sock_ops, getsockopt, ...)
  sk_storage       creating and freeing our per-socket storage (bpf_sk_storage_*,
                   bpf_local_storage_*)
  sockmap          acceleration: joining and leaving the sockhash, sk_msg redirects and
                   the receive from the psock's queue (tcp_bpf_*, sock_map_*, sock_hash_*,
                   sk_psock_*, sk_msg_*, bpf_msg_redirect_*)
  getsockopt       the proxy's getsockopt(SO_ORIGINAL_DST) syscall (around our program)
  getsockname      getsockname()/getpeername() syscalls
  tcp/ip           TCP and IP send and receive, loopback and veth, the packets' softirq
                   (tcp_*, inet_*, ip_*, ip6_*, netif_*, skb_*, veth_*, loopback_xmit):
                   what acceleration takes off the application-proxy hop
  other kernel     everything else in the kernel (syscall entry, scheduler, memory, ...)
  user             HAProxy's, nginx's and wrk's own code
and reported (bench/results/profile-<date>.json and a table per workload) as CPU
microseconds per unit: per connection (conn), per request (latency), per MB (bulk), i.e.
samples / 999 / units, with the difference to no capture, for all processes and for
HAProxy's alone (with nbthread 1 it is the bottleneck: a microsecond more there is a rate
lower). Python (the bench itself) is left out; idle CPU is shown apart. CPU time, not wall
time: it adds up both cores, so it is steadier than a rate on a busy VM, but frequency and
steal still move it (a few per cent between repetitions here).

What bounds acceleration: in (a) the tcp/ip bucket holds both hops (wrk to HAProxy, HAProxy
to nginx); acceleration can take off at most the first, and not its copies of the bytes
(sk_msg copies them too). So the best (d) can do on a CPU-bound run is
total / (total - (tcp/ip - copies) / 2) (both hops carry the same bytes), which the table
prints beside the ratio of CPU per unit that was measured (keep-alive and bulk only: a new
connection's handshake and close stay on TCP).

Overhead: perf's sampling (~1 %); about 2 minutes per workload. Needs root and perf
(linux-perf).
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
           "tcp/ip", "other kernel", "user")
WORKLOADS = bench.WORKLOADS
# what one unit of each workload is, and how many a wrk run made
UNITS = {"conn": ("connection", lambda res, seconds: res["requests"]),
         "latency": ("request", lambda res, seconds: res["requests"]),
         "bulk": ("MB", lambda res, seconds: res["bytes_per_s"] * seconds / 1e6)}
# the kernel names a program by its BTF name, or the 15 characters it keeps without BTF
OURS = tuple({n for p in PROGRAMS for n in (p.name, p.name[:15])})
# Matched against kernel frames only (HAProxy or libc may have a tcp_* or inet_* of their
# own), leaf first: a sample belongs to the nearest frame a rule names.
RULES = (("sk_storage", re.compile(r"^(bpf_sk_storage_|bpf_local_storage_|"
                                   r"bpf_selem_)")),
         # the helpers our programs call to join and redirect count here, not as ours,
         # like the storage helpers above; leading underscores: __sk_msg_recvmsg
         ("sockmap", re.compile(r"^_*(tcp_bpf_|sock_map_|sock_hash_|bpf_sock_hash_|"
                                r"sk_psock_|sk_msg_|bpf_tcp_ingress|bpf_msg_redirect_|"
                                r"bpf_sk_redirect_)")),
         ("getsockopt", re.compile(r"^__sys_getsockopt$")),
         ("getsockname", re.compile(r"^__sys_get(sock|peer)name$")),
         # last: tcp_bpf_* above is the sockmap's
         ("tcp/ip", re.compile(r"^(tcp_|__tcp_|inet6?_|__inet6?_|ip6?_|__ip6?_|"
                               r"ipv6_|__netif_|netif_|net_rx_action|process_backlog|"
                               r"__napi_poll|loopback_xmit|veth_|__dev_queue_xmit|"
                               r"dev_hard_start_xmit|skb_|__skb_|__alloc_skb|kfree_skb|"
                               r"consume_skb|sk_stream_|nf_)")))
SKIP_COMMS = ("python", "perf")


def _kernel(sym, dso):
    return "kernel.kallsyms" in dso or "[bpf_prog]" in dso or sym.startswith("bpf_prog_")


def classify(frames):
    """The bucket of one sample from its frames, leaf first, as (symbol, in the kernel?);
    None if no kernel frame is claimed by a bucket."""
    for sym, kernel in frames:
        if not kernel:
            continue
        if sym.startswith("bpf_prog_") and any(sym.endswith("_" + n) for n in OURS):
            return "our programs"
        for name, rx in RULES:
            if rx.match(sym):
                return name
    return None


def parse(script):
    """perf script output -> (Counter of buckets, {bucket: Counter of the leaf symbols
    sampled in it}) for the kernel's buckets. A sample of an idle CPU (swapper) is idle
    unless a bucket claims it: packet receive, and the RCU frees of our storage and the
    sockhash, also run there."""
    counts, leaves = collections.Counter(), collections.defaultdict(collections.Counter)
    for block in script.split("\n\n"):
        lines = block.strip().splitlines()
        if not lines:
            continue
        comm = lines[0].split()[0]
        if comm.startswith(SKIP_COMMS):
            continue
        frames = []
        for line in lines[1:]:
            parts = line.split(None, 2)
            if len(parts) < 2:
                continue
            sym = parts[1].split("+")[0]
            frames.append((sym, _kernel(sym, parts[2] if len(parts) > 2 else "")))
        if not frames:
            continue
        b = classify(frames)
        if comm.startswith("swapper") and b is None:
            counts["idle"] += 1            # a CPU waiting: not work
            continue
        b = b or ("other kernel" if frames[0][1] else "user")
        counts[b] += 1
        if comm == "haproxy":
            counts["proxy " + b] += 1
        if b != "user":
            leaves[b][frames[0][0]] += 1
    return counts, dict(leaves)


def profile_mode(lab, modes, mode, workload, seconds, cpu):
    """One run of one workload of the bench (its warm-up and capture checks) with perf
    sampling every CPU for exactly as long as the measured wrk runs."""
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "perf.data")
        res = bench.run_mode(lab, modes, mode, seconds, workload, cpu,
                             prefix=["perf", "record", "-q", "-a", "-g", "-F", str(FREQ),
                                     "-o", data, "--"])
        script = subprocess.run(["perf", "script", "-i", data, "-F", "comm,ip,sym,dso"],
                                capture_output=True, text=True).stdout
    counts, leaves = parse(script)
    per = 1e6 / FREQ / UNITS[workload][1](res, seconds)
    us = {b: counts.get(b, 0) * per for b in BUCKETS + tuple("proxy " + x for x in BUCKETS)
          + ("idle",)}
    us["tcp/ip copies"] = per * sum(v for k, v in leaves.get("tcp/ip", {}).items()
                                    if COPIES.match(k))
    return us, {b: {k: v * per for k, v in c.items()} for b, c in leaves.items()}, res["rps"]


# Copying the bytes between user memory and the kernel: sk_msg copies them too (into the
# message on send, out of it on receive), so acceleration cannot take this part off.
COPIES = re.compile(r"^(_copy_(to|from)_iter|copy_user_|rep_movs|memcpy|__memcpy|"
                    r"copy_page_(to|from)_iter)")


def acceleration_bound(run):
    """The most (d) could gain over (a) on a CPU-bound run if acceleration took the whole
    application-proxy hop's TCP/IP off and added nothing, from one run of (a): half of its
    tcp/ip bucket (both hops carry the same bytes) less the copies sk_msg makes as well.
    Not for new connections: their handshakes and closes stay on TCP."""
    total = sum(run[b] for b in BUCKETS)
    return total / (total - max(0.0, run["tcp/ip"] - run["tcp/ip copies"]) / 2)


def profile_workload(lab, modes, workload, args, cpu):
    got = {m: [] for m in MODES}
    leaves = {m: collections.defaultdict(collections.Counter) for m in MODES}
    rates = {m: [] for m in MODES}
    unit = UNITS[workload][0]
    print(f"{workload}:", flush=True)
    for rep in range(args.reps):
        for m in MODES:
            us, leaf, rate = profile_mode(lab, modes, m, workload, args.seconds, cpu)
            got[m].append(us)
            rates[m].append(rate)
            for b, c in leaf.items():
                leaves[m][b].update({k: v / args.reps for k, v in c.items()})
            print(f"  {m:10} {rate:8.0f} req/s  {sum(us[b] for b in BUCKETS):7.1f} "
                  f"µs CPU per {unit}", flush=True)
    med = {m: {b: statistics.median(r[b] for r in got[m]) for b in got[m][0]} for m in MODES}
    return {"unit": unit, "us_median": med, "runs": got, "rates": rates,
            "leaves_mean": {m: {b: dict(c.most_common(40)) for b, c in leaves[m].items()}
                            for m in MODES},
            "acceleration_bound": None if workload == "conn" else
            statistics.median(acceleration_bound(x) for x in got["none"])}


def print_workload(workload, r, args, label):
    med, unit = r["us_median"], r["unit"]
    print(f"\nCPU µs per {unit} ({workload}), {label}; medians of {args.reps} runs of "
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
    total = {m: sum(med[m][b] for b in BUCKETS) for m in MODES}
    print(f"\nCPU per {unit}, none / mode (what a CPU-bound rate ratio follows): " +
          ", ".join(f"{m} {total['none'] / total[m]:.2f}" for m in MODES[1:]) +
          ("" if r["acceleration_bound"] is None else
           "; the most acceleration could give (half of none's tcp/ip but its copies taken "
           f"off, nothing added; median of the runs): {r['acceleration_bound']:.2f}"))
    def leaves(bucket):
        return {m: collections.Counter(r["leaves_mean"][m].get(bucket, {})) for m in MODES}

    print("\n\"other kernel\" by the function sampled, the ten that grew most with capture "
          f"(µs per {unit}, mean of the runs; irq-disabled time lands on the function that "
          "re-enables interrupts):\n")
    other = leaves("other kernel")
    print("| function | none | ebpf | ebpf-accel |")
    print("|---|---|---|---|")
    grew = sorted(set(other["ebpf"]) | set(other["ebpf-accel"]),
                  key=lambda k: -(max(other["ebpf"][k], other["ebpf-accel"][k])
                                  - other["none"][k]))
    for k in grew[:10]:
        print(f"| {k} | " + " | ".join(f"{other[m][k]:.1f}" for m in MODES) + " |")
    print("\nWhat acceleration trades: tcp/ip (none) against sockmap (ebpf-accel), the five "
          f"functions sampled most in each (µs per {unit}):\n")
    print("| bucket | function | none | ebpf-accel |")
    print("|---|---|---|---|")
    for bucket, mode in (("tcp/ip", "none"), ("sockmap", "ebpf-accel")):
        c = leaves(bucket)
        for k, _v in c[mode].most_common(5):
            print(f"| {bucket} | {k} | {c['none'][k]:.1f} | {c['ebpf-accel'][k]:.1f} |")


def main():
    ap = argparse.ArgumentParser(
        description="Where the CPU goes per new connection, keep-alive request and MB of "
                    "bulk: no capture vs eBPF vs eBPF + acceleration (perf record -a -g).",
        epilog="example: python bench/cpu_profile.py --workloads latency --reps 3")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated, of {', '.join(WORKLOADS)} (default: all)")
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variant", default="nbthread1", choices=list(bench.VARIANTS))
    ap.add_argument("--out", default=bench.RESULTS, help="where profile-<date>.json goes")
    args = ap.parse_args()
    workloads = [w for w in args.workloads.split(",") if w]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad or not workloads:
        ap.error(f"--workloads: {', '.join(bad) or 'none given'}: choose from "
                 f"{', '.join(WORKLOADS)}")
    if os.geteuid() != 0:
        raise SystemExit("cpu_profile needs root (namespaces, cgroup, BPF, perf)")
    v = bench.VARIANTS[args.variant]
    out = {}
    with Lab("prof") as lab:
        servers = bench.Servers(lab)
        bench.register_others(lab, 1)      # keeps the node set loaded (bench/run.py)
        cpu = servers.start(v)
        modes = bench.Modes(lab, v.get("family", 4))
        try:
            for w in workloads:
                out[w] = profile_workload(lab, modes, w, args, cpu)
        finally:
            servers.stop()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out,
                        datetime.datetime.now().strftime("profile-%Y%m%d-%H%M%S.json"))
    with open(path, "w") as f:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "machine": bench.machine(), "variant": args.variant, "label": v["label"],
                   "reps": args.reps, "seconds": args.seconds, "freq_hz": FREQ,
                   "buckets": BUCKETS, "workloads": out}, f, indent=1)
    for w in workloads:
        print_workload(w, out[w], args, v["label"])
    print(f"\n(written to {path})")


if __name__ == "__main__":
    main()

