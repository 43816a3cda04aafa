"""Feature probes: load a tiny program for each hook the node program set needs and see whether
the verifier takes it. Nothing is attached; the programs and their maps go away with the
BPF object."""
from . import bpfsys

_CONNECT = r"""
int probe_connect{n}(struct bpf_sock_addr *ctx)
{{
	u32 *v = probe_sks.sk_storage_get(ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	return bpf_get_netns_cookie(ctx) && v ? 1 : 1;
}}
int probe_udp{n}(struct bpf_sock_addr *ctx)
{{
	return probe_sks.sk_storage_get(ctx->sk, 0, 0) ? 1 : 1;
}}
int probe_recv{n}(struct bpf_sock_addr *ctx)
{{
	return probe_sks.sk_storage_get(ctx->sk, 0, 0) ? 1 : 1;
}}
int probe_getpeername{n}(struct bpf_sock_addr *ctx)
{{
	return probe_sks.sk_storage_get(ctx->sk, 0, 0) ? 1 : 1;
}}
"""

# BCC caches a loaded function by name, so each attach type gets its own function (and
# BCC refuses map calls inside macros, hence the Python formatting).
PROBE_SOURCE = r"""
#include <uapi/linux/bpf.h>
BPF_SK_STORAGE(probe_sks, u32);
int probe_sock_ops(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (sk && probe_sks.sk_storage_get(sk, 0, 0))
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
	return 1;
}
int probe_sock_ops_netns(struct bpf_sock_ops *skops)
{
	return bpf_get_netns_cookie(skops) ? 1 : 1;
}
int probe_sk_lookup(struct bpf_sk_lookup *ctx)
{
	return SK_PASS;
}
BPF_SOCKHASH(probe_hash, u32, 1);
int probe_sk_msg(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	u32 key = 0;
	if (!sk || !probe_sks.sk_storage_get(sk, 0, 0))
		return SK_PASS;
	return probe_hash.msg_redirect_hash(msg, &key, BPF_F_INGRESS);
}
int probe_getsockopt(struct bpf_sockopt *ctx)
{
	ctx->optlen = 0;
	return 1;
}
int probe_getsockopt_current(struct bpf_sockopt *ctx)
{
	char comm[16];
	bpf_get_current_comm(comm, sizeof(comm));
	ctx->optlen = 0;
	return (bpf_get_current_pid_tgid() && comm[0]) ? 1 : 1;
}
""" + _CONNECT.format(n=4) + _CONNECT.format(n=6)

# (feature, probe function, prog type, attach type, what it enables)
PROBES = (
    ("cgroup/connect4 + sk_storage + netns cookie", "probe_connect4",
     bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET4_CONNECT, ("connect4",)),
    ("cgroup/connect6", "probe_connect6",
     bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET6_CONNECT, ("connect6",)),
    ("cgroup/sendmsg4", "probe_udp4",
     bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_UDP4_SENDMSG, ("sendmsg4",)),
    ("cgroup/sendmsg6", "probe_udp6",
     bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_UDP6_SENDMSG, ("sendmsg6",)),
    ("cgroup/recvmsg4", "probe_recv4",
     bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_UDP4_RECVMSG, ("recvmsg4",)),
    ("cgroup/recvmsg6", "probe_recv6",
     bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_UDP6_RECVMSG, ("recvmsg6",)),
    ("cgroup/sock_ops with skops->sk", "probe_sock_ops",
     bpfsys.PROG_SOCK_OPS, bpfsys.CGROUP_SOCK_OPS, ("sock_ops",)),
    ("cgroup/getsockopt", "probe_getsockopt",
     bpfsys.PROG_CGROUP_SOCKOPT, bpfsys.CGROUP_GETSOCKOPT, ("getsockopt_orig_dst",)),
    ("cgroup/getpeername4", "probe_getpeername4",
     bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET4_GETPEERNAME, ("getpeername4",)),
    ("cgroup/getpeername6", "probe_getpeername6",
     bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET6_GETPEERNAME, ("getpeername6",)),
    ("netns/sk_lookup", "probe_sk_lookup",
     bpfsys.PROG_SK_LOOKUP, bpfsys.SK_LOOKUP, ("sk_lookup_inbound",)),
    ("sock_ops netns cookie", "probe_sock_ops_netns",
     bpfsys.PROG_SOCK_OPS, bpfsys.CGROUP_SOCK_OPS, ()),
    ("getsockopt pid and comm (trace)", "probe_getsockopt_current",
     bpfsys.PROG_CGROUP_SOCKOPT, bpfsys.CGROUP_GETSOCKOPT, ()),
    # attached to a map, so loaded without an expected attach type (-1)
    ("sockhash/sk_msg + sk_storage", "probe_sk_msg", bpfsys.PROG_SK_MSG, -1,
     ("sk_msg_accel",)),
)

