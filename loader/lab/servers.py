"""Small network programs for the lab (demo and tests), run inside lab namespaces.

    python -m loader.lab.servers listen TAG:PORT [TAG:PORT ...] [--log F] [--accept-delay S]
        Dual-stack listeners. Each accepted connection gets one line back:
        "<TAG> orig=<SO_ORIGINAL_DST or -> peer=<client> local=<our address>", then close.
        This is what the rule tests use to see which listener a connection reached.
    python -m loader.lab.servers proxy --port 15001 [--log FILE] [--passthrough]
        A small transparent proxy: reads SO_ORIGINAL_DST, logs it, forwards the bytes.
        --passthrough (the inbound side) connects from 127.0.0.6 / ::6, as Envoy's inbound
        passthrough does, so the forwarded connection is not captured again (Kuma rule 4c).
        A missing answer is logged loudly and the connection dropped: never a loop to itself.
    python -m loader.lab.servers connect HOST PORT [--bind ADDR] [--count N]
        Connect, print the line received (or REFUSED / the error), or with --count N
        make N connections and print one summary line of JSON.
    python -m loader.lab.servers echo PORT
        Echo server (a long-lived application connection).
    python -m loader.lab.servers hold HOST PORT
        Connect once and keep the connection: each stdin line is sent, its echo printed.
    python -m loader.lab.servers dns PORT --a IPV4 --aaaa IPV6
        A DNS server (UDP, both families) answering every A and AAAA question with these
        addresses: which server answered is told by the address in the answer.
    python -m loader.lab.servers query SERVER NAME [--connected]
        One A query over UDP, printed as JSON: the answer and the reply's source address
        (recvfrom), and with --connected the getpeername() of the connected socket.
    python -m loader.lab.servers http PORT
        An HTTP server that answers every GET with "client=<peer> server=<local>".
    python -m loader.lab.servers probe JSON
        Many connections in one process: JSON is a list of [host, port, bind-or-null];
        prints a JSON list of {"line", "getpeername"} in the same order.
    python -m loader.lab.servers validator [--ipv6]
        Kuma's transparent-proxy validator: listen on 127.0.0.1:15006 (::1), connect from
        127.0.0.1 to 127.0.0.6:<20000-29999> (::6), succeed only if it lands there.
"""
import argparse
import ipaddress
import json
import random
import selectors
import socket
import sys
import threading
import time

SO_ORIGINAL_DST = 80
SOL_IPV6 = 41


def original_dst(sock):
    """The proxy's view: getsockopt(SO_ORIGINAL_DST) in the family the connection is."""
    peer = sock.getpeername()
    v4 = sock.family == socket.AF_INET or ipaddress.ip_address(peer[0]).version == 4 or \
        ipaddress.IPv6Address(peer[0]).ipv4_mapped is not None
    try:
        if v4:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = int.from_bytes(raw[2:4], "big")
            return f"{socket.inet_ntop(socket.AF_INET, raw[4:8])}:{port}"
        raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
        port = int.from_bytes(raw[2:4], "big")
        return f"[{socket.inet_ntop(socket.AF_INET6, raw[8:24])}]:{port}"
    except OSError:
        return None


def fmt(addr):
    host, port = addr[0], addr[1]
    ip = ipaddress.ip_address(host)
    if ip.version == 6 and ip.ipv4_mapped:
        host = str(ip.ipv4_mapped)
    elif ip.version == 6:
        host = f"[{host}]"
    return f"{host}:{port}"


def dual_stack_listener(port, host="::"):
    """[::] taking both families by default; an IPv4 host gives a plain AF_INET socket."""
    if "." in host and ":" not in host:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(4096)
        return s
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, port))
    s.listen(4096)
    return s


