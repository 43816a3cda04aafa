/* SPDX-License-Identifier: GPL-2.0 */
/*
 * getsockopt.c - cgroup/getsockopt: answers getsockopt(SOL_IP, SO_ORIGINAL_DST) and
 * getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) on the proxy's accepted socket, as conntrack
 * does behind iptables, so Envoy's use_original_dst, HAProxy's 0.0.0.0:0 server and any
 * other unmodified proxy learn where the application was going.
 *
 * The program runs after the kernel handled the call, for every getsockopt of every
 * socket in the cgroup. Anything that is not ours passes through untouched: optlen = 0
 * tells the kernel to keep its own result (values over a page would otherwise fail with
 * EFAULT on older kernels).
 *
 * Outbound (and the DP user's hairpin): the answer is in tp_conns, by connection.
 * Inbound (steered by sk_lookup, no NAT): the answer is the socket's own local address,
 * for sockets that sock_ops marked in tp_sk_inbound.
 */
#include "tproxy_conn.h"

int getsockopt_orig_dst(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct tp_orig_dst inbound = {}, *orig;
	struct tp_conn_key k = {};
	struct tp_conn *c;
	u32 reason;

	if (ctx->optname != TP_SO_ORIGINAL_DST ||
	    (ctx->level != TP_SOL_IP && ctx->level != TP_SOL_IPV6))
		goto pass;
	/* The kernel answered (conntrack: iptables NAT is in force too): keep its answer. */
	if (ctx->retval == 0 || !sk)
		goto pass;
	tp_key_from_proxy_sock(&k, sk);
	c = tp_conns.lookup(&k);
	if (c) {
		orig = &c->orig;
		reason = TP_R_ORIG_DST_ANSWERED;
	} else if (tp_sk_inbound.sk_storage_get(sk, 0, 0)) {
		__builtin_memcpy(inbound.addr, k.proxy_addr, 16);
		inbound.port = k.proxy_port;
		inbound.family = tp_addr_is_mapped(k.proxy_addr) ? TP_AF_INET : TP_AF_INET6;
		orig = &inbound;
		reason = TP_R_IN_ORIG_DST_ANSWERED;
	} else {
		tp_count(TP_R_ORIG_DST_MISSED);
		goto pass;
	}
	if (ctx->level == TP_SOL_IP && orig->family == TP_AF_INET) {
		struct sockaddr_in *sin = ctx->optval;

		if ((void *)(sin + 1) > ctx->optval_end)
			goto pass;	/* caller's buffer too small: keep the kernel's error */
		sin->sin_family = TP_AF_INET;
		sin->sin_port = bpf_htons(orig->port);
		sin->sin_addr.s_addr = ((u32 *)orig->addr)[3];
		__builtin_memset(sin->sin_zero, 0, sizeof(sin->sin_zero));
		ctx->optlen = sizeof(*sin);
	} else if (ctx->level == TP_SOL_IPV6 && orig->family == TP_AF_INET6) {
		struct sockaddr_in6 *sin6 = ctx->optval;

		if ((void *)(sin6 + 1) > ctx->optval_end)
			goto pass;
		sin6->sin6_family = TP_AF_INET6;
		sin6->sin6_port = bpf_htons(orig->port);
		sin6->sin6_flowinfo = 0;
		__builtin_memcpy(&sin6->sin6_addr, orig->addr, 16);
		sin6->sin6_scope_id = 0;
		ctx->optlen = sizeof(*sin6);
	} else {
		/* Asked in the other family: ip6tables' conntrack would not know an IPv4
		 * connection either. */
		goto pass;
	}
	ctx->retval = 0;
	tp_count(reason);
	return 1;
pass:
	ctx->optlen = 0;
	return 1;
}
