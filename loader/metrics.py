"""The agent's HTTP endpoint: Prometheus metrics (prometheus-client's text format), /healthz
and /readyz. Read from the pinned maps at scrape time, so a value is never older than the
scrape; nothing is written.

    ebpf_tproxy_decisions_total{instance,reason}   what the programs decided, per namespace
                                                   (status's counters, same reason names)
    ebpf_tproxy_accelerated_sockets{instance}      sockets in the sockhash (acceleration)
    ebpf_tproxy_tracked_connections{instance}      handshakes in flight (tp_conns)
    ebpf_tproxy_map_entries{map}, _max_entries,    fill of every shared map
      ebpf_tproxy_map_fill_ratio{map}
    ebpf_tproxy_program_run_seconds_total{program} BPF run time and runs, while bpf_stats
      ebpf_tproxy_program_runs_total{program}      is enabled (sysctl or BPF_ENABLE_STATS)
    ebpf_tproxy_namespaces                         registered namespaces
    ebpf_tproxy_agent_{up,reloads_total,gc_total,applied_total,apply_failures_total,
      address_changes_total,state_file_errors_total,start_time_seconds}

Overhead: a scrape walks each shared map's keys once (about 2 µs a key from Python); a
node with 250 namespaces of ordinary configurations answers in well under a second.
"""
import ctypes as ct
import http.server
import ipaddress
import os
import socket
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from . import abi, bpfsys, namespace, node
from .config import ConfigError

P = "ebpf_tproxy_"
MAX_REQUESTS = 8      # answered at once; more get 503 (a scrape every few seconds is normal)
STALLED_S = 30.0      # /readyz fails when the agent's loop has not turned for this long


