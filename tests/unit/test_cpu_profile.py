"""bench/cpu_profile.py's buckets: each perf sample lands where its nearest kernel frame
says (our programs, our storage, the sockhash, TCP/IP, ...), and the acceleration bound is
computed from no capture's profile (no root, no perf)."""
from .bench_modules import load


def _profile():
    return load("cpu_profile")


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


def test_the_sockmaps_receive_and_helpers_are_the_sockmaps_not_tcp_ip_or_ours():
    p = _profile()
    script = "\n\n".join([
        # the receive from the psock's queue: __sk_msg_recvmsg under tcp_bpf_recvmsg
        _sample("wrk", ("_copy_to_iter", K), ("copy_page_to_iter", K),
                ("__sk_msg_recvmsg", K), ("tcp_bpf_recvmsg", K), ("inet_recvmsg", K)),
        # joining: the helper our sock_ops program calls
        _sample("haproxy", ("_raw_spin_lock_bh", K), ("sock_hash_update_common", K),
                ("bpf_sock_hash_update", K),
                ("bpf_prog_0123456789abcdef_sock_ops", "[bpf_prog]")),
        _sample("haproxy", ("bpf_msg_redirect_hash", K),
                ("bpf_prog_0123456789abcdef_sk_msg_accel", "[bpf_prog]")),
    ])
    counts, _leaves = p.parse(script)
    assert counts == {"sockmap": 3, "proxy sockmap": 2}


def test_user_space_frames_never_match_a_kernel_bucket():
    p = _profile()
    haproxy = "/usr/sbin/haproxy"
    counts, _leaves = p.parse(_sample("haproxy", ("tcp_process_data", haproxy),
                                      ("inet_pton", "/usr/lib/x86_64-linux-gnu/libc.so.6")))
    assert counts == {"user": 1, "proxy user": 1}


def test_an_idle_cpu_doing_claimed_work_is_not_idle():
    p = _profile()
    script = "\n\n".join([
        _sample("swapper", ("tcp_v4_rcv", K), ("ip_local_deliver_finish", K),
                ("net_rx_action", K), ("handle_softirqs", K), ("default_idle", K)),
        _sample("swapper", ("kfree", K), ("bpf_local_storage_free_rcu", K),
                ("rcu_core", K), ("default_idle", K)),
        _sample("swapper", ("rcu_core", K), ("default_idle", K)),
    ])
    counts, _leaves = p.parse(script)
    assert counts == {"tcp/ip": 1, "sk_storage": 1, "idle": 1}


def test_the_acceleration_bound_takes_half_of_no_captures_tcp_ip_but_its_copies_off():
    p = _profile()
    run = {b: 0.0 for b in p.BUCKETS}
    run.update({"tcp/ip": 50.0, "user": 50.0, "other kernel": 100.0, "tcp/ip copies": 10.0})
    assert abs(p.acceleration_bound(run) - 200 / 180) < 1e-9