def cmd_listen(args):
    log = open(args.log, "a", buffering=1) if args.log else None
    sel = selectors.DefaultSelector()
    socks = []
    for spec in args.specs:
        tag, _, port = spec.rpartition(":")
        s = dual_stack_listener(int(port), args.host)
        if args.fastopen:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 64)
        if args.backlog is not None:
            s.listen(args.backlog)   # listen() again only changes the backlog
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, tag)
        socks.append(s)
    print("ready", flush=True)
    if args.gate:
        # A proxy that does not accept yet: with --backlog 0 its queue is full after one
        # connection, and later SYNs wait (retransmitted) in the handshake.
        sys.stdin.readline()
        for s in socks:
            s.listen(4096)
        print("accepting", flush=True)
    while True:
        for key, _ in sel.select():
            if args.accept_delay:
                time.sleep(args.accept_delay)   # a slow proxy: accepts late on purpose
            try:
                conn, _ = key.fileobj.accept()
            except BlockingIOError:
                continue
            with conn:
                orig = original_dst(conn) or "-"
                if args.fastopen:
                    conn.recv(16)   # the byte sent in the SYN: read, so close sends no RST
                line = f"{key.data} orig={orig} peer={fmt(conn.getpeername())} " \
                       f"local={fmt(conn.getsockname())}\n"
                if log:
                    log.write(line)
                if args.gate:
                    print(line.strip(), flush=True)
                conn.setblocking(True)
                try:
                    conn.sendall(line.encode())
                except OSError:
                    pass


def _pipe(a, b):
    """Copy a -> b. An EOF from a is passed on as a half-close (the other direction goes
    on, as Envoy and HAProxy do); an error ends both directions."""
    try:
        while True:
            data = a.recv(65536)
            if not data:
                b.shutdown(socket.SHUT_WR)
                return
            b.sendall(data)
    except OSError:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def cmd_proxy(args):
    log = open(args.log, "a", buffering=1) if args.log else sys.stdout
    srv = dual_stack_listener(args.port)
    print("ready", flush=True)
    while True:
        conn, peer = srv.accept()
        orig = original_dst(conn)
        if orig is None:
            log.write(f"PROXY ERROR: no SO_ORIGINAL_DST for {fmt(peer)}; dropped "
                      "(a proxy without it would connect to itself)\n")
            conn.close()
            continue
        log.write(f"proxy :{args.port}: {fmt(peer)} -> original destination {orig}\n")
        host, _, port = orig.rpartition(":")
        host = host.strip("[]")
        source = None
        if args.passthrough:
            source = ("::6" if ":" in host else "127.0.0.6", 0)
        try:
            up = socket.create_connection((host, int(port)), timeout=5, source_address=source)
        except OSError as e:
            log.write(f"proxy: upstream {orig} failed: {e}\n")
            conn.close()
            continue
        up.settimeout(None)   # the 5 s were for connecting: a held connection may idle
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def connect_once(host, port, bind=None, timeout=5.0, close_at_once=False, bind_port=0,
                 fastopen=False):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if bind:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((bind, bind_port))
        if fastopen:
            # connect() and the first bytes in one SYN (TCP Fast Open)
            s.sendto(b"x", socket.MSG_FASTOPEN, (host, port))
        else:
            s.connect((host, port))
        if close_at_once:
            return "CLOSED", fmt(s.getpeername())
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.decode().strip(), fmt(s.getpeername())
    except ConnectionRefusedError:
        return "REFUSED", None
    except OSError as e:
        return f"ERROR {e.strerror or e}", None
    finally:
        s.close()


def cmd_connect(args):
    if args.count:
        results, start = {}, time.monotonic()
        for _ in range(args.count):
            line, _ = connect_once(args.host, args.port, args.bind)
            # Counted by kind: the peer's port differs on every connection.
            kind = " ".join(w for w in line.split() if not w.startswith("peer="))
            results[kind] = results.get(kind, 0) + 1
        print(json.dumps({"results": results, "seconds": time.monotonic() - start}))
        return
    line, peer = connect_once(args.host, args.port, args.bind, close_at_once=args.close_at_once,
                              bind_port=args.bind_port, fastopen=args.fastopen)
    print(json.dumps({"line": line, "getpeername": peer}))


def cmd_loop(args):
    """Connect (and read the reply) again and again until a line or EOF on stdin: traffic
    that goes on while something else happens. Prints {"results": {first word of each
    reply, or the error: count}, "connections": n} at the end."""
    stop = threading.Event()

    def watch_stdin():
        sys.stdin.readline()
        stop.set()
    threading.Thread(target=watch_stdin, daemon=True).start()
    results, n = {}, 0
    print("ready", flush=True)
    while not stop.is_set():
        line, _ = connect_once(args.host, args.port)
        kind = line.split()[0] if line and not line.startswith("ERROR") else (line or "EOF")
        results[kind] = results.get(kind, 0) + 1
        n += 1
    print(json.dumps({"results": results, "connections": n}), flush=True)


