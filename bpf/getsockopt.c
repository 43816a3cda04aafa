/* SPDX-License-Identifier: GPL-2.0 */
/*
 * getsockopt.c - cgroup/getsockopt: answers getsockopt(SOL_IP, SO_ORIGINAL_DST) and
 * getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) on the proxy's accepted socket, as conntrack
 * does behind iptables, so Envoy's use_original_dst, HAProxy's 0.0.0.0:0 server and any
 * other unmodified proxy learn where the application was going.
 *
 * The answer is the one sock_ops attached to this very socket (tp_sk_answer): the
 * original destination of a redirected outbound connection, or the address an inbound
 * client dialed. It lives and dies with the socket; no table is read here.
 *
 * The program runs after the kernel handled the call, for every getsockopt of every
 * socket in the cgroup, innermost cgroup first when several program sets are nested
 * (another bpffs's node set, another tool's). So:
 *  - our answer wins over the kernel's: wherever conntrack is active (Docker, kube-proxy,
 *    firewalld, ufw, Kuma's --drop-invalid-packets) the kernel answers every connection,
 *    and for one that connect4/6 rewrote it answers the rewritten destination, the proxy
 *    itself;
 *  - with no answer of ours, an answer already given stays as it is, whether the kernel's
 *    (conntrack behind a real NAT) or an inner program set's; only a kernel answer that
 *    would send the proxy back to itself is refused, never passed on as a loop;
 *  - every other option passes through untouched: optlen = 0 tells the kernel to keep
 *    its own result (values over a page would otherwise fail with EFAULT).
 */
#include "tproxy_conn.h"
#include "tproxy_trace.h"

/* Largest optlen the kernel's buffer for the program can hold (one page); a larger one
 * must be passed on as 0, or the call fails with EFAULT on older kernels. */
#define TP_SOCKOPT_BUF_MAX 4096

/* Nothing of ours to say. The kernel failed (ENOENT: no conntrack entry): keep its error
 * and copy nothing (optlen 0; the buffer was never filled). Someone answered (retval 0):
 * keep that answer and its length. */
static __always_inline int tp_pass_on(struct bpf_sockopt *ctx)
{
	if (ctx->retval != 0 || ctx->optlen < 0 || ctx->optlen > TP_SOCKOPT_BUF_MAX)
		ctx->optlen = 0;
	return 1;
}

/* conntrack answered for a connection we have no answer for (tp_conns was full, or the
 * socket storage was). Were the answer this socket's own address on loopback at one of
 * the redirect ports, the proxy would connect to itself: conntrack never saw the original
 * destination, only the rewritten one. Refuse the call (EPERM) instead; a proxy closes
 * such a connection, which the application sees, rather than looping. */
static __always_inline int tp_kernel_answer_is_a_loop(struct bpf_sockopt *ctx,
						      struct bpf_sock *sk,
						      const struct tp_config *cfg)
{
	u8 local[16];
	u16 port;

	port = (u16)sk->src_port;
	if (port != cfg->outbound_port && port != cfg->inbound_port)
		return 0;
	/* A dual-stack proxy's ([::]) socket is AF_INET6 with a v4-mapped address. */
	if (sk->family == TP_AF_INET)
		tp_addr_from_ip4(local, sk->src_ip4);
	else
		tp_addr_from_ctx_ip6(local, sk->src_ip6);
	if (!tp_addr_is_loopback_net(local))
		return 0;
	if (ctx->level == TP_SOL_IP) {
		struct sockaddr_in *sin = ctx->optval;

		if ((void *)(sin + 1) > ctx->optval_end || !tp_addr_is_mapped(local))
			return 0;
		return sin->sin_port == bpf_htons(port) &&
		       sin->sin_addr.s_addr == ((u32 *)local)[3];
	} else {
		struct sockaddr_in6 *sin6 = ctx->optval;
		u32 *a, *l = (u32 *)local;

		if ((void *)(sin6 + 1) > ctx->optval_end)
			return 0;
		a = (u32 *)&sin6->sin6_addr;
		return sin6->sin6_port == bpf_htons(port) && a[0] == l[0] && a[1] == l[1] &&
		       a[2] == l[2] && a[3] == l[3];
	}
}

/* What the proxy was told (addr:port, NULL if nothing), with the socket's peer (the
 * application's end) and the proxy's own port. cfg is the namespace's configuration, or
 * NULL where only its cookie is at hand (an answer): then it is looked up only while a
 * trace is reading, so an untraced answer pays one inlined array load. */
