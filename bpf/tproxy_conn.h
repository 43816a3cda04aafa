/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tproxy_conn.h - the namespace of a sock_ops socket, and building tp_conns keys. A
 * connection is keyed as the application's socket sees it (its own address and port, the
 * proxy's address and port) in its network namespace; the proxy's accepted socket sees the
 * same four values the other way round, in the same namespace (loopback never leaves it).
 */
#ifndef TPROXY_CONN_H
#define TPROXY_CONN_H

#include "tproxy_helpers.h"

/* The namespace bind4/6 (or install) recorded for a proxy's socket on a redirect port, and
 * the kernel copied into each socket accepted from it (tp_sk_ns is BPF_F_CLONE); 0 if
 * none: not a proxy socket of a registered namespace. */
static __always_inline u64 tp_sk_netns(struct bpf_sock *sk)
{
	u64 *ns = tp_sk_ns.sk_storage_get(sk, 0, 0);

	return ns ? *ns : 0;
}

/* The network namespace of a passive or listening sock_ops socket. bpf_get_netns_cookie()
 * exists in sock_ops from 5.15 (the loader probes it); before that, the identity carried
 * with the proxy's socket stands in. (The application's sockets carry theirs in
 * tp_sk_orig, written by connect4/6.) */
static __always_inline u64 tp_sockops_netns(struct bpf_sock_ops *skops, struct bpf_sock *sk)
{
#ifdef TP_SOCKOPS_NETNS_COOKIE
	return bpf_get_netns_cookie(skops);
#else
	return tp_sk_netns(sk);
#endif
}

/* From a struct bpf_sock_ops: local/remote; swap for the passive (proxy) end. */
static __always_inline void tp_key_from_sockops(struct tp_conn_key *k,
						struct bpf_sock_ops *skops, int proxy_end,
						u64 netns)
{
	u8 *local = proxy_end ? k->proxy_addr : k->app_addr;
	u8 *remote = proxy_end ? k->app_addr : k->proxy_addr;
	u16 lport = (u16)skops->local_port;
	u16 rport = (u16)bpf_ntohl(skops->remote_port);

	k->netns_cookie = netns;
	/* An AF_INET6 socket on a v4-mapped connection: at TCP_CONNECT_CB (inside
	 * tcp_v4_connect) its IPv6 source may not be filled in yet, the IPv4 fields are. */
	if (skops->family == TP_AF_INET ||
	    (TP_CTX_U32(skops->remote_ip6[0]) == 0 && TP_CTX_U32(skops->remote_ip6[1]) == 0 &&
	     TP_CTX_U32(skops->remote_ip6[2]) == bpf_htonl(0x0000ffff))) {
		tp_addr_from_ip4(local, skops->local_ip4);
		tp_addr_from_ip4(remote, skops->remote_ip4);
	} else {
		tp_addr_from_ctx_ip6(local, skops->local_ip6);
		tp_addr_from_ctx_ip6(remote, skops->remote_ip6);
	}
	k->app_port = proxy_end ? rport : lport;
	k->proxy_port = proxy_end ? lport : rport;
}

#endif /* TPROXY_CONN_H */