# A BPF ring buffer (5.8; its helpers came with it, for every program type): what `trace`
# reads where it exists. Asked of the kernel by libbpf without compiling anything (each
# compile costs minutes in the emulated kernels of make kernels).
RINGBUF = "ring buffer (trace)"

# Probed features that change how the programs are built: probe name -> -D macro.
FEATURE_MACROS = {"sock_ops netns cookie": "TP_SOCKOPS_NETNS_COOKIE",
                  RINGBUF: "TP_HAVE_RINGBUF",
                  "getsockopt pid and comm (trace)": "TP_SOCKOPT_CURRENT"}
FEATURE_FALLBACK = {
    "getsockopt pid and comm (trace)": "without them (5.10 has neither), `trace` shows "
    "SO_ORIGINAL_DST answers with the proxy's uid but no pid or command name",
    RINGBUF: "without it (before 5.8), `trace` reads a perf event array instead: one buffer "
    "per CPU, read by one trace at a time",
    "sock_ops netns cookie": "without it (before 5.15), sock_ops tells the namespace of a "
    "proxy's socket from the mark bind4/6 left on its listener (a proxy listening since "
    "before install is marked by install), and sockmap acceleration is off "
    "(--ebpf-accelerate=true is refused)",
    "SO_NETNS_COOKIE": "without it (before 5.14), the loader learns its network namespace's "
    "cookie from a cgroup/sock_create program in a temporary child cgroup instead",
    "instance netns cookie": "without it, install cannot register the namespace: the node "
    "program set acts only on registered namespaces' sockets (install refuses)",
}

# cgroup/sock_create has bpf_get_netns_cookie() from 5.7, as every sock_addr hook does:
# what the loader needs before SO_NETNS_COOKIE (5.14) to name its namespace.
COOKIE_SOURCE = r"""
#include <uapi/linux/bpf.h>
BPF_ARRAY(learned_cookie, u64, 1);
int learn_netns_cookie(struct bpf_sock *ctx)
{
	u32 zero = 0;
	u64 cookie = bpf_get_netns_cookie(ctx);

	learned_cookie.update(&zero, &cookie);
	return 1;
}
"""