static __always_inline void tp_trace_answer(struct bpf_sockopt *ctx, struct bpf_sock *sk,
					    const struct tp_config *cfg, u64 netns, u32 reason,
					    const u8 *addr, u16 port)
{
#ifndef TP_NO_TRACE
	u8 peer[16];

	if (!cfg) {
		if (!tp_trace_active())
			return;
		cfg = tp_ns_config(netns);
	}
	if (!cfg || !tp_tracing(cfg))
		return;
	if (sk->family == TP_AF_INET)
		tp_addr_from_ip4(peer, sk->dst_ip4);
	else
		tp_addr_from_ctx_ip6(peer, sk->dst_ip6);
	tp_trace(ctx, cfg, TP_HOOK_GETSOCKOPT, IPPROTO_TCP, reason, addr, port, peer,
		 bpf_ntohs((u16)sk->dst_port), (u16)sk->src_port);
#endif
}

int getsockopt_orig_dst(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct tp_config *cfg;
	struct tp_answer *a;
	u64 netns;

	if (ctx->optname != TP_SO_ORIGINAL_DST ||
	    (ctx->level != TP_SOL_IP && ctx->level != TP_SOL_IPV6)) {
		ctx->optlen = 0;	/* not ours: the kernel's result, untouched */
		return 1;
	}
	if (!sk)
		return tp_pass_on(ctx);
	a = tp_sk_answer.sk_storage_get(sk, 0, 0);
	if (!a) {
		/* A proxy socket of a registered namespace carries the namespace (tp_sk_ns,
		 * from its listener); any other socket's call is none of ours. */
		netns = tp_sk_netns(sk);
		cfg = netns ? tp_ns_config(netns) : NULL;
		if (!cfg)
			return tp_pass_on(ctx);
		if (ctx->retval != 0) {
			tp_count(netns, TP_R_ORIG_DST_MISSED);
			tp_trace_answer(ctx, sk, cfg, netns, TP_R_ORIG_DST_MISSED, NULL, 0);
			return tp_pass_on(ctx);
		}
		if (tp_kernel_answer_is_a_loop(ctx, sk, cfg)) {
			tp_count(netns, TP_R_ORIG_DST_REFUSED);
			tp_trace_answer(ctx, sk, cfg, netns, TP_R_ORIG_DST_REFUSED, NULL, 0);
			ctx->optlen = 0;
			return 0;	/* EPERM */
		}
		return tp_pass_on(ctx);
	}
	if (ctx->level == TP_SOL_IP && a->orig.family == TP_AF_INET) {
		struct sockaddr_in *sin = ctx->optval;

		if ((void *)(sin + 1) > ctx->optval_end)
			return tp_pass_on(ctx);	/* caller's buffer too small: its error */
		sin->sin_family = TP_AF_INET;
		sin->sin_port = bpf_htons(a->orig.port);
		sin->sin_addr.s_addr = ((u32 *)a->orig.addr)[3];
		__builtin_memset(sin->sin_zero, 0, sizeof(sin->sin_zero));
		ctx->optlen = sizeof(*sin);
	} else if (ctx->level == TP_SOL_IPV6 && a->orig.family == TP_AF_INET6) {
		struct sockaddr_in6 *sin6 = ctx->optval;

		if ((void *)(sin6 + 1) > ctx->optval_end)
			return tp_pass_on(ctx);
		sin6->sin6_family = TP_AF_INET6;
		sin6->sin6_port = bpf_htons(a->orig.port);
		sin6->sin6_flowinfo = 0;
		__builtin_memcpy(&sin6->sin6_addr, a->orig.addr, 16);
		sin6->sin6_scope_id = 0;
		ctx->optlen = sizeof(*sin6);
	} else {
		/* Asked in the other family: ip6tables' conntrack would not know an IPv4
		 * connection either. */
		return tp_pass_on(ctx);
	}
	ctx->retval = 0;
	tp_count(a->netns_cookie, a->kind == TP_ANSWER_INBOUND ? TP_R_IN_ORIG_DST_ANSWERED :
								 TP_R_ORIG_DST_ANSWERED);
	tp_trace_answer(ctx, sk, NULL, a->netns_cookie, a->kind == TP_ANSWER_INBOUND ?
		TP_R_IN_ORIG_DST_ANSWERED : TP_R_ORIG_DST_ANSWERED, a->orig.addr, a->orig.port);
	return 1;
}
