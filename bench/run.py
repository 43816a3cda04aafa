"""make bench: our capture vs iptables vs no capture, side by side in one run, one lab.

    python bench/run.py [--reps 5] [--seconds 3] [--out bench/results]
    python bench/run.py --publish bench/results/20261122-173911.json   # re-render only

The same HAProxy (Debian's, as the DP user, beside the application in the cgroup) proxies
every mode to the same nginx on the lab's remote host; wrk (Debian's) is the client:
  (a) none      the client addresses the proxy explicitly (127.0.0.1:15002): the ceiling
  (b) iptables  Kuma's rules (loader.iptables_oracle) REDIRECT to 15001
  (c) ebpf      ebpf-tproxy installed, connect() redirected to 15001
  (d) ebpf-accel the same with --ebpf-accelerate: wrk <-> HAProxy bytes socket to socket
                (the HAProxy <-> nginx leg crosses the lab's veth, as it would leave a pod)
Workloads: new connections (Connection: close), request/response latency on persistent
connections (p50, p99), bulk throughput (an 8 MiB file); rule scaling: new-connection rate
with 10, 1,000 and 10,000 excluded CIDRs and ports for (b) and (c).
Reported: medians of --reps repetitions with min and max, and ratios to (a), in
bench/results/<date>.json, bench/results/summary.md, bench/results/chart.png and the
README's Speed table (between its bench:begin/end markers; never edited by hand).
A mode that did not capture (its redirect counter did not grow by the requests made), or
(d) without accelerated messages, stops the run: no number is reported for traffic that
bypassed what it claims to measure.

Overhead: runs ~5 minutes on 2 cores; loopback and veth only, lab addresses only.
State scaling (100,000 concurrent captured connections) is bench/state_scaling.py.
"""
import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT)

from loader import config, iptables_oracle  # noqa: E402
from loader.lab import REMOTE_IP4, Lab  # noqa: E402

DP = "nobody"
RESULTS = os.path.join(PROJECT, "bench", "results")
MODES = ("none", "iptables", "ebpf", "ebpf-accel")   # (a) (b) (c) (d)
NGINX = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx.err;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen 8080 reuseport backlog=4096;
        location = / {{ return 200 "ok\\n"; }}
        location = /big {{ root {dir}; }}
    }}
}}
"""
HAPROXY = """
global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend captured
    bind 0.0.0.0:15001
    default_backend original_destination
backend original_destination
    server orig 0.0.0.0:0
frontend explicit
    bind 127.0.0.1:15002
    default_backend remote
backend remote
    server remote {remote}:8080
