/* SPDX-License-Identifier: GPL-2.0 */
/*
 * connect.c - cgroup/connect4 and cgroup/connect6: where an outbound connection is
 * decided and, when Kuma's rules say so, sent to the proxy (TCP) or to the DNS port
 * (connected UDP sockets to port 53; unconnected ones are udp.c's).
 *
 * What iptables REDIRECT does, done at connect() time instead of per packet:
 *  - the destination becomes 127.0.0.1 (::1) at the redirect port: REDIRECT in nat OUTPUT
 *    maps locally generated packets to the loopback address;
 *  - the source stays what the route to the original destination chose before NAT, so an
 *    unbound IPv4 TCP socket is bound to that address here (tp_redirect_source): the
 *    proxy sees the host's address, not 127.0.0.1 (IPv6 stays ::1 to ::1: a kernel quirk,
 *    see tp_redirect_source);
 *  - the original destination is kept in the socket's sk_storage, for getpeername(), for
 *    sock_ops to record it for the proxy's SO_ORIGINAL_DST, and for recvmsg to show DNS
 *    replies as coming from the server that was asked.
 */
#include "tproxy_redirect.h"

int connect4(struct bpf_sock_addr *ctx)
{
	struct tp_conn_attempt a = {};
	struct tp_config *cfg = NULL;
	struct bpf_sock *sk = ctx->sk;
	u16 target_port = 0;
	enum tp_verdict v;

	if ((ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP) || !sk)
		return 1;
	tp_addr_from_ip4(a.dst, ctx->user_ip4);
	tp_addr_from_ip4(a.src, sk->src_ip4);
	a.dst_port = bpf_ntohs((u16)ctx->user_port);
	v = tp_verdict(ctx, TP_HOOK_CONNECT4, &a, &cfg, &target_port);
	if (v == TP_DIRECT || !cfg) {
		tp_forget_orig(sk);
		return 1;
	}
	if (!tp_remember_orig(ctx, sk, TP_HOOK_CONNECT4, cfg, a.dst, a.dst_port, TP_AF_INET))
		return 1;
	if (v != TP_TO_DNS && tp_redirect_source(&a, cfg, a.src)) {
		struct sockaddr_in sin = { .sin_family = TP_AF_INET };

		sin.sin_addr.s_addr = ((u32 *)a.src)[3];
		/* Failure leaves the kernel's source choice (127.0.0.1): still captured. */
		bpf_bind(ctx, (struct sockaddr *)&sin, sizeof(sin));
	}
	tp_loopback_target(a.dst, 1);
	tp_ctx_set4(ctx, a.dst, target_port);
	return 1;
}

int connect6(struct bpf_sock_addr *ctx)
{
	struct tp_conn_attempt a = {};
	struct tp_config *cfg = NULL;
	struct bpf_sock *sk = ctx->sk;
	u16 target_port = 0;
	enum tp_verdict v;
	int mapped;

	if ((ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP) || !sk)
		return 1;
	tp_addr_from_ctx_ip6(a.dst, ctx->user_ip6);
	tp_addr_from_ctx_ip6(a.src, sk->src_ip6);
	a.dst_port = bpf_ntohs((u16)ctx->user_port);
	v = tp_verdict(ctx, TP_HOOK_CONNECT6, &a, &cfg, &target_port);
	if (v == TP_DIRECT || !cfg) {
		tp_forget_orig(sk);
		return 1;
	}
	/* A v4-mapped destination on an AF_INET6 socket is IPv4 (Kuma: IPv4 rules apply),
	 * and the proxy's SO_ORIGINAL_DST answer for it is a sockaddr_in. */
	mapped = tp_addr_is_mapped(a.dst);
	if (!tp_remember_orig(ctx, sk, TP_HOOK_CONNECT6, cfg, a.dst, a.dst_port,
			      mapped ? TP_AF_INET : TP_AF_INET6))
		return 1;
	if (v != TP_TO_DNS && tp_redirect_source(&a, cfg, a.src)) {
		struct sockaddr_in6 sin6 = { .sin6_family = TP_AF_INET6 };

		__builtin_memcpy(&sin6.sin6_addr, a.src, 16);
		bpf_bind(ctx, (struct sockaddr *)&sin6, sizeof(sin6));
	}
	tp_loopback_target(a.dst, mapped);
	tp_ctx_set6(ctx, a.dst, target_port);
	return 1;
}
