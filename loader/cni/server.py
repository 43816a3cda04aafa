"""The agent's CNI socket: answers what the shim (loader/cni/shim.py) relays from the
node's container runtime, with the plugin's code already imported and the node program set
loaded, so an ADD is map writes (no interpreter start, no pyroute2 import, no compile).

One connection per invocation: a 4-byte length and a JSON header {env, stdin_len,
netns_fd}, with the pod's network namespace as an SCM_RIGHTS descriptor (it works whatever
the agent's mount namespace shows of /run/netns), then stdin; the reply is JSON {code,
stdout, stderr}. Each connection is served in a thread of its own; installs serialize on the
bpffs lock as they do between processes. The socket is root's only (0600 in a 0700
directory): whoever can write it can capture any namespace.
"""
import array
import contextlib
import json
import os
import socket
import struct
import threading

MAX_HEADER = 1 << 20
MAX_STDIN = 4 << 20


class CNIServer:
    def __init__(self, path, log):
        self.path, self.log = path, log
        self.served = 0
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)   # a previous agent's (the agent lock says none runs)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(64)
        self._stop = False
        self.thread = threading.Thread(target=self._accept, name="cni socket", daemon=True)
        self.thread.start()

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return   # closed
            threading.Thread(target=self._serve, args=(conn,), name="cni request",
                             daemon=True).start()

    def _serve(self, conn):
        fds = []
        try:
            conn.settimeout(30)
            head, anc, _, _ = conn.recvmsg(4, socket.CMSG_SPACE(4 * 4))
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(data[:len(data) - len(data) % a.itemsize])
                    fds.extend(a)
            (n,) = struct.unpack("!I", _exactly(conn, 4, head))
            if n > MAX_HEADER:
                raise ValueError("header too large")
            header = json.loads(_exactly(conn, n))
            stdin = _exactly(conn, min(int(header["stdin_len"]), MAX_STDIN + 1))
            env = {str(k): str(v) for k, v in header["env"].items()}
            if header.get("netns_fd") and fds:
                env["CNI_NETNS"] = f"/proc/{os.getpid()}/fd/{fds[0]}"
            code, out, err = self.handle(env, stdin)
            conn.sendall(json.dumps({"code": code, "stdout": out.decode(),
                                     "stderr": err}).encode())
            self.served += 1
        except Exception as e:   # a bad client must not stop the agent
            self.log("cni-error", f"{type(e).__name__}: {e}")
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    def handle(self, env, stdin):
        from . import plugin
        code, out, lines = plugin.handle_collecting(env, stdin)
        for line in lines:   # into the agent's log, and back to the runtime's
            self.log("cni", line)
        return code, out, "".join(line + "\n" for line in lines)

    def close(self):
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _exactly(conn, n, have=b""):
    data = have
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ValueError("connection closed mid-request")
        data += chunk
    return data
