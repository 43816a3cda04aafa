"""The BPF programs: where their source is, how BCC builds them, and where each attaches.

BCC only rewrites map method calls (tp_conns.lookup(...)) in its main source text, not in
included files, so the program files and their local headers are pasted into one text
here (each header once, like an include guard) and handed to BCC as the main file.
"""
import dataclasses
import os
import re

from . import bpfsys

BPF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bpf")
PROGRAM_FILES = ("connect.c", "udp.c", "sock_ops.c", "getsockopt.c", "getpeername.c",
                 "sk_lookup.c", "sk_msg.c")
_INCLUDE = re.compile(r'^\s*#include "([^"]+)"\s*$')


@dataclasses.dataclass(frozen=True)
class Program:
    name: str           # function in bpf/*.c, also the link's pin name
    prog_type: int
    attach_type: int
    hook: str           # what `status` and `check` call it
    required: bool      # False: missing on this kernel -> documented fallback
    missing_means: str  # what the user loses without it
    target: str = "cgroup"   # attached to the cgroup, the network namespace, or a map


PROGRAMS = (
    Program("connect4", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET4_CONNECT,
            "cgroup/connect4", True, ""),
    Program("connect6", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET6_CONNECT,
            "cgroup/connect6", True, ""),
    Program("sendmsg4", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_UDP4_SENDMSG,
            "cgroup/sendmsg4", True, ""),
    Program("sendmsg6", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_UDP6_SENDMSG,
            "cgroup/sendmsg6", True, ""),
    Program("recvmsg4", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_UDP4_RECVMSG,
            "cgroup/recvmsg4", True, ""),
    Program("recvmsg6", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_UDP6_RECVMSG,
            "cgroup/recvmsg6", True, ""),
    Program("sock_ops", bpfsys.PROG_SOCK_OPS, bpfsys.CGROUP_SOCK_OPS,
            "cgroup/sock_ops", True, ""),
    Program("getsockopt_orig_dst", bpfsys.PROG_CGROUP_SOCKOPT, bpfsys.CGROUP_GETSOCKOPT,
            "cgroup/getsockopt", True, ""),
    Program("getpeername4", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET4_GETPEERNAME,
            "cgroup/getpeername4", False,
            "applications see 127.0.0.1:<outbound port> from getpeername() (needs 5.8)"),
    Program("getpeername6", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET6_GETPEERNAME,
            "cgroup/getpeername6", False,
            "applications see [::1]:<outbound port> from getpeername() (needs 5.8)"),
    Program("sk_lookup_inbound", bpfsys.PROG_SK_LOOKUP, bpfsys.SK_LOOKUP, "netns/sk_lookup",
            False, "no inbound capture (needs 5.9): install with --redirect-inbound=false",
            target="netns"),
    # Attached to the tp_accel map itself (no link: the attachment lives with the map).
    Program("sk_msg_accel", bpfsys.PROG_SK_MSG, bpfsys.SK_MSG_VERDICT, "sockhash/sk_msg",
            False, "--ebpf-accelerate is unavailable (needs sk_msg with sk_storage, 5.15 "
            "with the sock_ops netns check)", target="map:tp_accel"),
)


# Newer kernels' headers carry attributes clang 14 (Debian 12's BCC) does not know; its
# warnings about them (seen with 6.12's headers) are about the headers, not our code, and
# would otherwise land in install's output.
QUIET_CFLAGS = ["-Wno-ignored-attributes", "-Wno-unknown-attributes"]


def source(files=PROGRAM_FILES, bpf_dir=BPF_DIR):
    """One text: the program files with our own headers pasted in, each once."""
    seen = set()

    def expand(name):
        if name in seen:
            return ""
        seen.add(name)
        out = []
        with open(os.path.join(bpf_dir, name)) as f:
            for line in f:
                m = _INCLUDE.match(line)
                out.append(expand(m.group(1)) if m else line)
        return "".join(out)

    return "".join(expand(f) for f in files)


def compile_programs(pin_dir, features=()):
    """Build every program with BCC; maps are opened at (or created and pinned under)
    pin_dir. features: probed kernel features, each a -D macro (TP_SOCKOPS_NETNS_COOKIE).
    Returns the bcc.BPF object."""
    from bcc import BPF
    cflags = [f'-DTP_PIN_DIR="{pin_dir}"'] + [f"-D{f}" for f in features] + QUIET_CFLAGS
    return BPF(text=source().encode(), cflags=cflags)


def load(bpf, prog):
    """Load one program through the verifier; returns its fd (owned by bpf)."""
    # Programs attached to a map are loaded without an expected attach type.
    expected = -1 if prog.target.startswith("map:") else prog.attach_type
    return bpf.load_func(prog.name.encode(), prog.prog_type, attach_type=expected).fd