"""


def sh(*cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)


def wrk(lab, url, seconds, conns=16, close=False, latency=False):
    args = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s"]
    args += ["-H", "Connection: close"] if close else []
    args += ["--latency"] if latency else []
    r = lab.run(args + [url], timeout=seconds + 60)
    if r.returncode != 0:
        raise SystemExit(f"wrk failed: {r.stderr}")
    out = r.stdout
    res = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
           "requests": int(re.search(r"(\d+) requests in", out).group(1))}
    m = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    res["bytes_per_s"] = float(m.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}.get(
        m.group(2), 1)
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m:
            res[f"p{pct}_us"] = float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        res["errors"] = errors.group(0)
    return res


class Modes:
    def __init__(self, lab):
        self.lab = lab

    def settings(self, n_rules=0):
        flags = {"kumaDPUser": DP}
        if n_rules:
            # excluded CIDRs that never match the benchmark's traffic, and as many ports
            flags["redirect.outbound.excludePortsForIPs"] = [
                f"10.{i // 256 % 256}.{i % 256}.0/24" for i in range(n_rules)]
            flags["redirect.outbound.excludePorts"] = f"20000-{20000 + n_rules - 1}"
        return config.load([], environ={}, flags=flags)[0]

    def iptables(self, n_rules=0):
        rules = iptables_oracle.rules(self.settings(n_rules), 4)
        sh("nsenter", f"--net=/run/netns/{self.lab.app_ns}", "iptables-restore", input=rules)

    def iptables_off(self):
        sh("nsenter", f"--net=/run/netns/{self.lab.app_ns}", "iptables", "-t", "nat", "-F")
        sh("nsenter", f"--net=/run/netns/{self.lab.app_ns}", "iptables", "-t", "nat", "-X")

    def iptables_captured(self):
        out = sh("nsenter", f"--net=/run/netns/{self.lab.app_ns}", "iptables", "-t", "nat",
                 "-L", "KUMA_MESH_OUTBOUND_REDIRECT", "-v", "-x", "-n").stdout
        return sum(int(line.split()[0]) for line in out.splitlines()[2:] if line.strip())

    def ebpf_accel(self):
        self.ebpf(accelerate=True)

    def ebpf_accelerated(self):
        st = json.loads(self.lab.tproxy("status", "--output", "json").stdout)
        return st[0]["counters"]["accel_msgs_redirected"] if st else 0

    def ebpf(self, n_rules=0, accelerate=False):
        s = self.settings(n_rules)
        cfg = {"redirect": {"outbound": {
            "excludePortsForIPs": list(s.outbound_exclude_ips),
            "excludePorts": config.compact_ports(s.outbound_exclude_ports)}},
            "kumaDPUser": DP}
        path = self.lab.shared_file("bench.json", json.dumps(cfg))
        r = self.lab.tproxy("install", "--config", path, "--redirect-inbound=false",
                            f"--ebpf-accelerate={str(accelerate).lower()}")
        if r.returncode != 0:
            raise SystemExit(f"install failed: {r.stderr}")

    def ebpf_off(self):
        self.lab.tproxy("uninstall")

    def ebpf_captured(self):
        st = json.loads(self.lab.tproxy("status", "--output", "json").stdout)
        return st[0]["counters"]["redirected_outbound"] if st else 0


def check_captured(mode, before, after, requests, close):
    got = after - before
    # keep-alive runs open only a few connections; Connection: close opens one per request
    need = requests * 0.9 if close else 1
    if got < need:
        raise SystemExit(f"mode {mode} did not capture: {got} redirected connections for "
                         f"{requests} requests; refusing to report its numbers")


def measure(lab, modes, mode, seconds, n_rules=0, workloads=("conn", "latency", "bulk")):
    url = "http://127.0.0.1:15002" if mode == "none" else f"http://{REMOTE_IP4}:8080"
    counter = {"iptables": modes.iptables_captured, "ebpf": modes.ebpf_captured,
               "ebpf-accel": modes.ebpf_captured}.get(mode)
    # One uncounted second first: a mode just switched on (programs loaded, rules
    # restored, caches cold) is not what a running pod sees.
    wrk(lab, url + "/", 1, close=True)
    out = {}
    for w in workloads:
        before = counter() if counter else 0
        accel_before = modes.ebpf_accelerated() if mode == "ebpf-accel" else 0
        if w == "conn":
            res = wrk(lab, url + "/", seconds, close=True)
        elif w == "latency":
            res = wrk(lab, url + "/", seconds, latency=True)
        else:
            res = wrk(lab, url + "/big", seconds, conns=4)
        if counter:
            check_captured(mode, before, counter(), res["requests"], w == "conn")
        if mode == "ebpf-accel" and modes.ebpf_accelerated() - accel_before < res["requests"]:
            raise SystemExit(f"mode ebpf-accel did not accelerate: fewer messages went socket "
                             f"to socket than the {res['requests']} requests made ({w}); "
                             "refusing to report its numbers")
        out[w] = res
    return out


def summarize(samples):
    out = {}
    for key in samples[0]:
        vals = [s[key] for s in samples if key in s]
        if vals and isinstance(vals[0], (int, float)):
            out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--out", default=RESULTS,
                    help="results directory (the README table is updated only for the default)")
    ap.add_argument("--publish", metavar="RESULT_JSON",
                    help="measure nothing: write summary.md, chart.png and the README table "
                    "from a saved run (bench/results/<date>.json)")
    args = ap.parse_args()
    if args.publish:
        with open(args.publish) as f:
            publish(os.path.dirname(os.path.abspath(args.publish)), json.load(f))
        return
    if os.geteuid() != 0:
        raise SystemExit("make bench needs root (namespaces, cgroup, BPF, iptables)")
    raw = {m: {w: [] for w in ("conn", "latency", "bulk")} for m in MODES}
    scaling = {f"{m}-{n}": [] for m in ("iptables", "ebpf") for n in (10, 1000, 10000)}
    with Lab("bench") as lab:
        tmp = lab.shared_file("x", "")
        d = os.path.dirname(tmp)
        with open(os.path.join(d, "big"), "wb") as f:
            f.write(os.urandom(8 << 20))
        nginx = lab.shared_file("nginx.conf", NGINX.format(dir=d))
        lab.spawn(["nginx", "-c", nginx, "-g", "daemon off;"], ns=lab.remote_ns,
                  in_cgroup=False, ready=None)
        lab.wait_listening(8080, ns=lab.remote_ns)
        hap = lab.shared_file("haproxy.cfg", HAPROXY.format(remote=REMOTE_IP4))
        proc = lab.spawn(["haproxy", "-db", "-f", hap], user=DP, ready=None)
        lab.wait_listening(15001, proc=proc)
        lab.wait_listening(15002, proc=proc)
        modes = Modes(lab)
        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", flush=True)
            for mode, on, off in (("none", None, None),
                                  ("iptables", modes.iptables, modes.iptables_off),
                                  ("ebpf", modes.ebpf, modes.ebpf_off),
                                  ("ebpf-accel", modes.ebpf_accel, modes.ebpf_off)):
                if on:
                    on()
                try:
                    for w, res in measure(lab, modes, mode, args.seconds).items():
                        raw[mode][w].append(res)
                        print(f"  {mode:10} {w:8} {res['rps']:10.0f} req/s", flush=True)
                finally:
                    if off:
                        off()
            for n in (10, 1000, 10000):
                for mode, on, off in (("iptables", modes.iptables, modes.iptables_off),
                                      ("ebpf", modes.ebpf, modes.ebpf_off)):
                    on(n)
                    try:
                        res = measure(lab, modes, mode, args.seconds, n, ("conn",))["conn"]
                        scaling[f"{mode}-{n}"].append(res)
                        print(f"  {mode:9} {n:5} rules {res['rps']:10.0f} conn/s", flush=True)
                    finally:
                        off()
    report(args, raw, scaling)


def machine():
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu": model}


def report(args, raw, scaling):
    os.makedirs(args.out, exist_ok=True)
    summary = {m: {w: summarize(v) for w, v in ws.items()} for m, ws in raw.items()}
    scale = {k: summarize(v) for k, v in scaling.items()}
    ratios = {}
    for m in MODES[1:]:
        for w, key in (("conn", "rps"), ("latency", "p50_us"), ("latency", "p99_us"),
                       ("bulk", "bytes_per_s")):
            base = summary["none"][w][key]["median"]
            ratios[f"{m} {w} {key}"] = summary[m][w][key]["median"] / base
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": machine(), "reps": args.reps, "seconds": args.seconds,
              "summary": summary, "rule_scaling": scale, "ratios_to_none": ratios}
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(args.out, f"{stamp}.json"), "w") as f:
        json.dump(result, f, indent=1)
    publish(args.out, result)


def publish(out, result):
    """summary.md, chart.png and (for the default results directory) the README's table,
    all from one run's result."""
    lines = summary_lines(result)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    chart(out, result["summary"], result["rule_scaling"])
    if os.path.abspath(out) == os.path.abspath(RESULTS):
        update_readme(lines)
        print(f"README.md: table between {README_BEGIN} and {README_END} updated")