def learn_netns_cookie(program=None):
    """The caller's network namespace cookie: SO_NETNS_COOKIE where the kernel has it, else
    read by a tiny cgroup/sock_create program attached (by an unpinned link, gone with this
    process's fd) to a temporary child cgroup of its own, in which a child of this thread
    (so: in this network namespace) creates one socket. program: (fd, pinned map) of
    the node set's learn_netns_cookie, so that no compiler is needed; else one is built.
    Returns (cookie, how); cookie 0 if neither works."""
    import ctypes as ct
    import os
    import subprocess
    import sys
    import threading

    from . import kernel

    cookie = bpfsys.netns_cookie()
    if cookie:
        return cookie, "SO_NETNS_COOKIE"
    root = kernel.cgroup2_mount()
    if root is None:
        return 0, "no cgroup2 mount to run the cookie program in"
    bpf = None
    cg = os.path.join(root, f"ebpf-tproxy-cookie-{os.getpid()}-{threading.get_native_id()}")
    try:
        if program is None:
            from .programs import QUIET_CFLAGS, bcc_compile, fd2_captured
            bpf = bcc_compile(COOKIE_SOURCE.encode(), QUIET_CFLAGS)
            with fd2_captured():
                prog_fd = bpf.load_func(b"learn_netns_cookie", bpfsys.PROG_CGROUP_SOCK,
                                        attach_type=bpfsys.CGROUP_INET_SOCK_CREATE).fd

            def read():
                return bpf[b"learned_cookie"][ct.c_int(0)].value
        else:
            prog_fd, map_pin = program

            def read():
                with bpfsys.PinnedMap(map_pin, ct.c_uint32, ct.c_uint64) as m:
                    return m.lookup(ct.c_uint32(0)).value
        os.mkdir(cg, 0o700)
        cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
        try:
            link = bpfsys.link_create(prog_fd, cg_fd, bpfsys.CGROUP_INET_SOCK_CREATE)
        finally:
            os.close(cg_fd)
        try:
            # A child joins the cgroup, makes one socket and leaves. Started with exec, not
            # a bare fork: the agent calls this from one of several threads, and a forked
            # copy of a threaded Python may deadlock on a lock another thread held. It is
            # in the calling thread's network namespace, as every child of that thread is.
            child = subprocess.run(
                [sys.executable, "-c",
                 "import socket, sys\n"
                 "open(sys.argv[1], 'w').write('0')\n"
                 "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()\n",
                 os.path.join(cg, "cgroup.procs")], capture_output=True, timeout=60)
        finally:
            os.close(link)
        if child.returncode != 0:
            return 0, "the cookie program's child could not join its cgroup"
        return read(), ("learned by a cgroup/sock_create program (no SO_NETNS_COOKIE before "
                        "5.14)")
    except Exception as e:   # BCC raises bare Exception; OSError from the cgroup
        return 0, f"the cookie program failed ({str(e).splitlines()[0]})"
    finally:
        if os.path.isdir(cg):
            os.rmdir(cg)
        if bpf is not None:
            bpf.cleanup()


def probe_ringbuf():
    """(ok, detail): whether the kernel has the ring buffer map type."""
    try:
        ok = bpfsys.has_map_type(bpfsys.MAP_TYPE_RINGBUF)
    except OSError as e:
        return False, str(e)
    return ok, ("BPF_MAP_TYPE_RINGBUF: trace reads a ring buffer" if ok
                else "no BPF_MAP_TYPE_RINGBUF (before 5.8)")


def build_features(results):
    return tuple(FEATURE_MACROS[f] for f, ok, _, _ in results if ok and f in FEATURE_MACROS)


def probe_hooks(learn_cookie=True):
    """[(feature, ok, error (or a detail when ok), programs it enables)]; raises if BCC
    cannot compile at all."""
    from .programs import QUIET_CFLAGS, bcc_compile, fd2_captured
    bpf = bcc_compile(PROBE_SOURCE.encode(), QUIET_CFLAGS)
    results = []
    try:
        for feature, fn, ptype, atype, progs in PROBES:
            try:
                # libbcc writes the verifier's log to fd 2 when a load fails; a probe that
                # fails on an older kernel is an answer, not an error for install's output.
                with fd2_captured():
                    bpf.load_func(fn.encode(), ptype, attach_type=atype)
                results.append((feature, True, "", progs))
            except Exception as e:   # BCC raises bare Exception for verifier refusals
                results.append((feature, False, str(e).splitlines()[0], progs))
    finally:
        bpf.cleanup()
    results.append((RINGBUF, *probe_ringbuf(), ()))
    # Not hooks: how the loader learns its namespace's cookie (getsockopt, 5.14; else a
    # program), which every hook compares with the socket's.
    cookie = bpfsys.netns_cookie()
    results.append(("SO_NETNS_COOKIE", cookie != 0,
                    "supported" if cookie else "getsockopt(SO_NETNS_COOKIE) is not supported",
                    ()))
    if learn_cookie:   # install learns it itself, with the node set's own program
        learned, how = learn_netns_cookie()
        results.append(("instance netns cookie", learned != 0, how, ()))
    return results
