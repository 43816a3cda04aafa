"""What UDP pays for the per-datagram hooks: sendmsg4 and recvmsg4 on traffic that is not DNS.

    python bench/udp_cost.py [--reps 5] [--seconds 3] [--out bench/results]

cgroup/sendmsg4 and recvmsg4 run for every datagram an application in the cgroup sends or
receives on an unconnected socket (connect() decides a connected one once), also when
DNS capture is off, because the node program set serves every namespace (README, Design:
"UDP pays per datagram"). This measures that cost on datagrams the hooks leave alone (to
port 9999 of the lab's remote host), in three modes side by side:
  none     nothing installed for the lab's namespace (an idle namespace keeps the node
           set loaded, in a cgroup beside the lab's, as bench/run.py does)
  ebpf     installed with Kuma's defaults (DNS capture off)
  ebpf-dns installed with --redirect-all-dns-traffic (every UDP 53 captured)
Two loads, each a Python client in the application's namespace and cgroup:
  send     sendto() of 64-byte datagrams as fast as it can (sendmsg4 per datagram)
  echo     sendto() then recvfrom() of the echo (sendmsg4 and recvmsg4 per round trip)
Repetitions are interleaved (every mode once per repetition) and each rate is divided by
none's in the same repetition; bpf_enable_stats counts our programs' runs and run time
during the loads, so the nanoseconds per datagram are measured, not inferred. The client
is Python (a few microseconds per call), so the rate ratios are an upper bound of what a
C application would see; the nanoseconds are not diluted.

Written to bench/results/udp-<date>.json; a table is printed. Overhead: about 2 minutes;
lab addresses only.
"""
import argparse
import datetime
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as bench  # noqa: E402
from loader import bpfsys  # noqa: E402
from loader.lab import PYTHON, REMOTE_IP4, Lab  # noqa: E402

PORT = 9999
MODES = ("none", "ebpf", "ebpf-dns")
LOADS = ("send", "echo")
OURS = ("sendmsg4", "recvmsg4")

ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

CLIENT = r"""
import json, socket, sys, time
host, port, seconds, load = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
payload, n, lost = b"x" * 64, 0, 0
end = time.monotonic() + seconds
start = time.monotonic()
while time.monotonic() < end:
    for _ in range(100):
        if load == "send":
            s.sendto(payload, (host, port))
        else:
            s.sendto(payload, (host, port))
            try:
                s.recvfrom(2048)
            except socket.timeout:
                lost += 1
                continue
        n += 1
print(json.dumps({"datagrams": n, "seconds": time.monotonic() - start, "lost": lost}))
"""


def prog_stats(lab):
    """{name: (run_cnt, run_time_ns)} of our UDP programs (stats must be on)."""
    times = bench.prog_times(lab)
    return {n: (times[n][1], times[n][0]) for n in OURS}


def install(lab, mode):
    if mode == "none":
        return
    extra = ["--redirect-all-dns-traffic"] if mode == "ebpf-dns" else []
    r = lab.tproxy("install", "--kuma-dp-user", bench.DP, "--redirect-inbound=false", *extra)
    if r.returncode != 0:
        raise SystemExit(f"install failed: {r.stderr.strip()}")


def one_run(lab, mode, load, seconds):
    install(lab, mode)
    try:
        lab.run([PYTHON, "-c", CLIENT, REMOTE_IP4, str(PORT), "0.5", load], timeout=60)
        before = prog_stats(lab)
        r = lab.run([PYTHON, "-c", CLIENT, REMOTE_IP4, str(PORT), str(seconds), load],
                    timeout=seconds + 60)
        if r.returncode != 0:
            raise SystemExit(f"client failed: {r.stderr.strip()}")
        after = prog_stats(lab)
    finally:
        if mode != "none":
            lab.tproxy("uninstall")
    res = json.loads(r.stdout)
    if res["lost"] > 0.01 * max(1, res["datagrams"]):
        raise SystemExit(f"{mode} {load}: {res['lost']} echoes lost of {res['datagrams']}; "
                         "refusing to report its numbers")
    res["rate"] = res["datagrams"] / res["seconds"]
    res["programs"] = {n: {"runs": after[n][0] - before[n][0],
                           "run_time_ns": after[n][1] - before[n][1]} for n in OURS}
    runs = {n: res["programs"][n]["runs"] for n in OURS}
    if mode == "none" and any(runs.values()):
        raise SystemExit(f"our programs ran in mode none ({runs}): not a baseline")
    if mode != "none" and runs["sendmsg4"] < res["datagrams"]:
        raise SystemExit(f"{mode} {load}: sendmsg4 ran {runs['sendmsg4']} times for "
                         f"{res['datagrams']} datagrams: the hooks were not in the path")
    return res


