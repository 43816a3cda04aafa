"""make bench: our capture vs iptables vs no capture, side by side in one run, one lab.

    python bench/run.py [--reps 5] [--seconds 3] [--variants haproxy,nbthread1,...]
    python bench/run.py --publish bench/results/20261201-222447.json   # re-render only

The same HAProxy (Debian's, as the DP user, beside the application in the cgroup) proxies
every mode to the same nginx on the lab's remote host; wrk (Debian's) is the client:
  (a) none       the client addresses the proxy explicitly (127.0.0.1:15002): the ceiling
  (b) iptables   Kuma's rules (loader.iptables_oracle) REDIRECT to 15001
  (c) ebpf       ebpf-tproxy installed with --ebpf-accelerate=false
  (d) ebpf-accel the same with acceleration (the default where the kernel has it): wrk <->
                 HAProxy bytes socket to socket (the HAProxy <-> nginx leg crosses the
                 lab's veth, as it would leave a pod)
Workloads: new connections (Connection: close), keep-alive requests with their latency
(p50, p99), bulk throughput (an 8 MiB file); rule scaling: new-connection rate with 10,
1,000 and 10,000 excluded CIDRs and ports for (b) and (c).
Variants (issue 16), each a separate proxy set-up measured with (a), (c) and (d):
  haproxy    HAProxy with its default threads (one per CPU), IPv4; all modes
  nbthread1  HAProxy with one thread, pinned to CPU 1, wrk and nginx on CPU 0
  reuseport  HAProxy with two SO_REUSEPORT listeners on 15001, one per thread (Envoy opens
             one per worker)
  ipv6       the same over IPv6 (HAProxy 2.6 asks SO_ORIGINAL_DST for IPv4 only, so its
             captured IPv6 frontend forwards to the upstream it is configured with: capture,
             recording and acceleration are measured, the getsockopt answer is not)
  node250    the haproxy set-up on a node with 250 registered namespaces
Repetitions are interleaved: for each repetition and workload every mode runs once, back
to back, so each ratio to (a) is taken within one repetition (paired) and the reported ratio
is the median of those; the machine's drift between repetitions (runs spread by +-10 % on
these 2-core VMs) then cancels instead of landing in one mode. The node program set stays
loaded throughout (an idle namespace is registered first, attached to a cgroup beside the
lab's): switching a mode on is a warm install, no node set is torn down in the background
of a measurement, and (a) runs none of our programs.
Reported: medians of --reps repetitions with min and max, paired ratios, and whether each
of issue 16's goals was met, in bench/results/<date>.json, bench/results/summary.md,
bench/results/chart.png and the README's Speed table (between its bench:begin/end markers;
never edited by hand). A mode that did not capture (its redirect counter did not grow by
the requests made), or (d) without accelerated messages, stops the run: no number is
reported for traffic that bypassed what it claims to measure.

Overhead: about 25 minutes on 2 cores; loopback and veth only, lab addresses only.
State scaling (100,000 concurrent captured connections) is bench/state_scaling.py, the node
model (many namespaces, install times) bench/node_scaling.py, each program's run time
bench/hook_cost.py.
"""
import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT)

from loader import bpfsys, config, iptables_oracle  # noqa: E402
from loader.node import NodePaths, read_meta  # noqa: E402
from loader.lab import REMOTE_IP4, REMOTE_IP6, Lab  # noqa: E402

DP = "nobody"
RESULTS = os.path.join(PROJECT, "bench", "results")
MODES = ("none", "iptables", "ebpf", "ebpf-accel")   # (a) (b) (c) (d)
WORKLOADS = ("conn", "latency", "bulk")
# (workload, wrk result key, label, higher is better)
METRICS = (("conn", "rps", "new connections/s", True),
           ("latency", "rps", "keep-alive requests/s", True),
           ("latency", "p50_us", "latency p50 (µs)", False),
           ("latency", "p99_us", "latency p99 (µs)", False),
           ("bulk", "bytes_per_s", "bulk MB/s", True))
