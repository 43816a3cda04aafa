"""State scaling: N captured connections open at once (default 100,000).

    python bench/state_scaling.py [--connections 100000]

An application in the lab opens N connections to the remote host (two source addresses,
so the 4-tuples to 127.0.0.1:15001 do not run out of ports) and keeps them open; sinks
listening on the outbound port (SO_REUSEPORT) as the DP user accept them and ask
SO_ORIGINAL_DST on every one. Both sides are split over several processes: these
machines cap a process at 20,000 open files and do not let root raise it. Reported: how many answers were right, tp_conns entries (since
ABI 3 only handshakes in flight: the answers live with the proxy's sockets) and the map's
memory (bpftool), and that the table drains to zero once everything is closed.
Appended to bench/results/state-<date>.json. Runs a few minutes; lab addresses only.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loader import node  # noqa: E402
from loader.lab import REMOTE_IP4, Lab  # noqa: E402

SOURCES = ("198.18.0.1", "198.18.0.5")
TARGET_PORTS = range(9000, 9010)

SINK = r"""
import select, socket, sys, json
ports = set(range(9000, 9010))
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
srv.bind(("0.0.0.0", 15001)); srv.listen(65535); srv.setblocking(False)
print("ready", flush=True)
ep = select.epoll(); ep.register(srv, select.EPOLLIN)
held, right, wrong = [], 0, 0
while True:
    events = ep.poll(3)
    if not events and sys.stdin in select.select([sys.stdin], [], [], 0)[0]:
        break                 # the parent says every client is connected: report
    for _ in events:
        while True:
            try:
                c, _ = srv.accept()
            except BlockingIOError:
                break
            raw = c.getsockopt(socket.SOL_IP, 80, 16)
            ok = socket.inet_ntoa(raw[4:8]) == sys.argv[2] and \
                int.from_bytes(raw[2:4], "big") in ports
            right, wrong = right + ok, wrong + (not ok)
            held.append(c)
sys.stdin.readline()
print(json.dumps({"right": right, "wrong": wrong}), flush=True)
sys.stdin.read()          # hold every connection until told to go
"""

CLIENT = r"""
import socket, sys
n, remote, sources = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
held = []
for i in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_IP, 24, 1)            # IP_BIND_ADDRESS_NO_PORT
    s.bind((sources[i % len(sources)], 0))
    s.connect((remote, 9000 + i % 10))
    held.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=100000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    n = args.connections
    with Lab("state") as lab:
        lab.ip(lab.app_ns, "addr", "add", f"{SOURCES[1]}/24", "dev", lab.veth[0])
        subprocess.run(["nsenter", f"--net=/run/netns/{lab.app_ns}", "sysctl", "-q",
                        "net.ipv4.ip_local_port_range=1024 65535"], check=True)
        r = lab.tproxy("install", "--kuma-dp-user", "nobody", "--redirect-inbound=false")
        assert r.returncode == 0, r.stderr
        per = 12000
        k = -(-n // per)
        sinks = [lab.spawn([sys.executable, "-c", SINK, "0", REMOTE_IP4], user="nobody",
                           stdin=subprocess.PIPE) for _ in range(k + 2)]
        start = time.monotonic()
        clients = [lab.spawn([sys.executable, "-c", CLIENT, str(min(per, n - i * per)),
                              REMOTE_IP4, ",".join(SOURCES)], stdin=subprocess.PIPE)
                   for i in range(k)]
        opened = time.monotonic() - start
        answers = {"right": 0, "wrong": 0}
        for sk in sinks:
            sk.stdin.write(b"report\n")
            sk.stdin.flush()
            got = json.loads(sk.stdout.readline())
            answers = {key: answers[key] + got[key] for key in answers}
        st = json.loads(lab.tproxy("status", "--output", "json").stdout)[0]
        maps = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "pinned",
                                          node.NodePaths(lab.bpffs).map("tp_conns")],
                                         capture_output=True, text=True).stdout)
        live = st["tracked_connections"]
        # Acceleration (on by default where supported): tp_accel holds 65,536 sockets, so
        # past 32,768 connections the rest must stay on TCP, counted, and still be right.
        accel_live, accel = st.get("accelerated_sockets"), dict(st["counters"])
        for p in clients + sinks:
            p.stdin.close()
            p.wait(timeout=120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = json.loads(lab.tproxy("status", "--output", "json").stdout)[0]
            if st["tracked_connections"] == 0 and not st.get("accelerated_sockets"):
                break
            time.sleep(0.5)   # polling the table while the kernel closes 2N sockets
        result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "connections": n, "processes": {"clients": k, "sinks": k + 2},
                  "seconds_to_open": round(opened, 1),
                  "orig_dst_right": answers["right"], "orig_dst_wrong": answers["wrong"],
                  "tp_conns_entries_live": live,
                  "tp_conns_bytes_memlock": maps.get("bytes_memlock"),
                  "tp_conns_entries_after_close": st["tracked_connections"],
                  "acceleration": {"accelerated_sockets_live": accel_live,
                                   "sockets_added": accel.get("accel_sockets_added"),
                                   "sockets_failed_map_full": accel.get("accel_sockets_failed"),
                                   "accelerated_sockets_after_close":
                                       st.get("accelerated_sockets")}}
    print(json.dumps(result, indent=1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"state-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"),
              "w") as f:
        json.dump(result, f, indent=1)
    # tp_conns spans the handshake only (ABI 3): with every connection established, the
    # answers live in the proxy sockets' storage and the table is (nearly) empty.
    if (answers["right"] != n or result["tp_conns_entries_after_close"]
            or result["acceleration"]["accelerated_sockets_after_close"]):
        raise SystemExit("state scaling FAILED: see the numbers above")


if __name__ == "__main__":
    main()
