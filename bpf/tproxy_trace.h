/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tproxy_trace.h - `ebpf-tproxy trace`: each decision of a traced namespace, as an event in
 * tp_events, for the reader in loader/trace.py.
 *
 * Why this shape:
 *  - A namespace nobody traces pays one test of a flag in the configuration its program
 *    already read (tp_tracing); everything else happens only for traced namespaces.
 *  - The filter is applied here, before the event is built, so that a busy node being
 *    traced for one pid does not copy every other decision to user space.
 *  - An event the buffer has no room for is counted (tp_trace_lost), never waited for:
 *    a slow reader slows nothing but itself.
 *  - Built with -DTP_NO_TRACE, none of it exists: what `make bench` compares "tracing
 *    off" with.
 */
#ifndef TPROXY_TRACE_H
#define TPROXY_TRACE_H

#include "tproxy_helpers.h"

static __always_inline int tp_tracing(const struct tp_config *cfg)
{
#ifdef TP_NO_TRACE
	return 0;
#else
	return cfg->flags & TP_F_TRACE;
#endif
}

/* Whether any trace is reading now: for a hook that would otherwise have to look its
 * namespace's configuration up only to find the flag off (getsockopt's answers). An
 * array's lookup is a load the verifier inlines. */
static __always_inline int tp_trace_active(void)
{
#ifdef TP_NO_TRACE
	return 0;
#else
	u32 zero = 0;
	struct tp_trace_filter *f = tp_trace_filter.lookup(&zero);

	return f && (f->flags & TP_TF_ACTIVE);
#endif
}

#ifndef TP_NO_TRACE
/* addr within net/prefix (16-byte addresses, mapped for IPv4). Compared a 32-bit word at
 * a time in host order, so the mask is a plain shift. */
static __always_inline int tp_prefix_match(const u8 *addr, const u8 *net, u32 prefix)
{
	const u32 *a = (const u32 *)addr, *n = (const u32 *)net;
	u32 i, bits, mask;

#pragma unroll
	for (i = 0; i < 4; i++) {
		if (prefix <= i * 32)
			break;
		bits = prefix - i * 32;
		mask = bits >= 32 ? 0xffffffff : ~(0xffffffffU >> bits);
		if ((bpf_ntohl(a[i]) ^ bpf_ntohl(n[i])) & mask)
			return 0;
	}
	return 1;
}
#endif

/* Send one decision to the reader if its namespace is traced and the filter lets it
 * through. hook is a constant at every call site, so sk_lookup's copy (softirq: no
 * process to name) has no pid, uid or comm code at all. addr and peer may be NULL (none:
 * zero in the event). pid 0 and an empty comm mean "not known here" (the reader shows
 * "-"). */
static __always_inline void tp_trace(void *ctx, const struct tp_config *cfg, u8 hook,
				     u8 proto, u32 reason, const u8 *addr, u16 port,
				     const u8 *peer, u16 peer_port, u16 target_port)
{
#ifndef TP_NO_TRACE
	int in_process = hook != TP_HOOK_SK_LOOKUP;
	/* getsockopt programs may ask for the current pid and comm only on newer kernels
	 * (not 5.10; the loader probes it); the uid they may ask everywhere. */
#ifdef TP_SOCKOPT_CURRENT
	int has_task = in_process;
#else
	int has_task = in_process && hook != TP_HOOK_GETSOCKOPT;
#endif
	struct tp_trace_filter *f;
	struct tp_event e = {};
	u32 zero = 0;
	u64 *lost;
	long err;

	if (!tp_tracing(cfg))
		return;
	f = tp_trace_filter.lookup(&zero);
	if (!f)
		return;
	if (has_task)
		e.pid = bpf_get_current_pid_tgid() >> 32;
	if (in_process)
		e.uid = (u32)bpf_get_current_uid_gid();
	if ((f->flags & TP_TF_PID) && (!has_task || e.pid != f->pid))
		return;
	if ((f->flags & TP_TF_UID) && (!in_process || e.uid != f->uid))
		return;
	if ((f->flags & TP_TF_REASONS) && (reason >= 64 || !((f->reasons >> reason) & 1)))
		return;
	if ((f->flags & TP_TF_PORT) && port != f->port)
		return;
	if ((f->flags & TP_TF_DST) && (!addr || !tp_prefix_match(addr, f->dst, f->dst_prefix)))
		return;
	e.ts_ns = bpf_ktime_get_ns();
	e.netns_cookie = cfg->netns_cookie;
	if (has_task)
		bpf_get_current_comm(e.comm, sizeof(e.comm));
	if (addr)
		__builtin_memcpy(e.addr, addr, 16);
	if (peer)
		__builtin_memcpy(e.peer, peer, 16);
	e.port = port;
	e.peer_port = peer_port;
	e.target_port = target_port;
	e.reason = reason;
	e.hook = hook;
	e.proto = proto;
#ifdef TP_HAVE_RINGBUF
	err = tp_events.ringbuf_output(&e, sizeof(e), 0);
#else
	err = tp_events.perf_submit(ctx, &e, sizeof(e));
#endif
	if (err) {
		lost = tp_trace_lost.lookup(&zero);
		if (lost)
			*lost += 1;
	}
#endif
}

#endif /* TPROXY_TRACE_H */