VARIANTS = {
    "haproxy": {"label": "HAProxy, default threads, IPv4", "modes": MODES},
    "nbthread1": {"label": "HAProxy nbthread 1 (pinned to CPU 1; wrk, nginx on CPU 0)",
                  "threads": 1, "pin": True},
    "reuseport": {"label": "HAProxy, 2 SO_REUSEPORT listeners (one per thread)",
                  "threads": 2, "reuseport": True},
    "ipv6": {"label": "IPv6 (HAProxy's upstream fixed: no IPv6 SO_ORIGINAL_DST in 2.6)",
             "family": 6},
    "node250": {"label": "250 namespaces registered on the node", "namespaces": 250},
}
VARIANT_MODES = ("none", "ebpf", "ebpf-accel")
# Issue 16's goals: (workload, key, mode, bound, at least?) as ratios to (a).
GOALS = (("conn", "rps", "ebpf", 0.95, True), ("conn", "rps", "ebpf-accel", 0.95, True),
         ("latency", "rps", "ebpf-accel", 1.15, True),
         ("latency", "p99_us", "ebpf-accel", 0.85, False),
         ("bulk", "bytes_per_s", "ebpf-accel", 1.1, True))
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
        listen [::]:8080 ipv6only=on reuseport backlog=4096;
        location = / {{ return 200 "ok\\n"; }}
        location = /big {{ root {dir}; }}
    }}
}}
"""


def haproxy_config(remote4=REMOTE_IP4, remote6=REMOTE_IP6, threads=None, reuseport=False):
    """HAProxy in mode tcp: `captured` on 15001 forwards to each connection's original
    destination (SO_ORIGINAL_DST, as Envoy's outbound listener); `explicit` (15002, 15003
    for IPv6) is what the client addresses in mode (a)."""
    captured = ("    bind 0.0.0.0:15001 thread 1\n    bind 0.0.0.0:15001 thread 2\n"
                if reuseport else "    bind 0.0.0.0:15001\n")
    return ("global\n    maxconn 8000\n" + (f"    nbthread {threads}\n" if threads else "") +
            "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n"
            "    timeout server 60s\n"
            f"frontend captured\n{captured}    default_backend original_destination\n"
            "backend original_destination\n    server orig 0.0.0.0:0\n"
            "frontend captured6\n    bind ipv6@:::15001 v6only\n    default_backend remote6\n"
            "frontend explicit\n    bind 127.0.0.1:15002\n    default_backend remote\n"
            "frontend explicit6\n    bind ipv6@::1:15003\n    default_backend remote6\n"
            f"backend remote\n    server remote {remote4}:8080\n"
            f"backend remote6\n    server remote6 ipv6@{remote6}:8080\n")


def sh(*cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)


class Stalled(Exception):
    """wrk did not finish long after its duration (seen over IPv6 under connection churn;
    README, Speed): the run is recorded as stalled, not as a number."""


def wrk(lab, url, seconds, conns=16, close=False, latency=False, cpu=None, prefix=()):
    """One wrk run from the application's place (its netns and cgroup), pinned to cpu if
    given, under prefix (a command that runs it, such as perf record)."""
    args = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s"]
    args += ["-H", "Connection: close"] if close else []
    args += ["--latency"] if latency else []
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    # timeout(1) kills wrk itself; lab.run's own limit would leave it running
    r = lab.run(["timeout", "-s", "KILL", str(seconds + 30)] + list(prefix) + pin + args +
                [url], timeout=seconds + 60)
    if r.returncode in (124, 137):
        raise Stalled(f"wrk {url} did not finish within {seconds + 30} s")
    if r.returncode != 0:
        raise SystemExit(f"wrk failed: {r.stderr}")
    out = r.stdout
    res = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
           "requests": int(re.search(r"(\d+) requests in", out).group(1))}
    m = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    # wrk's units are binary (its MB is 2^20 bytes)
    res["bytes_per_s"] = float(m.group(1)) * {"B": 1, "KB": 1 << 10, "MB": 1 << 20,
                                              "GB": 1 << 30}.get(m.group(2), 1)
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m:
            res[f"p{pct}_us"] = float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        res["errors"] = errors.group(0)
    return res


class Modes:
    """Switching the lab's application namespace between the modes (a)-(d)."""

    def __init__(self, lab, family=4):
        self.lab = lab
        self.family = family

    def settings(self, n_rules=0):
        flags = {"kumaDPUser": DP}
        if n_rules:
            # excluded CIDRs that never match the benchmark's traffic, and as many ports
            flags["redirect.outbound.excludePortsForIPs"] = [
                f"10.{i // 256 % 256}.{i % 256}.0/24" for i in range(n_rules)]
            flags["redirect.outbound.excludePorts"] = f"20000-{20000 + n_rules - 1}"
        return config.load([], environ={}, flags=flags)[0]

    def _nsenter(self, *cmd, **kw):
        return sh("nsenter", f"--net=/run/netns/{self.lab.app_ns}", *cmd, **kw)

    def _tool(self):
        return "iptables" if self.family == 4 else "ip6tables"

    def iptables(self, n_rules=0):
        rules = iptables_oracle.rules(self.settings(n_rules), self.family)
        self._nsenter(f"{self._tool()}-restore", input=rules)

    def iptables_off(self):
        self._nsenter(self._tool(), "-t", "nat", "-F")
        self._nsenter(self._tool(), "-t", "nat", "-X")

    def iptables_captured(self):
        out = self._nsenter(self._tool(), "-t", "nat", "-L", "KUMA_MESH_OUTBOUND_REDIRECT",
                            "-v", "-x", "-n").stdout
        return sum(int(line.split()[0]) for line in out.splitlines()[2:] if line.strip())

    def ebpf_accel(self):
        self.ebpf(accelerate=True)

    def ebpf_accelerated(self):
        st = self._status()
        return st["counters"]["accel_msgs_redirected"] if st else 0

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

    def _status(self):
        r = self.lab.tproxy("status", "--name", "default", "--output", "json")
        st = json.loads(r.stdout) if r.returncode == 0 else []
        return next((e for e in st if e.get("name") == "default" and not e.get("removed")),
                    None)

    def ebpf_captured(self):
        st = self._status()
        return st["counters"]["redirected_outbound"] if st else 0

    def switch(self, mode):
        """(on, off, captured counter) of a mode."""
        return {"none": (None, None, None),
                "iptables": (self.iptables, self.iptables_off, self.iptables_captured),
                "ebpf": (self.ebpf, self.ebpf_off, self.ebpf_captured),
                "ebpf-accel": (self.ebpf_accel, self.ebpf_off, self.ebpf_captured)}[mode]


