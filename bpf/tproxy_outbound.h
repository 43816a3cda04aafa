/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tproxy_outbound.h - Kuma's outbound rule list (iptables nat OUTPUT and the
 * KUMA_MESH_OUTBOUND chain) as one function, first match wins. The rule letters are those
 * of ../shared/reference/kuma-transparent-proxy.md; each comment quotes the iptables rule
 * the branch stands in for.
 */
#ifndef TPROXY_OUTBOUND_H
#define TPROXY_OUTBOUND_H

#include "tproxy_helpers.h"

enum tp_verdict {
	TP_DIRECT = 0,
	TP_TO_OUTBOUND,
	TP_TO_INBOUND,
	TP_TO_DNS,
};

struct tp_conn_attempt {
	u8 dst[16];      /* mapped for IPv4 */
	u8 src[16];      /* bound source, unspecified if none */
	u16 dst_port;
	u8 dst_local;    /* set by tp_outbound_decide: the destination is local */
	u32 uid;
};

static __always_inline enum tp_verdict tp_outbound_decide(const struct tp_config *cfg,
							   struct tp_conn_attempt *a,
							   u32 *reason)
{
	int is_dp = a->uid == cfg->dp_uid;
	int local;

	/* 1. -A OUTPUT -p tcp -m multiport --dports P -m owner --uid-owner U -j RETURN */
	if (tp_uid_port_excluded(cfg, a->uid, TP_PROTO_TCP, a->dst_port)) {
		*reason = TP_R_EXCL_UID_PORT;
		return TP_DIRECT;
	}
	/* 2. -A OUTPUT -d CIDR -j RETURN (--exclude-outbound-ips) */
	if (tp_cidr_match(cfg, TP_CIDR_EXCLUDE_OUT, a->dst)) {
		*reason = TP_R_EXCL_IP;
		return TP_DIRECT;
	}
	/* 3. -A OUTPUT -p tcp --dport 53 -m owner ! --uid-owner DP -j RETURN (DNS enabled) */
	if ((cfg->flags & (TP_F_DNS | TP_F_DNS_ALL)) && a->dst_port == 53 && !is_dp) {
		*reason = TP_R_DNS_TCP_DIRECT;
		return TP_DIRECT;
	}
	/* 4a. redirect.outbound.enabled=false: no OUTPUT -j KUMA_MESH_OUTBOUND at all. */
	if (!(cfg->flags & TP_F_OUTBOUND)) {
		*reason = TP_R_OUTBOUND_OFF;
		return TP_DIRECT;
	}
	/* 4b. -A KUMA_MESH_OUTBOUND -p tcp --dport P -j RETURN; Kuma writes these only when
	 * includePorts is empty. */
	if (!(cfg->flags & TP_F_OUT_INCLUDE) &&
	    tp_port_in(cfg, TP_PORT_EXCLUDE_OUT, a->dst_port)) {
		*reason = TP_R_EXCL_PORT;
		return TP_DIRECT;
	}
	local = tp_addr_is_local(cfg, a->dst);
	a->dst_local = local;
	/* 4c. -A KUMA_MESH_OUTBOUND -s 127.0.0.6/32 -o lo -j RETURN: Envoy's inbound
	 * passthrough to the application. */
	if (local && tp_addr_is_passthrough_src(a->src)) {
		*reason = TP_R_PASSTHROUGH_SRC;
		return TP_DIRECT;
	}
	/* 4d. ! -d 127.0.0.1/32 -o lo --uid-owner DP -j KUMA_MESH_INBOUND_REDIRECT: the proxy
	 * calling a local address (its own pod IP, 127.0.0.6 in the validator) goes through
	 * its inbound listener. */
	if (is_dp && local && !tp_addr_is_loopback1(a->dst)) {
		*reason = TP_R_DP_HAIRPIN;
		return TP_TO_INBOUND;
	}
	/* 4e. -o lo -m owner ! --uid-owner DP -j RETURN: an application calling localhost or
	 * its own address is never redirected. */
	if (!is_dp && local) {
		*reason = TP_R_APP_LOCAL;
		return TP_DIRECT;
	}
	/* 4f. -m owner --uid-owner DP -j RETURN: the proxy's own upstream connections. */
	if (is_dp) {
		*reason = TP_R_DP_DIRECT;
		return TP_DIRECT;
	}
	/* 4g. -d 127.0.0.1/32 -j RETURN. 127.0.0.1 is always local, so 4e or 4f has already
	 * matched; kept so the list reads like Kuma's and stays right if "local" changes. */
	if (tp_addr_is_loopback1(a->dst)) {
		*reason = TP_R_LOOPBACK;
		return TP_DIRECT;
	}
	/* 4h. includePorts: -A KUMA_MESH_OUTBOUND -p tcp --dport P -j KUMA_MESH_OUTBOUND_REDIRECT
	 * for those ports only. */
	if ((cfg->flags & TP_F_OUT_INCLUDE) &&
	    !tp_port_in(cfg, TP_PORT_INCLUDE_OUT, a->dst_port)) {
		*reason = TP_R_NOT_INCLUDED;
		return TP_DIRECT;
	}
	/* -A KUMA_MESH_OUTBOUND -j KUMA_MESH_OUTBOUND_REDIRECT (REDIRECT --to-ports 15001) */
	*reason = TP_R_REDIRECT_OUT;
	return TP_TO_OUTBOUND;
}

/* The same list for UDP: rules 1 and 2, then Kuma's DNS rules (3); any other UDP is
 * never touched (rule 4 is TCP only). */
static __always_inline enum tp_verdict tp_udp_decide(const struct tp_config *cfg,
						      const struct tp_conn_attempt *a,
						      u32 *reason)
{
	if (a->dst_port != 53 || !(cfg->flags & (TP_F_DNS | TP_F_DNS_ALL)))
		return TP_DIRECT;	/* not DNS: no rule applies, nothing to count */
	/* 1. -A OUTPUT -p udp -m multiport --dports P -m owner --uid-owner U -j RETURN */
	if (tp_uid_port_excluded(cfg, a->uid, TP_PROTO_UDP, a->dst_port)) {
		*reason = TP_R_EXCL_UID_PORT;
		return TP_DIRECT;
	}
	/* 2. -A OUTPUT -d CIDR -j RETURN: any protocol, so DNS too */
	if (tp_cidr_match(cfg, TP_CIDR_EXCLUDE_OUT, a->dst)) {
		*reason = TP_R_EXCL_IP;
		return TP_DIRECT;
	}
	/* 3. -A OUTPUT -p udp --dport 53 -m owner --uid-owner DP -j RETURN: kuma-dp's own
	 * queries to the real upstream resolver */
	if (a->uid == cfg->dp_uid) {
		*reason = TP_R_DNS_DP_DIRECT;
		return TP_DIRECT;
	}
	/* 3. -A OUTPUT -p udp --dport 53 [-d NAMESERVER] -j REDIRECT --to-ports 15053:
	 * every UDP 53 with captureAll, else only to resolv.conf's nameservers */
	if (!(cfg->flags & TP_F_DNS_ALL) && !tp_cidr_match(cfg, TP_CIDR_DNS_SERVER, a->dst))
		return TP_DIRECT;
	*reason = TP_R_DNS_REDIRECT;
	return TP_TO_DNS;
}

#endif /* TPROXY_OUTBOUND_H */
