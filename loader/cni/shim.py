#!/usr/bin/env python3
"""ebpf-tproxy CNI plugin, the executable a node's container runtime runs (installed into
the CNI bin dir as `ebpf-tproxy` by `ebpf-tproxy cni install`).

It does no work itself: it hands the invocation (the CNI_* and K8S_* environment, stdin,
and an open descriptor of the pod's network namespace) to the node agent over its unix
socket and relays the answer. The agent has the node program set loaded and the plugin's
code imported, so an ADD costs map writes, not a Python start-up with the whole package
(see loader/cni/server.py). Stdlib only and self-contained: the node needs python3, not
this package. No agent, no capture: the answer is CNI error 11 ("try again later"), and the
runtime retries the pod, which never starts uncaptured.
"""
import array
import json
import os
import socket
import struct
import sys

DEFAULT_SOCKET = "/run/ebpf-tproxy/cni.sock"
# proto.SUPPORTED_VERSIONS (tests/unit/test_cni_proto.py checks they agree): VERSION is
# answered here, since its stdin names no socket and a runtime may ask before any agent runs.
SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
MAX_STDIN = 4 << 20
TIMEOUT_S = 60   # an ADD waits at most for the bpffs lock behind other pods' ADDs


def fail(version, code, msg):
    sys.stdout.write(json.dumps({"cniVersion": version, "code": code, "msg": msg}) + "\n")
    sys.exit(1)


def main():
    stdin = sys.stdin.buffer.read(MAX_STDIN + 1)
    version, sock_path = "1.1.0", DEFAULT_SOCKET
    try:
        conf = json.loads(stdin or b"{}")
        version = str(conf.get("cniVersion") or version)
        sock_path = str(conf.get("agent_socket") or sock_path)
    except (ValueError, AttributeError):
        pass   # the agent answers a configuration that does not parse
    if os.environ.get("CNI_COMMAND") == "VERSION":
        sys.stdout.write(json.dumps({"cniVersion": version if version in SUPPORTED_VERSIONS
                                     else SUPPORTED_VERSIONS[-1],
                                     "supportedVersions": SUPPORTED_VERSIONS}) + "\n")
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(("CNI_", "K8S_"))}
    fds = []
    netns = env.get("CNI_NETNS", "")
    if netns:
        try:
            fds.append(os.open(netns, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK))
        except OSError:
            pass   # DEL after the namespace went: the agent works by name
    header = json.dumps({"env": env, "stdin_len": len(stdin), "netns_fd": bool(fds)}).encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT_S)
    try:
        s.connect(sock_path)
        s.sendmsg([struct.pack("!I", len(header)) + header],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds
                  else [])
        s.sendall(stdin)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        answer = json.loads(reply)
    except FileNotFoundError:
        fail(version, 11, f"the ebpf-tproxy agent is not running (no {sock_path}): start it "
                          "(the ebpf-tproxy DaemonSet, or 'ebpf-tproxy agent --cni-socket "
                          f"{sock_path}')")
    except (OSError, ValueError) as e:
        fail(version, 11, f"the ebpf-tproxy agent at {sock_path} did not answer: {e}")
    finally:
        s.close()
    sys.stderr.write(answer.get("stderr", ""))
    sys.stdout.write(answer.get("stdout", ""))
    sys.exit(int(answer.get("code", 1)))


if __name__ == "__main__":
    main()