def cmd_connect_many(args):
    """Start a connection to each port in order, all at once (non-blocking), then read each
    one's reply line: {port: line}. For handshakes that are in flight together."""
    fam = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    socks = {}
    for port in args.ports:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((args.host, port))
        socks[port] = s
    out = {}
    deadline = time.monotonic() + args.timeout
    for port, s in socks.items():
        s.settimeout(max(0.1, deadline - time.monotonic()))
        data = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            out[port] = data.decode().strip() or "EOF"
        except OSError as e:
            out[port] = f"ERROR {e.strerror or e}"
        finally:
            s.close()
    print(json.dumps(out))


def cmd_workers(args):
    """A proxy like Envoy's: one SO_REUSEPORT listener per worker on the same port. Each
    connection is answered with its worker's number; 'close N' on stdin closes worker N's
    listener (as a worker that exits)."""
    socks = []
    for _ in range(args.count):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", args.port))
        s.listen(4096)
        socks.append(s)
    def serve(i, s):
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return   # closed
            with conn:
                orig = original_dst(conn) or "-"
                try:
                    conn.sendall(f"worker={i} orig={orig}\n".encode())
                except OSError:
                    pass
    for i, s in enumerate(socks):
        threading.Thread(target=serve, args=(i, s), daemon=True).start()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, n = line.strip().partition(" ")
        if cmd == "close":
            socks[int(n)].shutdown(socket.SHUT_RDWR)
            socks[int(n)].close()
            print(f"closed {n}", flush=True)


def cmd_echo(args):
    srv = dual_stack_listener(args.port)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_pipe, args=(conn, conn), daemon=True).start()


def _transfer_one(host, port, total, chunk, seed):
    """Send total bytes (a pattern fixed by seed) in chunks of up to chunk bytes, half-close,
    and read the echo to EOF while sending. Returns (bytes back, they match?)."""
    import hashlib
    import random
    rng = random.Random(seed)
    data = rng.randbytes(total)
    s = socket.create_connection((host, port), timeout=30)
    got = []

    def reader():
        while True:
            b = s.recv(1 << 16)
            if not b:
                break
            got.append(b)
    t = threading.Thread(target=reader)
    t.start()
    off = 0
    while off < total:
        n = rng.randint(1, chunk)     # odd sizes: message boundaries must not matter
        s.sendall(data[off:off + n])
        off += n
    s.shutdown(socket.SHUT_WR)
    t.join()
    s.close()
    back = b"".join(got)
    return len(back), hashlib.sha256(back).digest() == hashlib.sha256(data).digest()


def cmd_transfer(args):
    """Echo round trips through whatever captures the connection: every byte must come
    back in order. Prints {"connections", "bytes_back", "all_exact"}."""
    results = [None] * args.parallel

    def one(i):
        try:
            results[i] = _transfer_one(args.host, args.port, args.bytes, args.chunk, i)
        except OSError as e:
            results[i] = (0, False, str(e))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"connections": len(results),
                      "bytes_back": sum(r[0] for r in results),
                      "all_exact": all(r[1] for r in results),
                      "errors": [r[2] for r in results if len(r) > 2]}))


def cmd_hold(args):
    s = socket.create_connection((args.host, args.port), timeout=10)
    print("ready " + fmt(s.getsockname()), flush=True)
    f = s.makefile("rb")
    for line in sys.stdin:
        s.sendall(line.encode())
        print(f.readline().decode().strip() or "EOF", flush=True)


def _dns_answer(query, a, aaaa):
    qid = query[:2]
    i = 12
    while query[i]:
        i += query[i] + 1
    qtype = int.from_bytes(query[i + 1:i + 3], "big")
    question = query[12:i + 5]
    rdata = {1: socket.inet_pton(socket.AF_INET, a),
             28: socket.inet_pton(socket.AF_INET6, aaaa)}.get(qtype)
    header = qid + b"\x81\x80" + (1).to_bytes(2, "big") + (1 if rdata else 0).to_bytes(2, "big") \
        + b"\x00\x00\x00\x00"
    answer = b""
    if rdata:
        answer = b"\xc0\x0c" + qtype.to_bytes(2, "big") + b"\x00\x01" + (60).to_bytes(4, "big") \
            + len(rdata).to_bytes(2, "big") + rdata
    return header + question + answer


def cmd_dns(args):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", args.port))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(4096)
        try:
            s.sendto(_dns_answer(data, args.a, args.aaaa), peer)
        except (IndexError, OSError):
            continue


def _dns_query(name):
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00\x00\x01\x00\x01"


