/* SPDX-License-Identifier: GPL-2.0 */
/*
 * learn_cookie.c - cgroup/sock_create, never attached to the node's cgroup: the loader
 * attaches it for a moment to a temporary child cgroup of its own and makes one socket
 * there, to learn its network namespace's cookie on kernels without SO_NETNS_COOKIE
 * (before 5.14). bpf_get_netns_cookie() works in cgroup/sock programs from 5.7. Pinned with
 * the node program set, so no later install needs a compiler for it.
 */
#include "tproxy_helpers.h"

int learn_netns_cookie(struct bpf_sock *ctx)
{
	u32 zero = 0;
	u64 cookie = bpf_get_netns_cookie(ctx);

	tp_learned_cookie.update(&zero, &cookie);
	return 1;
}