def main():
    ap = argparse.ArgumentParser(
        description="The cost of the per-datagram UDP hooks (sendmsg4, recvmsg4) on "
                    "datagrams they leave alone: no capture vs installed, side by side.",
        epilog="example: python bench/udp_cost.py --reps 3 --seconds 2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--out", default=bench.RESULTS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("udp_cost needs root (namespaces, cgroup, BPF)")
    raw = {m: {ld: [] for ld in LOADS} for m in MODES}
    with Lab("udp") as lab:
        bench.register_others(lab, 1)
        lab.spawn([PYTHON, "-c", ECHO, str(PORT)], ns=lab.remote_ns, in_cgroup=False)
        stats_fd = bpfsys.enable_stats()
        try:
            for rep in range(args.reps):
                print(f"repetition {rep + 1}/{args.reps}", flush=True)
                for load in LOADS:
                    for m in MODES:
                        res = one_run(lab, m, load, args.seconds)
                        raw[m][load].append(res)
                        print(f"  {m:9} {load:5} {res['rate']:9.0f} /s", flush=True)
        finally:
            os.close(stats_fd)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": bench.machine(), "reps": args.reps, "seconds": args.seconds,
              "raw": raw, "summary": summarize(raw)}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, datetime.datetime.now().strftime("udp-%Y%m%d-%H%M%S.json"))
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    for line in summary_lines(result):
        print(line)
    print(f"(written to {path})")


def _stat(vals):
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def summarize(raw):
    """Per load: each mode's rate, its ratio to none paired by repetition, and our
    programs' runs and nanoseconds per datagram (or round trip)."""
    out = {}
    for load in LOADS:
        out[load] = {}
        for m in MODES:
            runs = raw[m][load]
            s = {"rate": _stat([r["rate"] for r in runs])}
            if m != "none":
                s["ratio"] = _stat([r["rate"] / b["rate"]
                                    for r, b in zip(runs, raw["none"][load])])
                for n in OURS:
                    s[n] = {"runs_per": _stat([r["programs"][n]["runs"] / r["datagrams"]
                                               for r in runs]),
                            "ns_per_run": _stat([r["programs"][n]["run_time_ns"]
                                                 / max(1, r["programs"][n]["runs"])
                                                 for r in runs])}
            out[load][m] = s
    return out


def summary_lines(result):
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cpus']} cores, kernel {m['kernel']}; medians of "
             f"{result['reps']} interleaved repetitions of {result['seconds']} s (min–max)",
             "", "| load | mode | per second | / none | sendmsg4 runs, ns each | "
             "recvmsg4 runs, ns each |", "|---|---|---|---|---|---|"]
    for load, per_mode in result["summary"].items():
        for mode, s in per_mode.items():
            def rng(x, fmt):
                return f"{fmt(x['median'])} ({fmt(x['min'])}–{fmt(x['max'])})"
            ratio = rng(s["ratio"], lambda v: f"{v:.2f}") if "ratio" in s else ""
            progs = [f"{s[n]['runs_per']['median']:.1f}, "
                     f"{rng(s[n]['ns_per_run'], lambda v: f'{v:.0f}')}"
                     if n in s and s[n]["runs_per"]["median"] else "" for n in OURS]
            lines.append(f"| {load} | {mode} | {rng(s['rate'], lambda v: f'{v:.0f}')} | "
                         f"{ratio} | {progs[0]} | {progs[1]} |")
    return lines


if __name__ == "__main__":
    main()