def summary_lines(result):
    """The Markdown tables of one run (summary.md and the README's Speed block)."""
    summary, scale = result["summary"], result["rule_scaling"]
    ratios = result["ratios_to_none"]
    lines = [f"Machine: {result['machine']['cpu']}, {result['machine']['cpus']} cores, "
             f"kernel {result['machine']['kernel']}; medians of {result['reps']} runs of "
             f"{result['seconds']} s (min–max), HAProxy 2.6 as the proxy, wrk as the client.", "",
             "| workload | (a) no capture | (b) iptables | (c) eBPF | (d) eBPF + accel "
             "| (b)/(a) | (c)/(a) | (d)/(a) |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(m, w, key, fmt):
        v = summary[m][w][key]
        return f"{fmt(v['median'])} ({fmt(v['min'])}–{fmt(v['max'])})"
    rows = (("new connections/s", "conn", "rps", lambda x: f"{x:.0f}"),
            ("latency p50 (µs)", "latency", "p50_us", lambda x: f"{x:.0f}"),
            ("latency p99 (µs)", "latency", "p99_us", lambda x: f"{x:.0f}"),
            ("bulk MB/s", "bulk", "bytes_per_s", lambda x: f"{x / 1e6:.0f}"))
    for label, w, key, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(cell(m, w, key, fmt) for m in MODES) + " | "
                     + " | ".join(f"{ratios[f'{m} {w} {key}']:.2f}" for m in MODES[1:])
                     + " |")
    lines += ["", "| excluded CIDRs + ports | (b) iptables conn/s | (c) eBPF conn/s |",
              "|---|---|---|"]
    for n in (10, 1000, 10000):
        b, c = scale[f"iptables-{n}"]["rps"], scale[f"ebpf-{n}"]["rps"]
        lines.append(f"| {n} | {b['median']:.0f} ({b['min']:.0f}–{b['max']:.0f}) | "
                     f"{c['median']:.0f} ({c['min']:.0f}–{c['max']:.0f}) |")
    return lines


README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def update_readme(lines, path=os.path.join(PROJECT, "README.md")):
    """Replace the README's table block with this run's (the only way it is written)."""
    with open(path) as f:
        text = f.read()
    a, b = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    with open(path, "w") as f:
        f.write(text[:a] + "\n" + "\n".join(lines) + "\n" + text[b:])


def chart(out, summary, scale):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = ["conn/s", "p50", "p99", "MB/s"]
    keys = [("conn", "rps"), ("latency", "p50_us"), ("latency", "p99_us"),
            ("bulk", "bytes_per_s")]
    for i, m in enumerate(MODES[1:]):
        vals = [summary[m][w][k]["median"] / summary["none"][w][k]["median"] for w, k in keys]
        ax1.bar([x + i * 0.28 for x in range(4)], vals, width=0.28, label=m)
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_xticks([x + 0.28 for x in range(4)], labels)
    ax1.set_title("ratio to no capture (latency: lower is better)")
    ax1.legend()
    for m in ("iptables", "ebpf"):
        ax2.plot([10, 1000, 10000], [scale[f"{m}-{n}"]["rps"]["median"]
                                     for n in (10, 1000, 10000)], marker="o", label=m)
    ax2.set_xscale("log")
    ax2.set_title("new connections/s vs excluded CIDRs and ports")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "chart.png"), dpi=100)


if __name__ == "__main__":
    main()
