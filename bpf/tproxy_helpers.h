/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tproxy_helpers.h - small inline helpers shared by the program files: a namespace's
 * configuration, address predicates, set membership and counters.
 */
#ifndef TPROXY_HELPERS_H
#define TPROXY_HELPERS_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>

#include "tproxy_maps.h"

#define TP_AF_INET 2
#define TP_AF_INET6 10
#define TP_SOL_IP 0
#define TP_SOL_IPV6 41

/* Count one decision for the namespace (tp_counters; its entry is made by the loader with
 * the namespace). Per-CPU slot: no atomic needed. */
static __always_inline void tp_count(u64 netns, u32 reason)
{
	struct tp_ns_counters *c = tp_counters.lookup(&netns);

	if (c && reason < TP_R_COUNT)
		c->reason[reason] += 1;
}

/* A registered namespace's configuration, or NULL: everything else (the host's sockets,
 * other pods' namespaces) is left alone after this one lookup. */
static __always_inline struct tp_config *tp_ns_config(u64 netns)
{
	return tp_ns.lookup(&netns);
}

/* The configuration of a sock_addr program's socket's namespace. cgroup hooks follow the
 * cgroup, not the netns; bpf_get_netns_cookie() works in sock_addr programs from 5.7. */
static __always_inline struct tp_config *tp_sock_addr_config(struct bpf_sock_addr *ctx)
{
	return tp_ns_config(bpf_get_netns_cookie(ctx));
}

/* Context fields such as user_ip6[] and local_ip6[] allow only 4-byte loads; without the
 * volatile, clang merges two neighbouring words into one 8-byte load the verifier rejects
 * ("invalid bpf_context access"). */
#define TP_CTX_U32(field) (*(volatile u32 *)&(field))

static __always_inline void tp_addr_from_ctx_ip6(u8 *addr, const u32 *ip6)
{
	u32 *w = (u32 *)addr;

	w[0] = TP_CTX_U32(ip6[0]);
	w[1] = TP_CTX_U32(ip6[1]);
	w[2] = TP_CTX_U32(ip6[2]);
	w[3] = TP_CTX_U32(ip6[3]);
}

/* Addresses are 16 bytes, IPv4 mapped (::ffff:a.b.c.d); read as four 32-bit words. */
static __always_inline void tp_addr_from_ip4(u8 *addr, u32 ip4_be)
{
	u32 *w = (u32 *)addr;

	w[0] = 0;
	w[1] = 0;
	w[2] = bpf_htonl(0x0000ffff);
	w[3] = ip4_be;
}

