/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tproxy_redirect.h - what connect4/6 and sendmsg4/6 share: deciding one connect() or
 * UDP send under the configuration in force, and keeping the original destination with
 * the socket.
 */
#ifndef TPROXY_REDIRECT_H
#define TPROXY_REDIRECT_H

#include "tproxy_outbound.h"
#include "tproxy_trace.h"

/* Keep the original destination with the socket. Returns 0 if there is no room: the
 * connection then goes direct rather than to a proxy that could not learn where to. */
static __always_inline int tp_remember_orig(struct bpf_sock_addr *ctx, struct bpf_sock *sk,
					    u8 hook, const struct tp_config *cfg, const u8 *dst,
					    u16 port, u16 family)
{
	struct tp_sk_orig *o = tp_sk_orig.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (!o) {
		tp_count(cfg->netns_cookie, TP_R_NO_STORAGE);
		tp_trace(ctx, cfg, hook, ctx->protocol, TP_R_NO_STORAGE, dst, port, NULL, 0, 0);
		return 0;
	}
	__builtin_memcpy(o->orig.addr, dst, 16);
	o->orig.port = port;
	o->orig.family = family;
	o->netns_cookie = cfg->netns_cookie;
	return 1;
}

/* A socket redirected once and then reconnected elsewhere (connect(AF_UNSPEC), then
 * connect again) must not keep the old original destination. */
static __always_inline void tp_forget_orig(struct bpf_sock *sk)
{
	if (tp_sk_orig.sk_storage_get(sk, 0, 0))
		tp_sk_orig.sk_storage_delete(sk);
}

/* Decide one connect() or UDP send (hook: TP_HOOK_CONNECT4 ...); returns the verdict and
 * fills *target_port. */
static __always_inline enum tp_verdict tp_verdict(struct bpf_sock_addr *ctx, u8 hook,
						  struct tp_conn_attempt *a,
						  struct tp_config **cfgp, u16 *target_port)
{
	struct tp_config *cfg;
	enum tp_verdict v;
	u32 reason = 0;

	/* Only sockets of a registered namespace: one lookup for every other. */
	cfg = tp_sock_addr_config(ctx);
	if (!cfg)
		return TP_DIRECT;
	/* ipFamilyMode ipv4: ip6tables rules are not written, IPv6 is left alone. A mapped
	 * address is IPv4 traffic and was already turned into one by the caller. */
	if (!tp_addr_is_mapped(a->dst) && !(cfg->flags & TP_F_IPV6)) {
		tp_count(cfg->netns_cookie, TP_R_FAMILY_OFF);
		tp_trace(ctx, cfg, hook, ctx->protocol, TP_R_FAMILY_OFF, a->dst, a->dst_port,
			 a->src, 0, 0);
		return TP_DIRECT;
	}
	a->uid = (u32)bpf_get_current_uid_gid();
	if (ctx->protocol == IPPROTO_TCP) {
		v = tp_outbound_decide(cfg, a, &reason);
	} else {
		v = tp_udp_decide(cfg, a, &reason);
		if (!reason)
			return TP_DIRECT;	/* not DNS */
	}
	tp_count(cfg->netns_cookie, reason);
	*target_port = v == TP_TO_INBOUND ? cfg->inbound_port :
		       v == TP_TO_DNS ? cfg->dns_port : cfg->outbound_port;
	tp_trace(ctx, cfg, hook, ctx->protocol, reason, a->dst, a->dst_port, a->src, 0,
		 v == TP_DIRECT ? 0 : *target_port);
	*cfgp = cfg;
	return v;
}

/* The source a redirected TCP connection should have: the one the kernel's route to the
 * original destination would have chosen, which is what iptables leaves in place (it
 * rewrites only the destination). Loopback destinations: none to set (127.0.0.1 or ::1
 * follows from the new destination). Another local address: that address itself. A
 * remote one: the instance IP (--ebpf-instance-ip), the namespace's own address.
 * Returns 0 when the kernel's choice is already right.
 *
 * IPv6 is the exception: the connection stays ::1 to ::1. From a global address to ::1
 * it could not finish closing when the application closes first. The application's
 * TIME_WAIT answers the proxy's FIN through the netns's control socket, routed strictly
 * (::1 is a loopback address) out of the interface the FIN arrived on, which the kernel
 * records as the device owning the global address, and that device has no route to ::1
 * (Ip6OutNoRoutes): the proxy's socket stays in LAST_ACK retransmitting its FIN, and a
 * reconnect that reuses the port (tcp_tw_reuse=2 counts ::1 as loopback) is answered with
 * a bare ACK and waits for a SYN retransmission. Plain sockets show it too, with no BPF
 * loaded; tests/kernel/test_ipv6_close.py checks that redirected connections close.
 * Behind iptables no socket ever has these addresses:
 * the application's keeps the remote destination. So the proxy sees ::1 as the peer of a
 * redirected IPv6 connection where iptables shows the pod's address (README, "Differences
 * from iptables"). */
static __always_inline int tp_redirect_source(const struct tp_conn_attempt *a,
					      const struct tp_config *cfg, u8 *src)
{
	const u8 *ip = cfg->instance_ip4;

	if (!tp_addr_is_unspecified(a->src) || tp_addr_is_loopback_net(a->dst) ||
	    !tp_addr_is_mapped(a->dst))
		return 0;
	if (a->dst_local)
		ip = a->dst;
	if (tp_addr_is_zero(ip))
		return 0;
	__builtin_memcpy(src, ip, 16);
	return 1;
}

#endif /* TPROXY_REDIRECT_H */
