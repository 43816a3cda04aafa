/* SPDX-License-Identifier: GPL-2.0 */
/*
 * bind.c - cgroup/bind4 and cgroup/bind6: a socket of a registered namespace bound to one
 * of that namespace's redirect ports (the proxy's listeners on 15001 and 15006) is marked
 * with the namespace (tp_sk_ns), which the kernel copies into every socket accepted from
 * it. That is how sock_ops (before 5.15) and getsockopt know the namespace of a proxy's
 * socket: neither hook has a netns cookie helper there, bind does from 5.7.
 *
 * Overhead: one tp_ns lookup per bind() in the cgroup; one storage per proxy listener.
 */
#include "tproxy_helpers.h"

static __always_inline int tp_bind_mark(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct tp_config *cfg;
	u64 netns, *mark;
	u16 port;

	if (!sk || ctx->protocol != IPPROTO_TCP)
		return 1;
	netns = bpf_get_netns_cookie(ctx);
	cfg = tp_ns_config(netns);
	if (!cfg)
		return 1;
	port = bpf_ntohs((u16)ctx->user_port);
	if (port != cfg->outbound_port && port != cfg->inbound_port)
		return 1;
	mark = tp_sk_ns.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (mark)
		*mark = netns;
	else
		tp_count(netns, TP_R_NO_STORAGE);
	return 1;	/* bind goes ahead either way */
}

int bind4(struct bpf_sock_addr *ctx)
{
	return tp_bind_mark(ctx);
}

int bind6(struct bpf_sock_addr *ctx)
{
	return tp_bind_mark(ctx);
}
