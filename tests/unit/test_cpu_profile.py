"""bench/cpu_profile.py's buckets: each perf sample lands where its nearest kernel frame
says (our programs, our storage, the sockhash, TCP/IP, ...), and the acceleration bound is
computed from no capture's profile (no root, no perf)."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _profile():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_cpu_profile", os.path.join(ROOT, "bench", "cpu_profile.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))


def _sample(comm, *frames):
    """A perf script block (-F comm,ip,sym,dso), leaf first: (sym, dso) pairs."""
    return "\n".join([f"{comm}  1234 [001]"] +
                     [f"\t ffffffff81000000 {sym}+0x10 ({dso})" for sym, dso in frames])


K = "[kernel.kallsyms]"


def test_each_sample_lands_in_the_bucket_of_its_nearest_known_frame():
    p = _profile()
    script = "\n\n".join([
        _sample("wrk", ("bpf_prog_0123456789abcdef_connect4", "[bpf_prog]"),
                ("__cgroup_bpf_run_filter_sock_addr", K), ("__sys_connect", K)),
        _sample("haproxy", ("kmalloc_trace", K), ("bpf_selem_alloc", K),
                ("bpf_sk_storage_get", K), ("bpf_prog_0123456789abcdef_sock_ops", "[bpf_prog]")),
        _sample("haproxy", ("copy_user_generic", K), ("sk_msg_memcopy_from_iter", K),
                ("tcp_bpf_sendmsg", K), ("__sys_sendto", K)),
        _sample("haproxy", ("copy_user_generic", K), ("tcp_sendmsg_locked", K),
                ("tcp_sendmsg", K), ("__sys_sendto", K)),
        _sample("nginx", ("_raw_spin_unlock", K), ("__schedule", K), ("schedule", K)),
        _sample("wrk", ("memcpy", "/usr/lib/x86_64-linux-gnu/libc.so.6")),
        _sample("swapper", ("default_idle", K)),
        _sample("python3", ("tcp_sendmsg", K)),
    ])
    counts, leaves = p.parse(script)
    assert counts == {"our programs": 1, "sk_storage": 1, "sockmap": 1, "tcp/ip": 1,
                      "other kernel": 1, "user": 1, "idle": 1,
                      "proxy sk_storage": 1, "proxy sockmap": 1, "proxy tcp/ip": 1}
    assert leaves["other kernel"] == {"_raw_spin_unlock": 1}
    assert leaves["sockmap"] == {"copy_user_generic": 1}
    assert leaves["tcp/ip"] == {"copy_user_generic": 1}
    assert "user" not in leaves


def test_the_acceleration_bound_takes_half_of_no_captures_tcp_ip_but_its_copies_off():
    p = _profile()
    none = {b: 0.0 for b in p.BUCKETS}
    none.update({"tcp/ip": 50.0, "user": 50.0, "other kernel": 100.0})
    leaves = {"_copy_to_iter": 6.0, "_copy_from_iter": 4.0, "tcp_ack": 40.0}
    assert abs(p.acceleration_bound({"none": none}, leaves) - 200 / 180) < 1e-9