def check_captured(mode, before, after, requests, close):
    got = after - before
    # keep-alive runs open only a few connections; Connection: close opens one per request
    need = requests * 0.9 if close else 1
    if got < need:
        raise SystemExit(f"mode {mode} did not capture: {got} redirected connections for "
                         f"{requests} requests; refusing to report its numbers")


def url_of(mode, family):
    if mode == "none":
        return "http://127.0.0.1:15002" if family == 4 else "http://[::1]:15003"
    return f"http://{REMOTE_IP4}:8080" if family == 4 else f"http://[{REMOTE_IP6}]:8080"


def measure(lab, modes, mode, seconds, workload, cpu=None, prefix=()):
    """One run of one workload in a mode that is switched on; checked for capture. prefix
    runs the measured wrk (not the warm-up): cpu_profile's perf record."""
    url = url_of(mode, modes.family)
    counter = modes.switch(mode)[2]
    # One uncounted second first: a mode just switched on (programs linked, rules
    # restored, caches cold) is not what a running pod sees.
    wrk(lab, url + "/", 1, close=True, cpu=cpu)
    before = counter() if counter else 0
    accel_before = modes.ebpf_accelerated() if mode == "ebpf-accel" else 0
    if workload == "conn":
        res = wrk(lab, url + "/", seconds, close=True, cpu=cpu, prefix=prefix)
    elif workload == "latency":
        res = wrk(lab, url + "/", seconds, latency=True, cpu=cpu, prefix=prefix)
    else:
        res = wrk(lab, url + "/big", seconds, conns=4, cpu=cpu, prefix=prefix)
    if counter:
        check_captured(mode, before, counter(), res["requests"], workload == "conn")
    if mode == "ebpf-accel" and modes.ebpf_accelerated() - accel_before < res["requests"]:
        raise SystemExit(f"mode ebpf-accel did not accelerate: fewer messages went socket "
                         f"to socket than the {res['requests']} requests made ({workload}); "
                         "refusing to report its numbers")
    return res


