/* SPDX-License-Identifier: GPL-2.0 */
/*
 * udp.c - DNS capture for unconnected UDP sockets (cgroup/sendmsg4/6) and the replies of
 * every captured DNS socket (cgroup/recvmsg4/6).
 *
 * sendmsg: a query to port 53 that Kuma's DNS rules capture goes to 127.0.0.1 (::1) at
 * the DNS port, and the server asked is kept in the socket's sk_storage (connect4/6 do
 * the same for connected sockets).
 * recvmsg: a reply from the DNS port is shown as coming from that server, so resolvers
 * that check the reply's source (glibc and dig in the tests) accept it, as they do behind
 * iptables, where conntrack reverses the NAT on the reply. One unconnected socket asking
 * two servers sees every reply as from the last one asked: this hook cannot see which
 * query a reply answers (README, "What is not done yet").
 */
#include "tproxy_redirect.h"

int sendmsg4(struct bpf_sock_addr *ctx)
{
	struct tp_conn_attempt a = {};
	struct tp_config *cfg = NULL;
	struct bpf_sock *sk = ctx->sk;
	u16 target_port = 0;

	/* Runs for every datagram sent: anything but port 53 leaves at once. */
	a.dst_port = bpf_ntohs((u16)ctx->user_port);
	if (a.dst_port != 53 || !sk)
		return 1;
	tp_addr_from_ip4(a.dst, ctx->user_ip4);
	if (tp_verdict(ctx, TP_HOOK_SENDMSG4, &a, &cfg, &target_port) != TP_TO_DNS || !cfg)
		return 1;
	if (!tp_remember_orig(ctx, sk, TP_HOOK_SENDMSG4, cfg, a.dst, a.dst_port, TP_AF_INET))
		return 1;
	tp_loopback_target(a.dst, 1);
	tp_ctx_set4(ctx, a.dst, target_port);
	return 1;
}

int sendmsg6(struct bpf_sock_addr *ctx)
{
	struct tp_conn_attempt a = {};
	struct tp_config *cfg = NULL;
	struct bpf_sock *sk = ctx->sk;
	u16 target_port = 0;

	a.dst_port = bpf_ntohs((u16)ctx->user_port);
	if (a.dst_port != 53 || !sk)
		return 1;
	tp_addr_from_ctx_ip6(a.dst, ctx->user_ip6);
	if (tp_verdict(ctx, TP_HOOK_SENDMSG6, &a, &cfg, &target_port) != TP_TO_DNS || !cfg)
		return 1;
	/* A v4-mapped destination never gets here on the kernels seen so far: udpv6_sendmsg
	 * hands it to the IPv4 path (and sendmsg4) first. Should one arrive, it must not be
	 * rewritten: the kernel refuses a sendmsg6 rewritten to a mapped address (ENOTSUPP).
	 * A link-local server (fe80::1%eth0) neither: the interface was already taken from
	 * the scope id, and ::1 is not reachable through it. */
	if (tp_addr_is_mapped(a.dst) || (a.dst[0] == 0xfe && (a.dst[1] & 0xc0) == 0x80)) {
		tp_count(cfg->netns_cookie, TP_R_DNS_NOT_REDIRECTABLE);
		tp_trace(ctx, cfg, TP_HOOK_SENDMSG6, IPPROTO_UDP, TP_R_DNS_NOT_REDIRECTABLE,
			 a.dst, a.dst_port, NULL, 0, 0);
		return 1;
	}
	if (!tp_remember_orig(ctx, sk, TP_HOOK_SENDMSG6, cfg, a.dst, a.dst_port, TP_AF_INET6))
		return 1;
	tp_loopback_target(a.dst, 0);
	tp_ctx_set6(ctx, a.dst, target_port);
	return 1;
}

/* The server the socket asked, if the reply comes from the DNS port on loopback. Every
 * datagram received by every socket of the cgroup passes here: a socket without a
 * recorded query leaves after one storage lookup. */
static __always_inline struct tp_sk_orig *tp_dns_reply_orig(struct bpf_sock_addr *ctx,
							    const u8 *src, u16 port,
							    struct tp_config **cfgp)
{
	struct tp_config *cfg;
	struct tp_sk_orig *o;

	if (!ctx->sk)
		return NULL;
	o = tp_sk_orig.sk_storage_get(ctx->sk, 0, 0);
	if (!o || o->orig.port != 53 || !tp_addr_is_loopback1(src))
		return NULL;
	/* Only sendmsg/connect of a registered namespace wrote it, with that namespace. */
	cfg = tp_ns_config(o->netns_cookie);
	if (!cfg || port != cfg->dns_port)
		return NULL;
	*cfgp = cfg;
	return o;
}

int recvmsg4(struct bpf_sock_addr *ctx)
{
	struct tp_config *cfg = NULL;
	struct tp_sk_orig *o;
	u8 src[16];

	tp_addr_from_ip4(src, ctx->user_ip4);
	o = tp_dns_reply_orig(ctx, src, bpf_ntohs((u16)ctx->user_port), &cfg);
	if (!o || !cfg || o->orig.family != TP_AF_INET)
		return 1;
	tp_ctx_set4(ctx, o->orig.addr, o->orig.port);
	tp_count(o->netns_cookie, TP_R_DNS_REPLY_RESTORED);
	tp_trace(ctx, cfg, TP_HOOK_RECVMSG4, IPPROTO_UDP, TP_R_DNS_REPLY_RESTORED,
		 o->orig.addr, o->orig.port, NULL, 0, 0);
	return 1;
}

int recvmsg6(struct bpf_sock_addr *ctx)
{
	struct tp_config *cfg = NULL;
	struct tp_sk_orig *o;
	u8 src[16];

	tp_addr_from_ctx_ip6(src, ctx->user_ip6);
	o = tp_dns_reply_orig(ctx, src, bpf_ntohs((u16)ctx->user_port), &cfg);
	if (!o || !cfg)
		return 1;
	/* A connected AF_INET6 socket that dialed ::ffff:a.b.c.d gets the mapped address. */
	tp_ctx_set6(ctx, o->orig.addr, o->orig.port);
	tp_count(o->netns_cookie, TP_R_DNS_REPLY_RESTORED);
	tp_trace(ctx, cfg, TP_HOOK_RECVMSG6, IPPROTO_UDP, TP_R_DNS_REPLY_RESTORED,
		 o->orig.addr, o->orig.port, NULL, 0, 0);
	return 1;
}
