/* SPDX-License-Identifier: GPL-2.0 */
/*
 * sk_lookup.c - sk_lookup attached to the network namespace (kernel >= 5.9): TCP
 * connections arriving from other hosts are handed to the proxy's inbound listener, as
 * Kuma's nat PREROUTING REDIRECT to 15006 does.
 *
 * No packet is rewritten: the kernel's listener lookup picks the proxy's socket (held in
 * tp_listeners) instead of the application's, once per connection, at the SYN. The
 * accepted socket's local address is the address the client dialed, which is therefore
 * what getsockname() and SO_ORIGINAL_DST return to the proxy. Established connections
 * never reach this program, so install and uninstall leave them alone.
 *
 * One link per registered namespace, all to the same program. sk_lookup has no netns
 * cookie helper, so the namespace is found by the address the connection arrives at
 * (tp_ns_addrs: each registered namespace's own addresses; install refuses an address
 * another registered namespace already has).
 */
#include "tproxy_inbound.h"
#include "tproxy_trace.h"

/* Hand the connection to a live listener of the family in the namespace's row, on the
 * inbound port. Returns 0 once one took it. Any member of a SO_REUSEPORT group will do: the
 * kernel applies the group's own selection to the socket assigned (sk_assign without
 * BPF_SK_LOOKUP_F_NO_REUSEPORT), so connections spread over every worker's listener as
 * they would without us. A listener registered for another inbound port (before an upgrade
 * changed it) is not the proxy's listener any more.
 * Each slot's socket is assigned and released inside its own iteration: no reference
 * outlives an iteration, so the verifier's states at every slot are alike and prune (5.10
 * gave up at a million instructions when the socket found was carried out of the loop). */
static __always_inline long tp_assign_listener(struct bpf_sk_lookup *ctx,
					       const struct tp_config *cfg, u32 family, u16 port)
{
	u32 i, key, base = (cfg->ns_index * 2 + family) * TP_LISTENER_SLOTS;
	struct bpf_sock *sk;
	long err = -1;

#pragma unroll
	for (i = 0; i < TP_LISTENER_SLOTS; i++) {
		key = base + i;
		sk = (struct bpf_sock *)tp_listeners.lookup(&key);
		if (!sk)
			continue;
		if (sk->src_port == port)
			err = bpf_sk_assign(ctx, sk, 0);
		bpf_sk_release(sk);
		if (!err)
			break;
	}
	return err;
}

/* The client is the peer; where it went, the inbound port (or 0: left to the kernel). */
static __always_inline void tp_trace_inbound(struct bpf_sk_lookup *ctx,
					     const struct tp_config *cfg, u32 reason,
					     const u8 *local, const u8 *remote, u16 target_port)
{
	tp_trace(ctx, cfg, TP_HOOK_SK_LOOKUP, IPPROTO_TCP, reason, local, (u16)ctx->local_port,
		 remote, bpf_ntohs((u16)ctx->remote_port), target_port);
}

int sk_lookup_inbound(struct bpf_sk_lookup *ctx)
{
	struct tp_addr_key local = {};
	struct tp_config *cfg;
	u32 reason = 0;
	u8 remote[16];
	u64 *netns;
	long err;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (ctx->family == TP_AF_INET) {
		tp_addr_from_ip4(remote, ctx->remote_ip4);
		tp_addr_from_ip4(local.addr, ctx->local_ip4);
	} else {
		tp_addr_from_ctx_ip6(remote, ctx->remote_ip6);
		tp_addr_from_ctx_ip6(local.addr, ctx->local_ip6);
	}
	netns = tp_ns_addrs.lookup(&local);
	cfg = netns ? tp_ns_config(*netns) : NULL;
	if (!cfg)
		return SK_PASS;
	if (!tp_inbound_decide(cfg, remote, (u16)ctx->local_port, &reason)) {
		tp_count(cfg->netns_cookie, reason);
		tp_trace_inbound(ctx, cfg, reason, local.addr, remote, 0);
		return SK_PASS;
	}
	/* An AF_INET6 listener that is not V6ONLY takes IPv4 too (Envoy's [::]:15006). */
	err = tp_assign_listener(ctx, cfg, ctx->family == TP_AF_INET ? TP_LISTENER_V4 :
								  TP_LISTENER_V6,
				 cfg->inbound_port);
	if (err && ctx->family == TP_AF_INET)
		err = tp_assign_listener(ctx, cfg, TP_LISTENER_V6, cfg->inbound_port);
	if (err) {
		/* No proxy: refuse (SK_DROP ends the lookup with no socket, so the client
		 * gets a RST), as iptables' REDIRECT to a closed port would. Never deliver the
		 * connection around the proxy. */
		tp_count(cfg->netns_cookie, TP_R_IN_NO_LISTENER);
		tp_trace_inbound(ctx, cfg, TP_R_IN_NO_LISTENER, local.addr, remote, 0);
		return SK_DROP;
	}
	tp_count(cfg->netns_cookie, TP_R_IN_REDIRECT);
	tp_trace_inbound(ctx, cfg, TP_R_IN_REDIRECT, local.addr, remote, cfg->inbound_port);
	return SK_PASS;
}