def run_mode(lab, modes, mode, seconds, workload, cpu=None, n_rules=0, prefix=()):
    on, off, _ = modes.switch(mode)
    if on and n_rules:
        on(n_rules)
    elif on:
        on()
    try:
        return measure(lab, modes, mode, seconds, workload, cpu, prefix)
    finally:
        if off:
            off()


def summarize(samples):
    out = {}
    for key in samples[0]:
        vals = [s[key] for s in samples if key in s]
        if vals and isinstance(vals[0], (int, float)):
            out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def paired_ratios(raw, modes):
    """For each mode and metric: the ratio to (a) within each repetition, summarized."""
    out = {}
    for m in modes[1:]:
        for w, key, _label, _up in METRICS:
            vals = [x[key] / y[key] for x, y in zip(raw[m][w], raw["none"][w])
                    if key in x and key in y and y[key]]
            if vals:
                out[f"{m} {w} {key}"] = {"median": statistics.median(vals),
                                         "min": min(vals), "max": max(vals)}
    return out


def goal_met(ratio, bound, at_least):
    """(the ratio as the table shows it, whether that meets the goal): judged as shown."""
    shown = round(ratio["median"], 2)
    return shown, shown >= bound if at_least else shown <= bound


def goals(paired):
    """Issue 16's goals against one variant's paired ratios: {goal: [ratio, met]}."""
    out = {}
    for w, key, mode, bound, at_least in GOALS:
        r = paired.get(f"{mode} {w} {key}")
        if r:
            out[f"{mode} {w} {key} {'>=' if at_least else '<='} {bound}"] = list(
                goal_met(r, bound, at_least))
    return out


class Servers:
    """nginx on the remote host and HAProxy beside the application, (re)started per
    variant; pinned to CPUs when the variant says so."""

    def __init__(self, lab):
        self.lab = lab
        self.procs = []
        self.dir = os.path.dirname(lab.shared_file("x", ""))
        with open(os.path.join(self.dir, "big"), "wb") as f:
            f.write(os.urandom(8 << 20))

    def start(self, v):
        pin = v.get("pin") and (os.cpu_count() or 1) >= 2
        proxy_cpu, other_cpu = (["taskset", "-c", "1"], ["taskset", "-c", "0"]) if pin \
            else ([], [])
        nginx = self.lab.shared_file("nginx.conf", NGINX.format(dir=self.dir))
        self.procs.append(self.lab.spawn(other_cpu + ["nginx", "-c", nginx, "-g", "daemon off;"],
                                         ns=self.lab.remote_ns, in_cgroup=False, ready=None))
        self.lab.wait_listening(8080, ns=self.lab.remote_ns)
        hap = self.lab.shared_file("haproxy.cfg", haproxy_config(
            threads=v.get("threads"), reuseport=v.get("reuseport", False)))
        proc = self.lab.spawn(proxy_cpu + ["haproxy", "-db", "-f", hap], user=DP, ready=None)
        self.procs.append(proc)
        for port in (15001, 15002, 15003):
            self.lab.wait_listening(port, proc=proc)
        return 0 if pin else None   # the CPU wrk runs on

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)   # spawn() made each a group leader
            p.wait()
        self.procs = []


def prog_times(lab):
    """{program: (run_time_ns, run_cnt)} of the lab's node set's pinned programs; the
    counts grow only while statistics are enabled (bpfsys.enable_stats)."""
    paths = NodePaths(lab.bpffs)
    d = paths.progs(read_meta(paths)["digest"])
    out = {}
    for name in sorted(os.listdir(d)):
        fd = bpfsys.obj_get(os.path.join(d, name))
        try:
            info = bpfsys.prog_info(fd)
        finally:
            os.close(fd)
        out[name] = (info["run_time_ns"], info["run_cnt"])
    return out


