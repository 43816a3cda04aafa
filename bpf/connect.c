/* SPDX-License-Identifier: GPL-2.0 */
/*
 * connect.c - cgroup/connect4 and cgroup/connect6: where an outbound TCP connection is
 * decided and, when Kuma's rules say so, sent to the proxy.
 *
 * What iptables REDIRECT does, done at connect() time instead of per packet:
 *  - the destination becomes 127.0.0.1 (::1) at the redirect port: REDIRECT in nat OUTPUT
 *    maps locally generated packets to the loopback address;
 *  - the source stays the host's address: iptables chose it from the route to the
 *    original destination before NAT, so an unbound socket is bound to the instance IP
 *    (--ebpf-instance-ip) here, and the proxy sees the host's address, not 127.0.0.1;
 *  - the original destination is kept in the socket's sk_storage, for getpeername() and
 *    for sock_ops to record it for the proxy's SO_ORIGINAL_DST.
 * Only TCP is handled: Kuma leaves UDP other than DNS alone (rule 4).
 */
#include "tproxy_outbound.h"

/* Keep the original destination with the socket. Returns 0 if there is no room: the
 * connection then goes direct rather than to a proxy that could not learn where to. */
static __always_inline int tp_remember_orig(struct bpf_sock *sk, const u8 *dst, u16 port,
					    u16 family)
{
	struct tp_orig_dst *o = tp_sk_orig.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (!o) {
		tp_count(TP_R_NO_STORAGE);
		return 0;
	}
	__builtin_memcpy(o->addr, dst, 16);
	o->port = port;
	o->family = family;
	return 1;
}

/* A socket redirected once and then reconnected elsewhere (connect(AF_UNSPEC), then
 * connect again) must not keep the old original destination. */
static __always_inline void tp_forget_orig(struct bpf_sock *sk)
{
	if (tp_sk_orig.sk_storage_get(sk, 0, 0))
		tp_sk_orig.sk_storage_delete(sk);
}

/* Decide one connect(); returns the verdict and fills *target_port. */
static __always_inline enum tp_verdict tp_connect_verdict(struct bpf_sock_addr *ctx,
							  struct tp_conn_attempt *a,
							  struct tp_config **cfgp,
							  u16 *target_port)
{
	struct tp_config *cfg;
	enum tp_verdict v;
	u32 reason = 0;
	u8 gen = 0;

	cfg = tp_active_config(&gen);
	if (!cfg)
		return TP_DIRECT;
	/* cgroup hooks follow the cgroup, not the netns: a socket of this cgroup made in
	 * another network namespace is not the instance's to touch. */
	if (cfg->netns_cookie && bpf_get_netns_cookie(ctx) != cfg->netns_cookie) {
		tp_count(TP_R_OTHER_NETNS);
		return TP_DIRECT;
	}
	/* ipFamilyMode ipv4: ip6tables rules are not written, IPv6 is left alone. A mapped
	 * address is IPv4 traffic and was already turned into one by the caller. */
	if (!tp_addr_is_mapped(a->dst) && !(cfg->flags & TP_F_IPV6)) {
		tp_count(TP_R_FAMILY_OFF);
		return TP_DIRECT;
	}
	a->uid = (u32)bpf_get_current_uid_gid();
	v = tp_outbound_decide(gen, cfg, a, &reason);
	tp_count(reason);
	*target_port = v == TP_TO_INBOUND ? cfg->inbound_port : cfg->outbound_port;
	*cfgp = cfg;
	return v;
}

int connect4(struct bpf_sock_addr *ctx)
{
	struct tp_conn_attempt a = {};
	struct tp_config *cfg = NULL;
	struct bpf_sock *sk = ctx->sk;
	u16 target_port = 0;

	if (ctx->protocol != IPPROTO_TCP || !sk)
		return 1;
	tp_addr_from_ip4(a.dst, ctx->user_ip4);
	tp_addr_from_ip4(a.src, sk->src_ip4);
	a.dst_port = bpf_ntohs((u16)ctx->user_port);
	if (tp_connect_verdict(ctx, &a, &cfg, &target_port) == TP_DIRECT || !cfg) {
		tp_forget_orig(sk);
		return 1;
	}
	if (!tp_remember_orig(sk, a.dst, a.dst_port, TP_AF_INET))
		return 1;
	if (tp_addr_is_unspecified(a.src) && !tp_addr_is_zero(cfg->instance_ip4)) {
		struct sockaddr_in sin = { .sin_family = TP_AF_INET };

		sin.sin_addr.s_addr = ((u32 *)cfg->instance_ip4)[3];
		/* Failure leaves the kernel's source choice (127.0.0.1): still captured. */
		bpf_bind(ctx, (struct sockaddr *)&sin, sizeof(sin));
	}
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(target_port);
	return 1;
}

int connect6(struct bpf_sock_addr *ctx)
{
	struct tp_conn_attempt a = {};
	struct tp_config *cfg = NULL;
	struct bpf_sock *sk = ctx->sk;
	u16 target_port = 0;
	int mapped;

	if (ctx->protocol != IPPROTO_TCP || !sk)
		return 1;
	tp_addr_from_ctx_ip6(a.dst, ctx->user_ip6);
	tp_addr_from_ctx_ip6(a.src, sk->src_ip6);
	a.dst_port = bpf_ntohs((u16)ctx->user_port);
	if (tp_connect_verdict(ctx, &a, &cfg, &target_port) == TP_DIRECT || !cfg) {
		tp_forget_orig(sk);
		return 1;
	}
	/* A v4-mapped destination on an AF_INET6 socket is IPv4 (Kuma: IPv4 rules apply),
	 * and the proxy's SO_ORIGINAL_DST answer for it is a sockaddr_in. */
	mapped = tp_addr_is_mapped(a.dst);
	if (!tp_remember_orig(sk, a.dst, a.dst_port, mapped ? TP_AF_INET : TP_AF_INET6))
		return 1;
	if (tp_addr_is_unspecified(a.src)) {
		const u8 *ip = mapped ? cfg->instance_ip4 : cfg->instance_ip6;

		if (!tp_addr_is_zero(ip)) {
			struct sockaddr_in6 sin6 = { .sin6_family = TP_AF_INET6 };

			__builtin_memcpy(&sin6.sin6_addr, ip, 16);
			bpf_bind(ctx, (struct sockaddr *)&sin6, sizeof(sin6));
		}
	}
	if (mapped) {
		TP_CTX_U32(ctx->user_ip6[0]) = 0;
		TP_CTX_U32(ctx->user_ip6[1]) = 0;
		TP_CTX_U32(ctx->user_ip6[2]) = bpf_htonl(0x0000ffff);
		TP_CTX_U32(ctx->user_ip6[3]) = bpf_htonl(0x7f000001);
	} else {
		TP_CTX_U32(ctx->user_ip6[0]) = 0;
		TP_CTX_U32(ctx->user_ip6[1]) = 0;
		TP_CTX_U32(ctx->user_ip6[2]) = 0;
		TP_CTX_U32(ctx->user_ip6[3]) = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(target_port);
	return 1;
}
