/* SPDX-License-Identifier: GPL-2.0 */
/*
 * getpeername.c - cgroup/getpeername4 and getpeername6 (kernel >= 5.8): the application
 * sees the address it connected to, not 127.0.0.1:15001, as it would behind iptables NAT
 * (where the rewrite is invisible to the socket).
 */
#include "tproxy_helpers.h"

/* The original destination connect4/6 kept for this socket, if it is one of ours. Only
 * connect4/6 write tp_sk_orig, and only for a registered namespace, which is checked
 * again: a namespace unregistered since is left alone like every other. */
static __always_inline struct tp_sk_orig *tp_peer_orig(struct bpf_sock_addr *ctx)
{
	struct tp_sk_orig *o;

	if (!ctx->sk)
		return NULL;
	o = tp_sk_orig.sk_storage_get(ctx->sk, 0, 0);
	if (!o || !tp_ns_config(o->netns_cookie))
		return NULL;
	return o;
}

int getpeername4(struct bpf_sock_addr *ctx)
{
	struct tp_sk_orig *o = tp_peer_orig(ctx);

	if (!o || o->orig.family != TP_AF_INET)
		return 1;
	tp_ctx_set4(ctx, o->orig.addr, o->orig.port);
	tp_count(o->netns_cookie, TP_R_PEERNAME_RESTORED);
	return 1;
}

int getpeername6(struct bpf_sock_addr *ctx)
{
	struct tp_sk_orig *o = tp_peer_orig(ctx);

	if (!o)
		return 1;
	/* An AF_INET6 socket that dialed ::ffff:a.b.c.d gets the mapped address back. */
	tp_ctx_set6(ctx, o->orig.addr, o->orig.port);
	tp_count(o->netns_cookie, TP_R_PEERNAME_RESTORED);
	return 1;
}
