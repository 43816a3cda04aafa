/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tproxy_inbound.h - Kuma's inbound rule list (iptables nat PREROUTING and the
 * KUMA_MESH_INBOUND chain) as one function, first match wins. sk_lookup uses it to steer
 * a new connection; sock_ops uses it again to mark the accepted socket for getsockopt.
 */
#ifndef TPROXY_INBOUND_H
#define TPROXY_INBOUND_H

#include "tproxy_helpers.h"

/* remote: the client's address (mapped for IPv4); port: the port it dialed. */
static __always_inline int tp_inbound_decide(const struct tp_config *cfg,
					     const u8 *remote, u16 port, u32 *reason)
{
	/* redirect.inbound.enabled=false (--redirect-inbound=false, gateways): Kuma writes
	 * no PREROUTING -j KUMA_MESH_INBOUND. */
	if (!(cfg->flags & TP_F_INBOUND)) {
		*reason = TP_R_IN_OFF;
		return 0;
	}
	/* ipFamilyMode ipv4: no ip6tables rules. */
	if (!tp_addr_is_mapped(remote) && !(cfg->flags & TP_F_IPV6)) {
		*reason = TP_R_FAMILY_OFF;
		return 0;
	}
	/* nat PREROUTING never sees a connection made inside the namespace (its NAT was
	 * decided in OUTPUT): the outbound rules already handled those. sk_lookup sees every
	 * SYN, so the local ones are told apart by their source. */
	if (tp_addr_is_local(cfg, remote)) {
		*reason = TP_R_IN_LOCAL_SOURCE;
		return 0;
	}
	/* -A KUMA_MESH_INBOUND -s CIDR -j RETURN (--exclude-inbound-ips) */
	if (tp_cidr_match(cfg, TP_CIDR_EXCLUDE_IN, remote)) {
		*reason = TP_R_IN_EXCL_IP;
		return 0;
	}
	/* includePorts: -A KUMA_MESH_INBOUND -p tcp --dport P -j KUMA_MESH_INBOUND_REDIRECT
	 * for those ports only (exclude rules are not written then). */
	if (cfg->flags & TP_F_IN_INCLUDE) {
		if (!tp_port_in(cfg, TP_PORT_INCLUDE_IN, port)) {
			*reason = TP_R_IN_NOT_INCLUDED;
			return 0;
		}
	} else if (tp_port_in(cfg, TP_PORT_EXCLUDE_IN, port)) {
		/* -A KUMA_MESH_INBOUND -p tcp --dport P -j RETURN (default: 22, so SSH to
		 * the host survives) */
		*reason = TP_R_IN_EXCL_PORT;
		return 0;
	}
	/* -A KUMA_MESH_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15006 */
	*reason = TP_R_IN_REDIRECT;
	return 1;
}

#endif /* TPROXY_INBOUND_H */