def cmd_query(args):
    fam = socket.AF_INET6 if ":" in args.server else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(3)
    out = {}
    try:
        if args.connected:
            s.connect((args.server, 53))
            out["getpeername"] = fmt(s.getpeername())
            s.send(_dns_query(args.name))
        else:
            s.sendto(_dns_query(args.name), (args.server, 53))
        data, peer = s.recvfrom(4096)
        out["from"] = fmt(peer)
        out["answer"] = socket.inet_ntop(socket.AF_INET, data[-4:])
    except OSError as e:
        out["error"] = str(e)
    print(json.dumps(out))


def cmd_http(args):
    import http.server

    class WhoAmI(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (f"client={fmt(self.client_address)} "
                    f"server={fmt(self.connection.getsockname())}\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    srv = Server(("::", args.port), WhoAmI)
    print("ready", flush=True)
    srv.serve_forever()


def cmd_probe(args):
    out = []
    for host, port, bind in json.loads(args.attempts):
        line, peer = connect_once(host, int(port), bind, timeout=3.0)
        out.append({"line": line, "getpeername": peer})
    print(json.dumps(out))


def cmd_validator(args):
    lo, passthrough = ("::1", "::6") if args.ipv6 else ("127.0.0.1", "127.0.0.6")
    fam = socket.AF_INET6 if args.ipv6 else socket.AF_INET
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((lo, 15006))
    srv.listen(8)
    srv.settimeout(5)
    port = random.randint(20000, 29999)
    line, _ = "", None
    c = socket.socket(fam, socket.SOCK_STREAM)
    c.settimeout(5)
    try:
        c.bind((lo, 0))
        c.connect((passthrough, port))
        conn, _ = srv.accept()
        conn.sendall(b"validator-ok")
        conn.close()
        line = c.recv(64).decode()
    except OSError as e:
        line = f"failed: {e}"
    print(json.dumps({"ok": line == "validator-ok", "port": port, "detail": line}))
    sys.exit(0 if line == "validator-ok" else 1)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m loader.lab.servers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("listen")
    p.add_argument("specs", nargs="+")
    p.add_argument("--log", help="also append each reply line to this file")
    p.add_argument("--accept-delay", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--host", default="::", help="address to listen on (default [::])")
    p.add_argument("--backlog", type=int, help="listen backlog (default 4096)")
    p.add_argument("--gate", action="store_true", help="accept only after a line on stdin")
    p.add_argument("--fastopen", action="store_true", help="TCP Fast Open on the listeners")
    p = sub.add_parser("proxy")
    p.add_argument("--port", type=int, default=15001)
    p.add_argument("--log")
    p.add_argument("--passthrough", action="store_true")
    p = sub.add_parser("connect")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--bind")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--close-at-once", action="store_true",
                   help="close right after connect(), before the peer could accept")
    p.add_argument("--bind-port", type=int, default=0, help="source port (with --bind)")
    p.add_argument("--fastopen", action="store_true", help="connect with TCP Fast Open")
    p = sub.add_parser("loop")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p = sub.add_parser("connect-many")
    p.add_argument("host")
    p.add_argument("ports", type=int, nargs="+")
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("workers")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=4)
    p = sub.add_parser("echo")
    p.add_argument("port", type=int)
    p = sub.add_parser("transfer")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--bytes", type=int, default=1 << 20)
    p.add_argument("--chunk", type=int, default=65536, help="largest write")
    p.add_argument("--parallel", type=int, default=1)
    p = sub.add_parser("hold")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p = sub.add_parser("http")
    p.add_argument("port", type=int)
    p = sub.add_parser("dns")
    p.add_argument("port", type=int)
    p.add_argument("--a", required=True)
    p.add_argument("--aaaa", required=True)
    p = sub.add_parser("query")
    p.add_argument("server")
    p.add_argument("name")
    p.add_argument("--connected", action="store_true")
    p = sub.add_parser("probe")
    p.add_argument("attempts")
    p = sub.add_parser("validator")
    p.add_argument("--ipv6", action="store_true")
    args = ap.parse_args(argv)
    {"listen": cmd_listen, "proxy": cmd_proxy, "connect": cmd_connect,
     "validator": cmd_validator, "http": cmd_http, "echo": cmd_echo,
     "hold": cmd_hold, "transfer": cmd_transfer, "dns": cmd_dns, "query": cmd_query,
     "probe": cmd_probe, "connect-many": cmd_connect_many,
     "loop": cmd_loop, "workers": cmd_workers}[args.cmd](args)


if __name__ == "__main__":
    main()
