"""What each BPF program costs per run, during a new-connection load.

    python bench/hook_cost.py [--seconds 3] [--no-accelerate]

Sets kernel.bpf_stats_enabled for the duration of one wrk run (Connection: close,
through HAProxy, eBPF capture installed in the bench lab, with acceleration unless
--no-accelerate) and prints, for each of our
programs, how often it ran and its mean run time; restores the sysctl afterwards, also
on failure. Overhead: the stats themselves add two clock reads per program run.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as bench  # noqa: E402
from loader.lab import REMOTE_IP4, Lab  # noqa: E402

STATS = "/proc/sys/kernel/bpf_stats_enabled"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--accelerate", action=argparse.BooleanOptionalAction, default=True,
                    help="install with acceleration (the default) or without")
    args = ap.parse_args()
    old = open(STATS).read().strip()
    try:
        with Lab("cost") as lab:
            servers = bench.Servers(lab)
            servers.start(bench.VARIANTS["haproxy"])
            modes = bench.Modes(lab)
            modes.ebpf(accelerate=args.accelerate)
            with open(STATS, "w") as f:
                f.write("1")
            res = bench.wrk(lab, f"http://{REMOTE_IP4}:8080/", args.seconds, close=True)
            # the lab's own node set, loaded for this run: its counts are this run's
            progs = bench.prog_times(lab)
            modes.ebpf_off()
            servers.stop()
    finally:
        with open(STATS, "w") as f:
            f.write(old)
    print(f"{res['requests']} connections in {args.seconds} s ({res['rps']:.0f}/s)")
    total = 0
    for name, (run_time_ns, run_cnt) in progs.items():
        if run_cnt:
            total += run_time_ns
            print(f"  {name:20} {run_cnt / res['requests']:5.1f} runs/connection "
                  f"{run_time_ns / run_cnt:6.0f} ns/run")
    print(f"  BPF time per connection: {total / res['requests'] / 1000:.1f} µs")


if __name__ == "__main__":
    main()
