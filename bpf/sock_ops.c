/* SPDX-License-Identifier: GPL-2.0 */
/*
 * sock_ops.c - carries each redirected connection's original destination from the
 * application's socket to the proxy's accepted socket, and registers the proxy's inbound
 * listeners for sk_lookup.
 *
 * The proxy asks SO_ORIGINAL_DST on its accepted socket, which is not the application's
 * socket. Behind iptables conntrack answers, by connection. Here:
 *  - BPF_SOCK_OPS_TCP_CONNECT_CB, on the application's socket right before its SYN leaves
 *    (the source port is chosen by then), records the original destination in tp_conns
 *    under the connection's addresses and namespace;
 *  - BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, when the kernel creates the proxy's socket for it
 *    (the final ACK; with TCP Fast Open the SYN itself), moves the entry into that socket's
 *    tp_sk_answer, where getsockopt reads it for as long as the socket lives.
 * So tp_conns spans the handshake only: a full table takes hundreds of thousands of
 * handshakes in flight at once, and is counted (conn_track_failed) and answered with an
 * error, never with another connection's destination. An entry the proxy never takes (the
 * connection was refused, the proxy's accept queue was full, the proxy runs outside the
 * cgroup subtree) is deleted when the application's socket closes (BPF_SOCK_OPS_STATE_CB).
 *
 * Recording at the SYN rather than at ACTIVE_ESTABLISHED is what makes TCP Fast Open work:
 * a Fast Open listener creates its socket at the SYN, before the application's side is
 * established, and the proxy may accept and ask at once.
 *
 * --ebpf-accelerate: both ends of a redirected connection join tp_accel here
 * (tproxy_accel.h).
 *
 * Every socket's namespace: the application's from tp_sk_orig (connect4/6 wrote it with
 * the original destination), the proxy's from bpf_get_netns_cookie() (5.15) or else from
 * tp_sk_ns (tproxy_conn.h). A socket of no registered namespace is left alone.
 *
 * Inbound: BPF_SOCK_OPS_TCP_LISTEN_CB registers each proxy listener on the inbound port
 * in a free slot of its namespace's row of tp_listeners for sk_lookup, so a restarted proxy is picked up at its
 * listen(), with no reinstall, and every member of a SO_REUSEPORT group (Envoy: one per
 * worker) is there. Accepted inbound sockets get their answer (the address dialed) in
 * tp_sk_answer.
 */
#include "tproxy_accel.h"
#include "tproxy_conn.h"
#include "tproxy_inbound.h"

#define TP_EEXIST 17

/* Acceleration joins sockets by address and namespace, and the proxy's socket can tell
 * its namespace only from 5.15: the loader refuses --ebpf-accelerate without it. */
static __always_inline void tp_accel_join_checked(struct bpf_sock_ops *skops,
						  struct bpf_sock *sk, const struct tp_config *cfg)
{
#ifdef TP_SOCKOPS_NETNS_COOKIE
	tp_accel_join(skops, sk, cfg);
#endif
}

