/* SPDX-License-Identifier: GPL-2.0 */
/*
 * sock_ops.c - records each redirected connection for the proxy, and forgets it when
 * both ends have closed.
 *
 * The proxy asks SO_ORIGINAL_DST on its accepted socket, which is not the application's
 * socket, so the original destination kept in the application socket's sk_storage must
 * be copied into tp_conns under the connection's addresses. That is only possible once
 * the source port is known: at BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, which the kernel runs
 * before it sends the final ACK, so the entry exists before the proxy can accept().
 *
 * The entry is freed when both ends reached TCP_CLOSE (BPF_SOCK_OPS_STATE_CB), never by
 * LRU eviction: an application that connects and closes at once must still leave the
 * answer for a proxy that accepts late, as conntrack does for iptables. The proxy's end
 * is known from BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, which runs when the kernel creates
 * the accepted socket, before accept(). If it never ran (the proxy's accept queue was
 * full, the proxy runs outside the cgroup subtree), the application's close alone frees
 * the entry: no end is left that could ask, and nothing leaks.
 *
 * --ebpf-accelerate: both ends of a tracked connection join tp_accel here (tproxy_accel.h).
 *
 * Inbound: BPF_SOCK_OPS_TCP_LISTEN_CB registers the proxy's listener on the inbound port
 * in tp_listeners for sk_lookup, so a restarted proxy is picked up at its listen(), with
 * no reinstall. Accepted inbound sockets are marked in tp_sk_inbound for getsockopt.
 */
#include "tproxy_accel.h"
#include "tproxy_conn.h"
#include "tproxy_inbound.h"

static __always_inline void tp_conn_closed(struct tp_conn_key *k, int app_end)
{
	struct tp_conn *c = tp_conns.lookup(k);

	if (!c)
		return;
	if (app_end && !c->proxy_seen) {
		tp_conns.delete(k);
		tp_count(TP_R_CONN_RELEASED);
		return;
	}
	/* Fetch-free add (works before 5.12's atomic fetch): of two ends closing at once at
	 * least the later one reads 2; a second delete of the same key is harmless. */
	__sync_fetch_and_add(&c->closed, 1);
	if (c->closed >= 2 && !tp_conns.delete(k))
		tp_count(TP_R_CONN_RELEASED);
}

/* Is this socket in the instance's network namespace? Only then may it become the
 * target of the namespace's sk_lookup, which would otherwise hand connections across
 * namespaces. Kernels without bpf_get_netns_cookie() in sock_ops (before 5.15) are built
 * without the check (the loader probes), like connect4/6 without SO_NETNS_COOKIE. */
static __always_inline int tp_sockops_in_netns(struct bpf_sock_ops *skops,
					       const struct tp_config *cfg)
{
#ifdef TP_SOCKOPS_NETNS_COOKIE
	return !cfg->netns_cookie || bpf_get_netns_cookie(skops) == cfg->netns_cookie;
#else
	return 1;
#endif
}

/* Acceleration joins sockets by address alone, so it needs the network namespace check:
 * the loader refuses --ebpf-accelerate on kernels built without it. */
static __always_inline void tp_accel_join_checked(struct bpf_sock_ops *skops,
						  struct bpf_sock *sk)
{
#ifdef TP_SOCKOPS_NETNS_COOKIE
	struct tp_config *cfg;
	u8 gen;

	cfg = tp_active_config(&gen);
	if (cfg && tp_sockops_in_netns(skops, cfg))
		tp_accel_join(skops, sk, cfg);
#endif
}

static __always_inline void tp_register_listener(struct bpf_sock_ops *skops)
{
	struct tp_config *cfg;
	u8 local[16];
	u32 key;
	long err;
	u8 gen;

	cfg = tp_active_config(&gen);
	if (!cfg || (u16)skops->local_port != cfg->inbound_port || !(cfg->flags & TP_F_INBOUND))
		return;
	if (!tp_sockops_in_netns(skops, cfg))
		return;
	/* A listener on loopback (Kuma's validator listens on 127.0.0.1:15006) could never
	 * receive a connection from another host behind iptables either; registering it would
	 * displace the proxy's real listener. */
	if (skops->family == TP_AF_INET)
		tp_addr_from_ip4(local, skops->local_ip4);
	else
		tp_addr_from_ctx_ip6(local, skops->local_ip6);
	if (tp_addr_is_loopback_net(local))
		return;
	key = skops->family == TP_AF_INET ? TP_LISTENER_V4 : TP_LISTENER_V6;
	/* BCC expands sock_map_update() into a statement: it cannot sit in a condition. */
	err = tp_listeners.sock_map_update(skops, &key, BPF_ANY);
	tp_count(err ? TP_R_IN_LISTENER_FAILED : TP_R_IN_LISTENER_SET);
}

/* An accepted socket that sk_lookup steered to the proxy: the same decision again, on
 * the same four values (the proxy's socket has the address the client dialed). */
static __always_inline void tp_mark_inbound(struct bpf_sock_ops *skops, struct bpf_sock *sk,
					    const struct tp_conn_key *k)
{
	struct tp_config *cfg;
	u32 reason, *mark;
	u8 gen;

	cfg = tp_active_config(&gen);
	if (!cfg || !tp_sockops_in_netns(skops, cfg))
		return;
	if (!tp_inbound_decide(gen, cfg, k->app_addr, k->proxy_port, &reason))
		return;
	mark = tp_sk_inbound.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (mark)
		*mark = 1;
}

int sock_ops(struct bpf_sock_ops *skops)
{
	struct tp_conn_key k = {};
	struct tp_orig_dst *orig;
	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
		struct tp_conn c = {};

		orig = tp_sk_orig.sk_storage_get(sk, 0, 0);
		if (!orig)
			return 1;	/* not redirected by connect4/6 */
		tp_key_from_sockops(&k, skops, 0);
		__builtin_memcpy(&c.orig, orig, sizeof(c.orig));
		if (tp_conns.update(&k, &c)) {
			tp_count(TP_R_CONN_TRACK_FAILED);
			return 1;
		}
		tp_count(TP_R_CONN_TRACKED);
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		tp_accel_join_checked(skops, sk);
		break;
	}
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: {
		struct tp_conn *c;

		tp_key_from_sockops(&k, skops, 1);
		c = tp_conns.lookup(&k);
		if (c) {
			c->proxy_seen = 1;
			bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
			tp_accel_join_checked(skops, sk);
		} else {
			tp_mark_inbound(skops, sk, &k);
		}
		break;
	}
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		tp_register_listener(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != BPF_TCP_CLOSE)
			break;
		/* The application's end is the one with an sk_storage entry. */
		orig = tp_sk_orig.sk_storage_get(sk, 0, 0);
		tp_key_from_sockops(&k, skops, orig == NULL);
		tp_conn_closed(&k, orig != NULL);
		break;
	}
	return 1;
}
