/* SPDX-License-Identifier: GPL-2.0 */
/*
 * getpeername.c - cgroup/getpeername4 and getpeername6 (kernel >= 5.8): the application
 * sees the address it connected to, not 127.0.0.1:15001, as it would behind iptables NAT
 * (where the rewrite is invisible to the socket).
 */
#include "tproxy_helpers.h"

int getpeername4(struct bpf_sock_addr *ctx)
{
	struct tp_orig_dst *o;

	if (!ctx->sk)
		return 1;
	o = tp_sk_orig.sk_storage_get(ctx->sk, 0, 0);
	if (!o || o->family != TP_AF_INET)
		return 1;
	tp_ctx_set4(ctx, o->addr, o->port);
	tp_count(TP_R_PEERNAME_RESTORED);
	return 1;
}

int getpeername6(struct bpf_sock_addr *ctx)
{
	struct tp_orig_dst *o;

	if (!ctx->sk)
		return 1;
	o = tp_sk_orig.sk_storage_get(ctx->sk, 0, 0);
	if (!o)
		return 1;
	/* An AF_INET6 socket that dialed ::ffff:a.b.c.d gets the mapped address back. */
	tp_ctx_set6(ctx, o->addr, o->port);
	tp_count(TP_R_PEERNAME_RESTORED);
	return 1;
}