def register_others(lab, count):
    """Register `count` more (idle) namespaces on the node, each in its own netns, all
    attached to a cgroup beside the lab's: the lab's cgroup runs our programs only while
    the mode measured has installed them, so (a) runs no BPF at all."""
    if not getattr(lab, "others_cgroup", None):
        lab.others_cgroup = lab.sibling_cgroup("others")
    for i in range(count):
        ns = lab.add_netns()
        r = lab.tproxy("install", "--name", f"other{len(lab.extra_ns):04d}", "--netns",
                       f"/run/netns/{ns}", "--redirect-inbound=false", "--kuma-dp-user", DP,
                       "--ebpf-cgroup-path", lab.others_cgroup, netns=False)
        if r.returncode != 0:
            raise SystemExit(f"registering another namespace failed: {r.stderr.strip()}")
        if (i + 1) % 50 == 0:
            print(f"  {i + 1} more namespaces registered", flush=True)


def registered(lab):
    r = lab.tproxy("status", "--output", "json")
    return len([e for e in json.loads(r.stdout) if not e.get("removed")])


def run_variant(lab, servers, name, v, args):
    modes_list = v.get("modes", VARIANT_MODES)
    family = v.get("family", 4)
    n = v.get("namespaces")
    if n:
        # the application's namespace (while a mode is on) + those already there + more
        register_others(lab, n - 1 - registered(lab))
    cpu = servers.start(v)
    modes = Modes(lab, family)
    raw = {m: {w: [] for w in WORKLOADS} for m in modes_list}
    stalls = []
    try:
        for rep in range(args.reps):
            print(f"{name}: repetition {rep + 1}/{args.reps}", flush=True)
            for w in WORKLOADS:
                runs = {}
                for m in modes_list:
                    try:
                        runs[m] = run_mode(lab, modes, m, args.seconds, w, cpu)
                    except Stalled as e:
                        stalls.append({"rep": rep, "workload": w, "mode": m, "what": str(e)})
                        print(f"  {m:10} {w:8} stalled: {e}", flush=True)
                        continue
                    print(f"  {m:10} {w:8} {runs[m]['rps']:10.0f} req/s", flush=True)
                # a repetition counts for a workload only if every mode completed it:
                # the ratios stay paired
                if len(runs) == len(modes_list):
                    for m, res in runs.items():
                        raw[m][w].append(res)
    finally:
        servers.stop()
    paired = paired_ratios(raw, modes_list)
    return {"label": v["label"], "modes": list(modes_list), "family": family,
            "namespaces": n or registered(lab) + 1, "pinned": cpu is not None,
            "summary": {m: {w: summarize(r) for w, r in ws.items() if r}
                        for m, ws in raw.items()},
            "paired_ratios": paired, "goals": goals(paired), "stalls": stalls, "raw": raw}


def run_rule_scaling(lab, servers, args):
    scaling = {f"{m}-{n}": [] for m in ("iptables", "ebpf") for n in (10, 1000, 10000)}
    servers.start(VARIANTS["haproxy"])
    modes = Modes(lab)
    try:
        for rep in range(args.reps):
            for n in (10, 1000, 10000):
                for m in ("iptables", "ebpf"):
                    try:
                        res = run_mode(lab, modes, m, args.seconds, "conn", n_rules=n)
                    except Stalled as e:
                        raise SystemExit(f"rule scaling ({m}, {n} rules): {e}; run make "
                                         "bench again") from None
                    scaling[f"{m}-{n}"].append(res)
                    print(f"  {m:9} {n:5} rules {res['rps']:10.0f} conn/s", flush=True)
    finally:
        servers.stop()
    return {k: summarize(v) for k, v in scaling.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--out", default=RESULTS,
                    help="results directory (the README table is updated only for the default)")
    ap.add_argument("--publish", metavar="RESULT_JSON",
                    help="measure nothing: write summary.md, chart.png and the README table "
                    "from a saved run (bench/results/<date>.json)")
    args = ap.parse_args()
    if args.publish:
        with open(args.publish) as f:
            result = json.load(f)
        if "variants" not in result:
            raise SystemExit(f"{args.publish}: written before the bench had set-ups (issue "
                             "16); its tables are in the README's history (git log -p "
                             "bench/results/summary.md)")
        publish(os.path.dirname(os.path.abspath(args.publish)), result)
        return
    if os.geteuid() != 0:
        raise SystemExit("make bench needs root (namespaces, cgroup, BPF, iptables)")
    names = [x for x in args.variants.split(",") if x]
    unknown = [x for x in names if x not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {', '.join(unknown)}: choose from "
                         f"{', '.join(VARIANTS)}")
    # the 250-namespace node last: its registrations stay until the lab goes
    names.sort(key=lambda x: bool(VARIANTS[x].get("namespaces")))
    variants = {}
    with Lab("bench") as lab:
        servers = Servers(lab)
        # An idle namespace keeps the node program set loaded: every mode switch is then a
        # warm install, and no node set is freed in the background of a measurement.
        register_others(lab, 1)
        scaling = None
        for name in names:
            variants[name] = run_variant(lab, servers, name, VARIANTS[name], args)
            if name == "haproxy":   # on the same node as the first set-up, before node250
                scaling = run_rule_scaling(lab, servers, args)
    report(args, variants, scaling)