def parse_address(value, what="--metrics-address"):
    """HOST:PORT (IPv6 as [ADDR]:PORT) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:   # 0: any free port
        raise ConfigError(f"{what}: {value!r} is not HOST:PORT (e.g. 127.0.0.1:9590)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{what}: {host!r} is not an IP address; give one to listen on "
                          "(127.0.0.1 keeps the metrics on this host)") from None
    return host, int(port)


class NodeCollector:
    """prometheus-client collector over the node set's maps and the agent's own counters."""

    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        a = self.agent
        yield GaugeMetricFamily(P + "agent_up", "1 while the agent runs", value=1)
        yield GaugeMetricFamily(P + "agent_start_time_seconds", "when the agent started",
                                value=a.started_at)
        helps = {"reloads": "configuration reloads (SIGHUP, store changes)",
                 "gc": "namespaces removed because they disappeared",
                 "applied": "configurations applied (store, address changes)",
                 "apply_failures": "configurations that could not be applied",
                 "address_changes": "address changes that changed a namespace's local set",
                 "state_file_errors": "stored files that could not be read"}
        for key, help_ in helps.items():
            yield CounterMetricFamily(P + "agent_" + key, help_, value=a.stats[key])
        paths = a.paths
        if node.read_meta(paths) is None:
            return
        with namespace.NodeMaps(paths) as maps:
            regs = maps.registrations()
            yield GaugeMetricFamily(P + "namespaces", "registered namespaces", value=len(regs))
            yield from self._per_namespace(paths, maps, regs)
            yield from self._fill(paths, maps)
        yield from self._programs(paths)

    def _per_namespace(self, paths, maps, regs):
        decisions = CounterMetricFamily(P + "decisions", "connections and queries decided, "
                                        "by reason (the counters of ebpf-tproxy status)",
                                        labels=["instance", "reason"])
        accel = GaugeMetricFamily(P + "accelerated_sockets", "sockets in the sockhash",
                                  labels=["instance"])
        tracked = GaugeMetricFamily(P + "tracked_connections", "handshakes in flight "
                                    "(tp_conns)", labels=["instance"])
        by_cookie = {m["netns_cookie"]: n for n, m in regs.items()}
        conns = _count_by(maps.conns.keys(), lambda k: k.netns_cookie)
        try:
            with bpfsys.PinnedMap(paths.map("tp_accel"), abi.TpSockKey, ct.c_uint64,
                                  max_entries=abi.TP_ACCEL_MAX) as m:
                accelerated = _count_by(m.keys(), lambda k: k.netns_cookie)
        except OSError:
            accelerated = {}
        for cookie, name in sorted(by_cookie.items(), key=lambda x: x[1]):
            for reason, value in maps.counters_total(cookie).items():
                decisions.add_metric([name, reason], value)
            accel.add_metric([name], accelerated.get(cookie, 0))
            tracked.add_metric([name], conns.get(cookie, 0))
        yield decisions
        yield accel
        yield tracked

    def _fill(self, paths, maps):
        entries = GaugeMetricFamily(P + "map_entries", "entries in each shared map",
                                    labels=["map"])
        limit = GaugeMetricFamily(P + "map_max_entries", "capacity of each shared map",
                                  labels=["map"])
        ratio = GaugeMetricFamily(P + "map_fill_ratio", "entries / capacity", labels=["map"])
        for name, m in (("tp_ns", maps.ns), ("tp_ns_addrs", maps.ns_addrs),
                        ("tp_uid_rules", maps.uid_rules), ("tp_ports", maps.ports),
                        ("tp_cidrs", maps.cidrs), ("tp_conns", maps.conns),
                        ("tp_ns_meta", maps.meta)):
            n = len(m.keys())
            cap = bpfsys.map_info(m.fd)["max_entries"]
            entries.add_metric([name], n)
            limit.add_metric([name], cap)
            ratio.add_metric([name], n / cap if cap else 0)
        yield entries
        yield limit
        yield ratio

    def _programs(self, paths):
        meta = node.read_meta(paths) or {}
        secs = CounterMetricFamily(P + "program_run_seconds", "time BPF programs ran (while "
                                   "bpf_stats is enabled)", labels=["program"])
        runs = CounterMetricFamily(P + "program_runs", "times BPF programs ran (while "
                                   "bpf_stats is enabled)", labels=["program"])
        for name in meta.get("programs", []):
            try:
                fd = bpfsys.obj_get(paths.prog(meta["digest"], name))
            except OSError:
                continue
            try:
                info = bpfsys.prog_info(fd)
            finally:
                os.close(fd)
            secs.add_metric([name], info["run_time_ns"] / 1e9)
            runs.add_metric([name], info["run_cnt"])
        yield secs
        yield runs


def _count_by(keys, key_of):
    out = {}
    for k in keys:
        c = key_of(k)
        out[c] = out.get(c, 0) + 1
    return out


def health(agent):
    """(ok, lines): the node set there, its maps readable, every link of it pinned and
    pointing at a program."""
    problems = []
    try:
        meta = node.read_meta(agent.paths)
        if meta is None:
            problems.append("no node program set loaded")
        else:
            with namespace.NodeMaps(agent.paths):
                pass
            for rel, info in node.link_infos(agent.paths).items():
                if "error" in info or not info.get("prog_id"):
                    problems.append(f"link {rel}: {info.get('error', 'no program')}")
    except (OSError, node.InstallError) as e:
        problems.append(f"node program set unreadable: {e}")
    return not problems, problems or ["ok"]


def serve(address, agent):
    """Start the endpoint in a thread; returns the server (shutdown() stops it)."""
    host, port = parse_address(address)
    registry = CollectorRegistry()
    registry.register(NodeCollector(agent))
    registry.register(ProcessCollector(registry=None))

    busy = threading.BoundedSemaphore(MAX_REQUESTS)

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 10   # a client that sends nothing does not keep a thread

        def do_GET(self):
            if not busy.acquire(blocking=False):
                self.send_error(503, "busy")
                return
            try:
                self._get()
            finally:
                busy.release()

        def _get(self):
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    code, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(registry)
                except Exception as e:   # a scrape must answer, not hang the scraper
                    code, ctype, body = 500, "text/plain", f"scrape failed: {e}\n".encode()
            elif path == "/healthz":
                ok, lines = health(agent)
                code, ctype, body = (200 if ok else 503), "text/plain", \
                    ("\n".join(lines) + "\n").encode()
            elif path == "/readyz":
                stalled = time.monotonic() - agent.heartbeat > STALLED_S
                ok = agent.ready and not stalled
                why = b"ready\n" if ok else (b"stalled: the agent's loop has not turned for "
                                              b"30 s\n" if agent.ready else
                                              b"starting: the store is not applied yet\n")
                code, ctype, body = (200 if ok else 503), "text/plain", why
            else:
                code, ctype, body = 404, "text/plain", b"/metrics, /healthz or /readyz\n"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            pass   # scrapes every few seconds are not events

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 \
            else socket.AF_INET

    try:
        server = Server((host, port), Handler)
    except OSError as e:
        raise ConfigError(f"--metrics-address: cannot listen on {address} ({e.strerror}); "
                          "give a free port, or --metrics-address '' for none") from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