static __always_inline int tp_addr_is_mapped(const u8 *addr)
{
	const u32 *w = (const u32 *)addr;

	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int tp_addr_is_zero(const u8 *addr)
{
	const u32 *w = (const u32 *)addr;

	return (w[0] | w[1] | w[2] | w[3]) == 0;
}

/* ::ffff:0.0.0.0 is an unbound IPv4 socket's source. */
static __always_inline int tp_addr_is_unspecified(const u8 *addr)
{
	const u32 *w = (const u32 *)addr;

	return tp_addr_is_zero(addr) || (tp_addr_is_mapped(addr) && w[3] == 0);
}

/* 127.0.0.1 or ::1: Kuma's rule g and the exception in rule d. A connect() to 0.0.0.0 or
 * :: counts too: the kernel sends it to the loopback address, which is what iptables then
 * sees. */
static __always_inline int tp_addr_is_loopback1(const u8 *addr)
{
	const u32 *w = (const u32 *)addr;

	if (tp_addr_is_unspecified(addr))
		return 1;
	if (tp_addr_is_mapped(addr))
		return w[3] == bpf_htonl(0x7f000001);
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == bpf_htonl(1);
}

/* 127.0.0.0/8 or ::1: an address only this host can reach. */
static __always_inline int tp_addr_is_loopback_net(const u8 *addr)
{
	const u32 *w = (const u32 *)addr;

	if (tp_addr_is_mapped(addr))
		return (bpf_ntohl(w[3]) >> 24) == 127;
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == bpf_htonl(1);
}

/* 127.0.0.6 or ::6: the source Envoy binds for its inbound passthrough (Kuma rule c). */
static __always_inline int tp_addr_is_passthrough_src(const u8 *addr)
{
	const u32 *w = (const u32 *)addr;

	if (tp_addr_is_mapped(addr))
		return w[3] == bpf_htonl(0x7f000006);
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == bpf_htonl(6);
}

/* Write an address (and port) into a sock_addr context: the peer shown by getpeername()
 * or recvmsg(), or the destination of a connect()/sendmsg(). IPv4 contexts take the
 * mapped address's last word; IPv6 ones all four (a v4-mapped address stays mapped). */
static __always_inline void tp_ctx_set4(struct bpf_sock_addr *ctx, const u8 *addr, u16 port)
{
	ctx->user_ip4 = ((const u32 *)addr)[3];
	ctx->user_port = bpf_htons(port);
}

static __always_inline void tp_ctx_set6(struct bpf_sock_addr *ctx, const u8 *addr, u16 port)
{
	const u32 *w = (const u32 *)addr;

	TP_CTX_U32(ctx->user_ip6[0]) = w[0];
	TP_CTX_U32(ctx->user_ip6[1]) = w[1];
	TP_CTX_U32(ctx->user_ip6[2]) = w[2];
	TP_CTX_U32(ctx->user_ip6[3]) = w[3];
	ctx->user_port = bpf_htons(port);
}

/* Where redirected traffic goes: 127.0.0.1 (::ffff:127.0.0.1 on an IPv6 socket dialing a
 * v4-mapped address) or ::1 -- what iptables REDIRECT uses for locally made packets. */
static __always_inline void tp_loopback_target(u8 *addr, int v4)
{
	u32 *w = (u32 *)addr;

	w[0] = 0;
	w[1] = 0;
	w[2] = v4 ? bpf_htonl(0x0000ffff) : 0;
	w[3] = v4 ? bpf_htonl(0x7f000001) : bpf_htonl(1);
}

static __always_inline int tp_port_in(const struct tp_config *cfg, u8 kind, u16 port)
{
	struct tp_port_key k = {};

	k.netns_cookie = cfg->netns_cookie;
	k.gen = cfg->gen;
	k.kind = kind;
	k.port = port;
	return tp_ports.lookup(&k) != NULL;
}

static __always_inline int tp_cidr_match(const struct tp_config *cfg, u8 kind, const u8 *addr)
{
	struct tp_cidr_key k = {};

	k.prefixlen = 64 + 32 + 128;
	k.netns_lo = (u32)cfg->netns_cookie;
	k.netns_hi = (u32)(cfg->netns_cookie >> 32);
	k.gen = cfg->gen;
	k.kind = kind;
	k.family = tp_addr_is_mapped(addr) ? 4 : 6;
	__builtin_memcpy(k.addr, addr, 16);
	return tp_cidrs.lookup(&k) != NULL;
}

/* "Local address" is Kuma's "-o lo": any address of the network namespace, and the
 * unspecified address, which the kernel routes to loopback. */
static __always_inline int tp_addr_is_local(const struct tp_config *cfg, const u8 *addr)
{
	return tp_addr_is_unspecified(addr) || tp_cidr_match(cfg, TP_CIDR_LOCAL, addr);
}

static __always_inline int tp_uid_rule_matches(const struct tp_config *cfg, u32 i, u32 uid,
					       u8 proto, u16 port)
{
	struct tp_uid_rule_key k = {};
	struct tp_uid_rule *r;
	u32 j;

	k.netns_cookie = cfg->netns_cookie;
	k.index = cfg->gen * TP_MAX_UID_RULES + i;
	r = tp_uid_rules.lookup(&k);
	if (!r || uid < r->uid_lo || uid > r->uid_hi || !(r->protos & proto))
		return 0;
	for (j = 0; j < TP_MAX_PORT_RANGES; j++) {
		if (j >= r->n_ranges)
			break;
		if (port >= r->ranges[j].lo && port <= r->ranges[j].hi)
			return 1;
	}
	return 0;
}

/* Kuma rule 1: --exclude-outbound-ports-for-uids "[proto:][ports:]uids". */
static __always_inline int tp_uid_port_excluded(const struct tp_config *cfg, u32 uid,
						u8 proto, u16 port)
{
	u32 i;

	for (i = 0; i < TP_MAX_UID_RULES; i++) {
		if (i >= cfg->n_uid_rules)
			break;
		if (tp_uid_rule_matches(cfg, i, uid, proto, port))
			return 1;
	}
	return 0;
}

#endif /* TPROXY_HELPERS_H */
