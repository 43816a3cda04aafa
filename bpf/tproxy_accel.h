/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tproxy_accel.h - --ebpf-accelerate: which sockets join tp_accel, and their keys.
 *
 * Only the two ends of a captured outbound connection join: the application's socket
 * (redirected by connect4/6 to the proxy on this host) and the proxy's accepted socket for
 * it. Behind iptables both ends exchange their bytes through TCP over loopback; here
 * sk_msg_accel hands each sendmsg() to the other socket's receive queue directly.
 *
 * Ordering is the one property that must never break: bytes that went through TCP and
 * bytes handed over directly sit in two different queues of the receiving socket, and the
 * kernel reads the direct queue first. So a socket starts TP_ACCEL_ON and turns
 * TP_ACCEL_TCP for good the first time its peer is not in tp_accel (the proxy's socket
 * is created from the final ACK, which the application can outrun on a busy host).
 */
#ifndef TPROXY_ACCEL_H
#define TPROXY_ACCEL_H

#include "tproxy_helpers.h"

static __always_inline void tp_accel_count(u64 netns, u32 what)
{
	struct tp_ns_counters *c = tp_counters.lookup(&netns);

	if (c && what < TP_A_COUNT)
		c->accel[what] += 1;
}

static __always_inline void tp_sock_key_from_sockops(struct tp_sock_key *k,
						     struct bpf_sock_ops *skops, u64 netns)
{
	k->netns_cookie = netns;
	if (skops->family == TP_AF_INET) {
		tp_addr_from_ip4(k->local_addr, skops->local_ip4);
		tp_addr_from_ip4(k->remote_addr, skops->remote_ip4);
	} else {
		tp_addr_from_ctx_ip6(k->local_addr, skops->local_ip6);
		tp_addr_from_ctx_ip6(k->remote_addr, skops->remote_ip6);
	}
	k->local_port = (u16)skops->local_port;
	/* remote_port: network order in the upper 16 bits, as in struct sk_msg_md */
	k->remote_port = (u16)bpf_ntohl(skops->remote_port);
}

/* The key under which the peer of msg's socket is in tp_accel: its own view swapped. */
static __always_inline void tp_peer_key_from_msg(struct tp_sock_key *k, struct sk_msg_md *msg,
						 u64 netns)
{
	k->netns_cookie = netns;
	if (msg->family == TP_AF_INET) {
		tp_addr_from_ip4(k->local_addr, msg->remote_ip4);
		tp_addr_from_ip4(k->remote_addr, msg->local_ip4);
	} else {
		tp_addr_from_ctx_ip6(k->local_addr, msg->remote_ip6);
		tp_addr_from_ctx_ip6(k->remote_addr, msg->local_ip6);
	}
	k->local_port = (u16)bpf_ntohl(msg->remote_port);
	k->remote_port = (u16)msg->local_port;
}

/* Called from sock_ops for the two ends of a captured connection, once established. */
static __always_inline void tp_accel_join(struct bpf_sock_ops *skops, struct bpf_sock *sk,
					 const struct tp_config *cfg)
{
	struct tp_sock_key k = {};
	u32 *state;
	long err;

	if (!(cfg->flags & TP_F_ACCELERATE))
		return;
	state = tp_sk_accel.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state) {
		tp_accel_count(cfg->netns_cookie, TP_A_SOCK_FAILED);
		return;
	}
	tp_sock_key_from_sockops(&k, skops, cfg->netns_cookie);
	/* BCC expands sock_hash_update() into a statement: it cannot sit in a condition. */
	err = tp_accel.sock_hash_update(skops, &k, BPF_NOEXIST);
	*state = err ? TP_ACCEL_TCP : TP_ACCEL_ON;
	tp_accel_count(cfg->netns_cookie, err ? TP_A_SOCK_FAILED : TP_A_SOCK_ADDED);
}

#endif /* TPROXY_ACCEL_H */
