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
 * Inbound: BPF_SOCK_OPS_TCP_LISTEN_CB registers each proxy listener on the inbound port
 * in a free slot of tp_listeners for sk_lookup, so a restarted proxy is picked up at its
 * listen(), with no reinstall, and every member of a SO_REUSEPORT group (Envoy: one per
 * worker) is there. Accepted inbound sockets get their answer (the address dialed) in
 * tp_sk_answer.
 */
#include "tproxy_accel.h"
#include "tproxy_conn.h"
#include "tproxy_inbound.h"

#define TP_EEXIST 17

/* Is this socket in the instance's network namespace? Checked where the kernel can tell
 * (5.15); before that tp_sockops_netns() is the instance's own cookie, so this holds:
 * connect4/6's check on the application's socket is what scopes the outbound path, and
 * the listener registration is unchecked (check says so). */
static __always_inline int tp_sockops_in_netns(struct bpf_sock_ops *skops,
					       const struct tp_config *cfg)
{
	return !cfg->netns_cookie || tp_sockops_netns(skops, cfg) == cfg->netns_cookie;
}

/* Acceleration joins sockets by address alone, so it needs the network namespace check:
 * the loader refuses --ebpf-accelerate on kernels built without it. */
static __always_inline void tp_accel_join_checked(struct bpf_sock_ops *skops,
						  struct bpf_sock *sk, const struct tp_config *cfg)
{
#ifdef TP_SOCKOPS_NETNS_COOKIE
	if (tp_sockops_in_netns(skops, cfg))
		tp_accel_join(skops, sk, cfg);
#endif
}

/* The application's SYN is about to leave: record where it was going. */
static __always_inline void tp_conn_record(struct bpf_sock_ops *skops,
					   const struct tp_orig_dst *orig,
					   const struct tp_config *cfg)
{
	struct tp_conn_key k = {};
	struct tp_conn c = {};
	long err;

	tp_key_from_sockops(&k, skops, 0, tp_sockops_netns(skops, cfg));
	__builtin_memcpy(&c.orig, orig, sizeof(c.orig));
	/* Never overwrite blindly (BPF_ANY): a live entry under the same key would be another
	 * connection's answer. None can be live: the application's socket owns this 4-tuple
	 * in its namespace now, so an entry already there is a dead connection's. */
	err = tp_conns.insert(&k, &c);
	if (err == -TP_EEXIST) {
		err = tp_conns.update(&k, &c);
		if (!err)
			tp_count(TP_R_CONN_REPLACED);
	}
	if (err) {
		tp_count(TP_R_CONN_TRACK_FAILED);
		return;
	}
	tp_count(TP_R_CONN_TRACKED);
	/* To delete the entry if the proxy never takes it (see the header comment). */
	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void tp_answer_set(struct bpf_sock *sk, const struct tp_orig_dst *orig,
					  u32 kind)
{
	struct tp_answer *a = tp_sk_answer.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (!a) {
		tp_count(TP_R_NO_STORAGE);	/* SO_ORIGINAL_DST fails for it: loud, not wrong */
		return;
	}
	__builtin_memcpy(&a->orig, orig, sizeof(a->orig));
	a->kind = kind;
}

static __always_inline void tp_register_listener(struct bpf_sock_ops *skops)
{
	struct tp_config *cfg;
	u32 key, base, i;
	u8 local[16];
	long err = -1;
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
	base = (skops->family == TP_AF_INET ? TP_LISTENER_V4 : TP_LISTENER_V6) *
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
	tp_count(err ? TP_R_IN_LISTENER_FAILED : TP_R_IN_LISTENER_SET);
}

/* An accepted socket that sk_lookup steered to the proxy: the same decision again, on
 * the same four values (the proxy's socket has the address the client dialed, which is
 * therefore the answer: no NAT happened). */
static __always_inline void tp_mark_inbound(struct bpf_sock_ops *skops, struct bpf_sock *sk,
					    const struct tp_conn_key *k,
					    const struct tp_config *cfg, u8 gen)
{
	struct tp_orig_dst orig = {};
	u32 reason;

	if (!tp_sockops_in_netns(skops, cfg))
		return;
	if (!tp_inbound_decide(gen, cfg, k->app_addr, k->proxy_port, &reason))
		return;
	__builtin_memcpy(orig.addr, k->proxy_addr, 16);
	orig.port = k->proxy_port;
	orig.family = tp_addr_is_mapped(k->proxy_addr) ? TP_AF_INET : TP_AF_INET6;
	tp_answer_set(sk, &orig, TP_ANSWER_INBOUND);
}

int sock_ops(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct tp_conn_key k = {};
	struct tp_orig_dst *orig;
	struct tp_config *cfg;
	struct tp_conn *c;
	u8 gen = 0;

	if (!sk)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* Only sockets connect4/6 redirected have an original destination: every
		 * other connect() leaves after this one lookup. */
		orig = tp_sk_orig.sk_storage_get(sk, 0, 0);
		if (orig && (cfg = tp_active_config(&gen)))
			tp_conn_record(skops, orig, cfg);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (tp_sk_orig.sk_storage_get(sk, 0, 0) && (cfg = tp_active_config(&gen)))
			tp_accel_join_checked(skops, sk, cfg);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		cfg = tp_active_config(&gen);
		if (!cfg)
			break;
		tp_key_from_sockops(&k, skops, 1, tp_sockops_netns(skops, cfg));
		c = tp_conns.lookup(&k);
		if (!c) {
			tp_mark_inbound(skops, sk, &k, cfg, gen);
			break;
		}
		tp_answer_set(sk, &c->orig, TP_ANSWER_OUTBOUND);
		if (!tp_conns.delete(&k))
			tp_count(TP_R_CONN_RELEASED);
		tp_accel_join_checked(skops, sk, cfg);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		tp_register_listener(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* Set on recorded application sockets only: drop an entry the proxy never
		 * took (refused, never accepted, proxy outside the cgroup). */
		if (skops->args[1] != BPF_TCP_CLOSE)
			break;
		cfg = tp_active_config(&gen);
		if (!cfg)
			break;
		tp_key_from_sockops(&k, skops, 0, tp_sockops_netns(skops, cfg));
		if (!tp_conns.delete(&k))
			tp_count(TP_R_CONN_RELEASED);
		break;
	}
	return 1;
}