def machine():
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu": model}


def report(args, variants, scaling):
    os.makedirs(args.out, exist_ok=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": machine(), "reps": args.reps, "seconds": args.seconds,
              "variants": variants, "rule_scaling": scaling}
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
    chart(out, result)
    if os.path.abspath(out) == os.path.abspath(RESULTS):
        update_readme(lines)
        print(f"README.md: table between {README_BEGIN} and {README_END} updated")


def _rng(v, fmt):
    return f"{fmt(v['median'])} ({fmt(v['min'])}–{fmt(v['max'])})"


def _ratio(v):
    return _rng(v, lambda x: f"{x:.2f}")


FMT = {"rps": lambda x: f"{x:.0f}", "p50_us": lambda x: f"{x:.0f}",
       "p99_us": lambda x: f"{x:.0f}", "bytes_per_s": lambda x: f"{x / 1e6:.0f}"}
LETTER = {"none": "(a)", "iptables": "(b)", "ebpf": "(c)", "ebpf-accel": "(d)"}


def summary_lines(result):
    """The Markdown tables of one run (summary.md and the README's Speed block)."""
    mach, variants = result["machine"], result["variants"]
    lines = [f"Machine: {mach['cpu']}, {mach['cpus']} cores, kernel {mach['kernel']}; "
             f"medians of {result['reps']} interleaved repetitions of {result['seconds']} s "
             "(min–max); ratios to (a) paired within each repetition. HAProxy 2.6 as the "
             "proxy, wrk as the client.", ""]
    main = variants.get("haproxy")
    if main:
        ms = main["modes"]
        lines += [f"{main['label']}:", "",
                  "| workload | " + " | ".join(f"{LETTER[m]} {NAMES[m]}" for m in ms) + " | "
                  + " | ".join(f"{LETTER[m]}/(a)" for m in ms[1:]) + " |",
                  "|---|" + "---|" * (2 * len(ms) - 1)]
        for w, key, label, _up in METRICS:
            if any(w not in main["summary"][m] for m in ms):
                continue
            lines.append(f"| {label} | "
                         + " | ".join(_rng(main["summary"][m][w][key], FMT[key]) for m in ms)
                         + " | " + " | ".join(_ratio(main["paired_ratios"][f"{m} {w} {key}"])
                                              for m in ms[1:]) + " |")
        lines.append("")
    cols = [(w, key, m) for w, key, _l, _u in METRICS if key != "p50_us"
            for m in ("ebpf", "ebpf-accel")]
    bound = {(w, key, mode): ("≥" if at_least else "≤") + f" {b}"
             for w, key, mode, b, at_least in GOALS}
    short = {"conn": "new conn/s", "latency rps": "keep-alive req/s", "p99_us": "p99",
             "bulk": "bulk"}
    head = []
    for w, key, m in cols:
        what = short["latency rps"] if (w, key) == ("latency", "rps") else \
            short["p99_us"] if key == "p99_us" else short[w]
        head.append(f"{what} {LETTER[m]}/(a)")
    lines += ["Issue 16's goals by set-up (ratios to (a); ✓ met, ✗ not met):", "",
              "| set-up | " + " | ".join(head) + " |",
              "|---|" + "---|" * len(cols),
              "| goal | " + " | ".join(bound.get(c, "") for c in cols) + " |"]
    for name, v in variants.items():
        cells = []
        for w, key, m in cols:
            r = v["paired_ratios"].get(f"{m} {w} {key}")
            cell = _ratio(r) if r else "–"
            g = next((x for x in GOALS if x[:3] == (w, key, m)), None)
            if r and g:
                cell += " ✓" if goal_met(r, g[3], g[4])[1] else " ✗"
            cells.append(cell)
        stalled = len(v.get("stalls", []))
        note = f" ({stalled} run{'s' if stalled > 1 else ''} stalled)" if stalled else ""
        lines.append(f"| {v['label']}{note} | " + " | ".join(cells) + " |")
    scale = result.get("rule_scaling")
    if scale:
        lines += ["", "| excluded CIDRs + ports | (b) iptables conn/s | (c) eBPF conn/s |",
                  "|---|---|---|"]
        for n in (10, 1000, 10000):
            b, c = scale[f"iptables-{n}"]["rps"], scale[f"ebpf-{n}"]["rps"]
            lines.append(f"| {n} | {_rng(b, FMT['rps'])} | {_rng(c, FMT['rps'])} |")
    return lines


