/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tproxy_conn.h - building tp_conns keys. A connection is keyed as the application's
 * socket sees it (its own address and port, the proxy's address and port); the proxy's
 * accepted socket sees the same four values the other way round.
 */
#ifndef TPROXY_CONN_H
#define TPROXY_CONN_H

#include "tproxy_helpers.h"

/* From a struct bpf_sock_ops: local/remote; swap for the passive (proxy) end. */
static __always_inline void tp_key_from_sockops(struct tp_conn_key *k,
						struct bpf_sock_ops *skops, int proxy_end)
{
	u8 *local = proxy_end ? k->proxy_addr : k->app_addr;
	u8 *remote = proxy_end ? k->app_addr : k->proxy_addr;
	u16 lport = (u16)skops->local_port;
	u16 rport = (u16)bpf_ntohl(skops->remote_port);

	if (skops->family == TP_AF_INET) {
		tp_addr_from_ip4(local, skops->local_ip4);
		tp_addr_from_ip4(remote, skops->remote_ip4);
	} else {
		tp_addr_from_ctx_ip6(local, skops->local_ip6);
		tp_addr_from_ctx_ip6(remote, skops->remote_ip6);
	}
	k->app_port = proxy_end ? rport : lport;
	k->proxy_port = proxy_end ? lport : rport;
}

/* From the proxy's accepted socket as getsockopt sees it (struct bpf_sock). */
static __always_inline void tp_key_from_proxy_sock(struct tp_conn_key *k, struct bpf_sock *sk)
{
	if (sk->family == TP_AF_INET) {
		tp_addr_from_ip4(k->proxy_addr, sk->src_ip4);
		tp_addr_from_ip4(k->app_addr, sk->dst_ip4);
	} else {
		tp_addr_from_ctx_ip6(k->proxy_addr, sk->src_ip6);
		tp_addr_from_ctx_ip6(k->app_addr, sk->dst_ip6);
	}
	k->proxy_port = (u16)sk->src_port;
	k->app_port = bpf_ntohs(sk->dst_port);
}

#endif /* TPROXY_CONN_H */
