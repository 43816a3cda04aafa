"""The BPF programs: where their source is, how BCC builds them, and where each attaches.

BCC only rewrites map method calls (tp_conns.lookup(...)) in its main source text, not in
included files, so the program files and their local headers are pasted into one text
here (each header once, like an include guard) and handed to BCC as the main file.
"""
import contextlib
import dataclasses
import os
import re
import sys
import tempfile

from . import bpfsys


def _bpf_dir():
    """The C sources: package data loader/bpf/ when installed, else the checkout's bpf/."""
    here = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(here, "bpf")
    if os.path.isfile(os.path.join(installed, "connect.c")):
        return installed
    return os.path.join(os.path.dirname(here), "bpf")


BPF_DIR = _bpf_dir()
PROGRAM_FILES = ("connect.c", "udp.c", "bind.c", "sock_ops.c", "getsockopt.c",
                 "getpeername.c", "sk_lookup.c", "sk_msg.c", "learn_cookie.c")
_INCLUDE = re.compile(r'^\s*#include "([^"]+)"\s*$')


@dataclasses.dataclass(frozen=True)
class Program:
    name: str           # function in bpf/*.c, also the link's pin name
    prog_type: int
    attach_type: int
    hook: str           # what `status` and `check` call it
    required: bool      # False: missing on this kernel -> documented fallback
    missing_means: str  # what the user loses without it
    # attached to the node's cgroup, to each registered network namespace, to a map, or
    # nowhere ("none": run by the loader itself, for a moment)
    target: str = "cgroup"


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
    Program("bind4", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET4_BIND,
            "cgroup/bind4", True, ""),
    Program("bind6", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET6_BIND,
            "cgroup/bind6", True, ""),
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
    # Never attached to the node's cgroup: probe.learn_netns_cookie() runs it on a
    # temporary cgroup of its own, so that no install after the first needs a compiler.
    Program("learn_netns_cookie", bpfsys.PROG_CGROUP_SOCK, bpfsys.CGROUP_INET_SOCK_CREATE,
            "temporary cgroup/sock_create", True, "", target="none"),
    Program("sk_lookup_inbound", bpfsys.PROG_SK_LOOKUP, bpfsys.SK_LOOKUP, "netns/sk_lookup",
            False, "no inbound capture (needs 5.9): install with --redirect-inbound=false",
            target="netns"),
    # Attached to the tp_accel map itself (no link: the attachment lives with the map).
    Program("sk_msg_accel", bpfsys.PROG_SK_MSG, bpfsys.SK_MSG_VERDICT, "sockhash/sk_msg",
            False, "--ebpf-accelerate is unavailable (needs sk_msg with sk_storage and the "
            "netns cookie, 5.15)", target="map:tp_accel"),
)


# Newer kernels' headers carry constructs clang 14 (Debian 12's BCC) warns about: unknown
# attributes, and in 6.12 duplicate address-space specifiers (asm/current.h). Those are
# about the headers, not our code; bcc_compile() below keeps whatever else they draw out of
# install's and check's output.
QUIET_CFLAGS = ["-Wno-ignored-attributes", "-Wno-unknown-attributes",
                "-Wno-duplicate-decl-specifier"]
OUR_TEXT = "/virtual/main.c:"   # where clang places the text BCC hands it


@contextlib.contextmanager
def fd2_captured():
    """Everything written to fd 2 inside the block (libbcc and clang write there from C++,
    past Python's sys.stderr) goes to a temporary file; yields a function that reads it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: (tmp.seek(0), tmp.read().decode(errors="replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def bcc_compile(text, cflags):
    """bcc.BPF(text) without the kernel headers' warnings in our output. A diagnostic in our
    own text is a bug of ours: it is passed on. A failed build raises with clang's first
    error line, so the caller's one-line message names it."""
    from bcc import BPF
    with fd2_captured() as read:
        try:
            bpf = BPF(text=text, cflags=cflags)
            failed = None
        except Exception as e:   # BCC raises a bare Exception
            failed = e
        said = read()
    ours = [line for line in said.splitlines() if line.startswith(OUR_TEXT)]
    if failed is not None:
        first = next((line for line in said.splitlines() if "error:" in line), None)
        raise Exception(f"{first} ({str(failed).splitlines()[0]})" if first
                        else str(failed)) from None
    if ours:
        sys.stderr.write(said)
    return bpf


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
    cflags = [f'-DTP_PIN_DIR="{pin_dir}"'] + cflags_for(features) + QUIET_CFLAGS
    return bcc_compile(source().encode(), cflags)


def load(bpf, prog):
    """Load one program through the verifier; returns its fd (owned by bpf)."""
    # Programs attached to a map are loaded without an expected attach type.
    expected = -1 if prog.target.startswith("map:") else prog.attach_type
    return bpf.load_func(prog.name.encode(), prog.prog_type, attach_type=expected).fd


def cflags_for(features=()):
    """The build flags besides the pin directory: probed features and test seams."""
    flags = [f"-D{f}" for f in features]
    # Test seam: the perf event array `trace` uses before 5.8, on a kernel with a ring
    # buffer, so that both paths are tested on every kernel.
    if os.environ.get("EBPF_TPROXY_TEST_PERF_EVENTS") == "1":
        flags = [f for f in flags if f != "-DTP_HAVE_RINGBUF"]
    # Test seams: a small connection table, to show what a full one does; a build tag,
    # which makes a program set of new code out of the same sources (an upgrade).
    if os.environ.get("EBPF_TPROXY_TEST_CONN_MAX"):
        flags.append(f"-DTP_CONN_MAX={int(os.environ['EBPF_TPROXY_TEST_CONN_MAX'])}")
    if os.environ.get("EBPF_TPROXY_TEST_BUILD_TAG"):
        flags.append(f"-DTP_TEST_BUILD_TAG={int(os.environ['EBPF_TPROXY_TEST_BUILD_TAG'])}")
    # Bench seam: a node set without any trace code, what bench/trace_cost.py compares
    # tracing off with.
    if os.environ.get("EBPF_TPROXY_TEST_NO_TRACE") == "1":
        flags.append("-DTP_NO_TRACE")
    return flags


def digest(features=()):
    """What the node program set was built from (our sources and build flags, not the
    kernel headers): install rebuilds only when this changes."""
    import hashlib
    h = hashlib.sha256(source().encode())
    h.update("\0".join(cflags_for(features)).encode())
    return h.hexdigest()[:16]
