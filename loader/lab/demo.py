"""`make demo` / `ebpf-tproxy demo`: the main job on a built-in lab.

Builds two network namespaces (an "app" host with a child cgroup, a "remote" host), runs
an HTTP server on the remote host and a small transparent proxy as the DP user beside the
application, installs capture, makes requests with curl, prints what the proxy saw and
`status`, uninstalls, and shows that nothing of ours is left. Ctrl-C at any point tears
the lab down the same way.
"""
import json
import os
import signal
import subprocess
import sys
import urllib.request

from . import APP_IP4, REMOTE_IP4, REMOTE_IP6, Lab

DP_USER = "nobody"


def step(msg):
    print(f"\n== {msg}", flush=True)


def show(cmd, r):
    print(f"$ {cmd}")
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "))


def our_kernel_objects(lab):
    links = json.loads(subprocess.run(["bpftool", "-j", "cgroup", "list", lab.cgroup],
                                      capture_output=True, text=True).stdout.strip() or "[]")
    pins = []
    for root, dirs, files in os.walk(os.path.join(lab.bpffs, "ebpf-tproxy")):
        pins += dirs + files
    return links, pins


def start_agent(lab):
    """The node agent on the lab's bpffs, in this (the host's) namespace; returns (process,
    metrics URL)."""
    p, log_path, port = lab.start_agent()
    with open(log_path) as f:
        print("  " + f.read().rstrip().replace("\n", "\n  "))
    return p, f"http://127.0.0.1:{port}"


def show_metrics(url, instance):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    print(f"$ curl -s {url}/metrics | grep 'instance=\"{instance}\"' (non-zero)")
    for ln in lines:
        if f'instance="{instance}"' in ln and not ln.endswith(" 0.0"):
            print("  " + ln)
    with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
        print(f"$ curl -s {url}/healthz\n  {r.read().decode().strip()}")


def run(pause=False):
    if os.geteuid() != 0:
        print("ebpf-tproxy demo: run as root (it creates namespaces, a cgroup and BPF "
              "programs)", file=sys.stderr)
        return 2
    try:
        with Lab("demo") as lab:
            step(f"lab: app host {APP_IP4} (cgroup {lab.cgroup}), remote host {REMOTE_IP4} "
                 f"/ {REMOTE_IP6}")
            lab.spawn([sys.executable, "-m", "loader.lab.servers", "http", "8080"],
                      ns=lab.remote_ns, in_cgroup=False)
            log = lab.shared_file("proxy.log", "")
            os.chmod(log, 0o666)
            for port, extra in (("15001", []), ("15006", ["--passthrough"])):
                lab.spawn([sys.executable, "-m", "loader.lab.servers", "proxy", "--port", port,
                           "--log", log] + extra, user=DP_USER)
            lab.spawn([sys.executable, "-m", "loader.lab.servers", "http", "8080"])
            print(f"remote host: HTTP server on :8080\napp host: the application's HTTP "
                  f"server on :8080, and a transparent proxy on :15001 (outbound) and :15006 "
                  f"(inbound) running as {DP_USER!r}, the DP user")

            step("before capture: both hosts talk to each other directly")
            show(f"(app) curl http://{REMOTE_IP4}:8080/",
                 lab.run(["curl", "-sS", "-m", "5", f"http://{REMOTE_IP4}:8080/"]))
            show(f"(remote) curl http://{APP_IP4}:8080/",
                 lab.run(["curl", "-sS", "-m", "5", f"http://{APP_IP4}:8080/"],
                         ns=lab.remote_ns, in_cgroup=False))

            step("the node agent starts: it loads the node program set once (BCC compiles: "
                 "a few seconds), so that no install compiles")
            lab.shared_file("demo", "")   # the lab's directory, for the agent's files
            agent, metrics_url = start_agent(lab)

            step("install capture (map writes only: the programs are loaded)")
            r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--verbose")
            show(f"ebpf-tproxy install --kuma-dp-user {DP_USER} --ebpf-cgroup-path "
                 f"{lab.cgroup} --netns {lab.app_ns}", r)
            if r.returncode != 0:
                return 1

            step("captured: the same requests now go through the proxy")
            for url in (f"http://{REMOTE_IP4}:8080/", f"http://[{REMOTE_IP6}]:8080/"):
                show(f"(app) curl {url}", lab.run(["curl", "-sS", "-g", "-m", "5", "-w",
                                                   " (curl's peer: %{remote_ip}:%{remote_port})",
                                                   url]))
            show(f"(remote) curl http://{APP_IP4}:8080/",
                 lab.run(["curl", "-sS", "-m", "5", f"http://{APP_IP4}:8080/"],
                         ns=lab.remote_ns, in_cgroup=False))
            print("(inbound: the application sees the proxy's passthrough source 127.0.0.6)")
            print("the proxy's log (each line is one getsockopt(SO_ORIGINAL_DST) answer):")
            with open(log) as f:
                print("  " + f.read().rstrip().replace("\n", "\n  "))

            step("status")
            show("ebpf-tproxy status", lab.tproxy("status"))
            step("the agent's Prometheus metrics for the demo's namespace")
            show_metrics(metrics_url, "default")
            if pause:
                input("\nPress Enter to uninstall and tear the lab down... ")

            step("uninstall: traffic is released")
            show("ebpf-tproxy uninstall", lab.tproxy("uninstall"))
            show(f"(app) curl http://{REMOTE_IP4}:8080/",
                 lab.run(["curl", "-sS", "-m", "5", f"http://{REMOTE_IP4}:8080/"]))
            show(f"(remote) curl http://{APP_IP4}:8080/",
                 lab.run(["curl", "-sS", "-m", "5", f"http://{APP_IP4}:8080/"],
                         ns=lab.remote_ns, in_cgroup=False))
            step("the agent stops: with no namespace registered, the node program set goes too")
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=60)
            links, pins = our_kernel_objects(lab)
            print(f"cgroup attachments left: {len(links)}; pins left: {len(pins)}")
        step("lab removed (namespaces, cgroup, bpffs mount): the host is as it was")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: lab removed, nothing left behind", file=sys.stderr)
        return 130