/* The application's SYN is about to leave: record where it was going. */
static __always_inline void tp_conn_record(struct bpf_sock_ops *skops,
					   const struct tp_sk_orig *o,
					   const struct tp_config *cfg)
{
	struct tp_conn_key k = {};
	struct tp_conn c = {};
	long err;

	tp_key_from_sockops(&k, skops, 0, o->netns_cookie);
	__builtin_memcpy(&c.orig, &o->orig, sizeof(c.orig));
	/* Never overwrite blindly (BPF_ANY): a live entry under the same key would be another
	 * connection's answer. None can be live: the application's socket owns this 4-tuple
	 * in its namespace now, so an entry already there is a dead connection's. */
	err = tp_conns.insert(&k, &c);
	if (err == -TP_EEXIST) {
		err = tp_conns.update(&k, &c);
		if (!err)
			tp_count(cfg->netns_cookie, TP_R_CONN_REPLACED);
	}
	if (err) {
		tp_count(cfg->netns_cookie, TP_R_CONN_TRACK_FAILED);
		return;
	}
	tp_count(cfg->netns_cookie, TP_R_CONN_TRACKED);
	/* To delete the entry if the proxy never takes it (see the header comment). */
	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void tp_answer_set(struct bpf_sock *sk, const struct tp_orig_dst *orig,
					  u32 kind, const struct tp_config *cfg)
{
	struct tp_answer *a = tp_sk_answer.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (!a) {
		/* SO_ORIGINAL_DST fails for it: loud, not wrong */
		tp_count(cfg->netns_cookie, TP_R_NO_STORAGE);
		return;
	}
	__builtin_memcpy(&a->orig, orig, sizeof(a->orig));
	a->kind = kind;
	a->netns_cookie = cfg->netns_cookie;
}

static __always_inline void tp_register_listener(struct bpf_sock_ops *skops,
						 struct bpf_sock *sk)
{
	struct tp_config *cfg;
	u32 key, base, i;
	u8 local[16];
	long err = -1;

	cfg = tp_ns_config(tp_sockops_netns(skops, sk));
	if (!cfg || (u16)skops->local_port != cfg->inbound_port || !(cfg->flags & TP_F_INBOUND))
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
	base = (cfg->ns_index * 2 +
		(skops->family == TP_AF_INET ? TP_LISTENER_V4 : TP_LISTENER_V6)) *
	       TP_LISTENER_SLOTS;
	/* The first free slot: BPF_NOEXIST fails on a slot whose socket still lives (the
	 * kernel empties a slot when its socket closes). Unrolled for the 5.x verifiers. */
#pragma unroll
	for (i = 0; i < TP_LISTENER_SLOTS; i++) {
		key = base + i;
		/* BCC expands sock_map_update() into a statement: it cannot sit in a
		 * condition. */
		err = tp_listeners.sock_map_update(skops, &key, BPF_NOEXIST);
		if (!err)
			break;
	}
	tp_count(cfg->netns_cookie, err ? TP_R_IN_LISTENER_FAILED : TP_R_IN_LISTENER_SET);
}

/* An accepted socket that sk_lookup steered to the proxy: the same decision again, on
 * the same four values (the proxy's socket has the address the client dialed, which is
 * therefore the answer: no NAT happened). */
static __always_inline void tp_mark_inbound(struct bpf_sock *sk, const struct tp_conn_key *k,
					    const struct tp_config *cfg)
{
	struct tp_orig_dst orig = {};
	u32 reason;

	if (!tp_inbound_decide(cfg, k->app_addr, k->proxy_port, &reason))
		return;
	__builtin_memcpy(orig.addr, k->proxy_addr, 16);
	orig.port = k->proxy_port;
	orig.family = tp_addr_is_mapped(k->proxy_addr) ? TP_AF_INET : TP_AF_INET6;
	tp_answer_set(sk, &orig, TP_ANSWER_INBOUND, cfg);
}

/* The application's socket and its namespace's configuration, if connect4/6 redirected
 * it and the namespace is still registered. */
static __always_inline struct tp_sk_orig *tp_app_orig(struct bpf_sock *sk,
						      struct tp_config **cfg)
{
	struct tp_sk_orig *o = tp_sk_orig.sk_storage_get(sk, 0, 0);

	if (!o)
		return NULL;
	*cfg = tp_ns_config(o->netns_cookie);
	return *cfg ? o : NULL;
}

int sock_ops(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct tp_conn_key k = {};
	struct tp_config *cfg = NULL;
	struct tp_sk_orig *o;
	struct tp_conn *c;
	u64 netns;

	if (!sk)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* Only sockets connect4/6 redirected have an original destination: every
		 * other connect() leaves after this one lookup. */
		o = tp_app_orig(sk, &cfg);
		if (o && cfg)
			tp_conn_record(skops, o, cfg);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (tp_app_orig(sk, &cfg) && cfg)
			tp_accel_join_checked(skops, sk, cfg);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		netns = tp_sockops_netns(skops, sk);
		cfg = tp_ns_config(netns);
		if (!cfg)
			break;
		tp_key_from_sockops(&k, skops, 1, netns);
		c = tp_conns.lookup(&k);
		if (!c) {
			tp_mark_inbound(sk, &k, cfg);
			break;
		}
		tp_answer_set(sk, &c->orig, TP_ANSWER_OUTBOUND, cfg);
		if (!tp_conns.delete(&k))
			tp_count(netns, TP_R_CONN_RELEASED);
		tp_accel_join_checked(skops, sk, cfg);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		tp_register_listener(skops, sk);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* Set on recorded application sockets only: drop an entry the proxy never
		 * took (refused, never accepted, proxy outside the cgroup). Even if the
		 * namespace was unregistered since: nothing of it may stay behind. */
		if (skops->args[1] != BPF_TCP_CLOSE)
			break;
		o = tp_sk_orig.sk_storage_get(sk, 0, 0);
		if (!o)
			break;
		tp_key_from_sockops(&k, skops, 0, o->netns_cookie);
		if (!tp_conns.delete(&k))
			tp_count(o->netns_cookie, TP_R_CONN_RELEASED);
		break;
	}
	return 1;
}