NAMES = {"none": "no capture", "iptables": "iptables", "ebpf": "eBPF",
         "ebpf-accel": "eBPF + accel"}
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def update_readme(lines, path=os.path.join(PROJECT, "README.md")):
    """Replace the README's table block with this run's (the only way it is written)."""
    with open(path) as f:
        text = f.read()
    a, b = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    with open(path, "w") as f:
        f.write(text[:a] + "\n" + "\n".join(lines) + "\n" + text[b:])


def chart(out, result):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants, scale = result["variants"], result.get("rule_scaling")
    fig, axes = plt.subplots(1, 3 if scale else 2, figsize=(16, 4.5))
    keys = [(w, k) for w, k, _l, _u in METRICS]
    labels = ["conn/s", "keep-alive", "p50", "p99", "MB/s"]
    main = variants.get("haproxy") or next(iter(variants.values()))
    ms = main["modes"][1:]
    width = 0.8 / len(ms)
    for i, m in enumerate(ms):
        vals = [main["paired_ratios"].get(f"{m} {w} {k}", {"median": 0})["median"]
                for w, k in keys]
        axes[0].bar([x + i * width for x in range(len(keys))], vals, width=width, label=m)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_xticks([x + width * (len(ms) - 1) / 2 for x in range(len(keys))], labels)
    axes[0].set_title(f"{main['label']}\nratio to no capture (latency: lower is better)",
                      fontsize=9)
    axes[0].legend()
    names = list(variants)
    for i, (m, w, k, lab) in enumerate((("ebpf", "conn", "rps", "conn/s (c)"),
                                        ("ebpf-accel", "conn", "rps", "conn/s (d)"),
                                        ("ebpf-accel", "latency", "rps", "keep-alive (d)"))):
        axes[1].bar([x + i * 0.27 for x in range(len(names))],
                    [variants[n]["paired_ratios"].get(f"{m} {w} {k}", {"median": 0})["median"]
                     for n in names],
                    width=0.27, label=lab)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].axhline(0.95, color="red", lw=0.6, ls="--")
    axes[1].set_xticks([x + 0.27 for x in range(len(names))], names, fontsize=8)
    axes[1].set_title("set-ups: ratio to no capture (dashed: 0.95)", fontsize=9)
    axes[1].legend(fontsize=8)
    if scale:
        for m in ("iptables", "ebpf"):
            axes[2].plot([10, 1000, 10000], [scale[f"{m}-{n}"]["rps"]["median"]
                                             for n in (10, 1000, 10000)], marker="o", label=m)
        axes[2].set_xscale("log")
        axes[2].set_title("new connections/s vs excluded CIDRs and ports", fontsize=9)
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "chart.png"), dpi=100)


if __name__ == "__main__":
    main()
