/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tproxy_maps.h - every map of the node program set, pinned under TP_PIN_DIR (set by the
 * loader to <bpffs>/ebpf-tproxy/node/maps-v<TP_ABI_VERSION>).
 *
 * One program set serves every registered network namespace: each namespace's
 * configuration is the value of tp_ns under its cookie, and every per-namespace table
 * (ports, CIDRs, uid rules, addresses, listeners, counters) is keyed by that cookie (or the
 * namespace's row). A socket of a namespace that is not registered costs one tp_ns lookup.
 *
 * BCC opens a pinned map when the pin exists and creates and pins it otherwise, which is
 * what makes an upgrade in place possible: new programs are compiled against the same
 * maps, so recorded connections and counters survive the switch.
 *
 * Port, CIDR and uid entries are double-buffered by generation (tp_config.gen): the loader
 * writes a namespace's inactive generation, then replaces its tp_ns value (one update), so
 * a connect() never sees half of an old and half of a new configuration.
 */
#ifndef TPROXY_MAPS_H
#define TPROXY_MAPS_H

#include "tproxy_abi.h"

#define TP_PIN(name) TP_PIN_DIR "/" #name

BPF_TABLE_PINNED("hash", u64, struct tp_config, tp_ns, TP_MAX_NS, TP_PIN(tp_ns),
		 BPF_F_NO_PREALLOC);
/* Each registered namespace's own addresses, for sk_lookup (see struct tp_addr_key). */
BPF_TABLE_PINNED("hash", struct tp_addr_key, u64, tp_ns_addrs, TP_NS_ADDRS_MAX, TP_PIN(tp_ns_addrs),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct tp_uid_rule_key, struct tp_uid_rule, tp_uid_rules,
		 2 * TP_MAX_UID_RULES * TP_MAX_NS, TP_PIN(tp_uid_rules), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct tp_port_key, u8, tp_ports, TP_PORTS_MAX, TP_PIN(tp_ports),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct tp_cidr_key, u8, tp_cidrs, TP_CIDRS_MAX, TP_PIN(tp_cidrs),
		 BPF_F_NO_PREALLOC);
/* The application's socket: its original destination and namespace, freed with it. */
BPF_TABLE_PINNED("sk_storage", int, struct tp_sk_orig, tp_sk_orig, 0, TP_PIN(tp_sk_orig),
		 BPF_F_NO_PREALLOC);
/* The namespace of a proxy's socket bound to one of its namespace's redirect ports, set by
 * bind4/6 (or by install for a proxy already listening) and copied by the kernel into every
 * socket accepted from it (BPF_F_CLONE): how sock_ops and getsockopt tell which namespace
 * a passive socket is in on kernels without bpf_get_netns_cookie() in sock_ops (< 5.15). */
BPF_TABLE_PINNED("sk_storage", int, u64, tp_sk_ns, 0, TP_PIN(tp_sk_ns),
		 BPF_F_NO_PREALLOC | BPF_F_CLONE);
/* Original destination by connection, from the application's SYN (sock_ops
 * TCP_CONNECT_CB) until the proxy's end exists (PASSIVE_ESTABLISHED_CB), which moves it
 * into tp_sk_answer: the only way across from one socket to the other, since the proxy's
 * socket is a different socket. The application's close deletes an entry the proxy never
 * took. Never LRU: a live entry is never evicted; a full table is counted and makes
 * SO_ORIGINAL_DST fail, never answer wrong. */
BPF_TABLE_PINNED("hash", struct tp_conn_key, struct tp_conn, tp_conns, TP_CONN_MAX,
		 TP_PIN(tp_conns), BPF_F_NO_PREALLOC);
/* SO_ORIGINAL_DST's answer on the proxy's accepted socket (outbound: copied from
 * tp_conns; inbound: the address the client dialed), freed with that socket. */
BPF_TABLE_PINNED("sk_storage", int, struct tp_answer, tp_sk_answer, 0, TP_PIN(tp_sk_answer),
		 BPF_F_NO_PREALLOC);

/* The proxy's listening sockets on the inbound port (TP_LISTENER_SLOTS per namespace and
 * family), for sk_lookup.
 * BCC's BPF_SOCKMAP has sock_map_update() but no lookup(), and no pinning; this is the
 * same table declaration with both methods, pinned like the others. The kernel removes
 * an entry by itself when its socket closes, so a stopped proxy leaves no stale socket. */
struct tp_listeners_table_t {
	u32 key;
	u64 leaf;   /* 8 bytes: userspace reads back the socket's cookie (status) */
	u64 *(*lookup)(u32 *);
	int (*delete)(u32 *);
	int (*sock_map_update)(void *, void *, u64);
	u32 max_entries;
	int flags;
};
__attribute__((section("maps/sockmap:" TP_PIN(tp_listeners))))
struct tp_listeners_table_t tp_listeners = { .max_entries = 2 * TP_LISTENER_SLOTS * TP_MAX_NS };

/* --ebpf-accelerate: the application's redirected sockets and the proxy's sockets for them,
 * keyed by how each sees its connection (struct tp_sock_key), for sk_msg_accel. Same
 * reason as tp_listeners for declaring it here: BCC's BPF_SOCKHASH cannot be pinned. The
 * kernel removes a socket by itself when it closes. */
struct tp_accel_table_t {
	struct tp_sock_key key;
	u64 leaf;
	int (*delete)(struct tp_sock_key *);
	int (*sock_hash_update)(void *, void *, u64);
	int (*msg_redirect_hash)(void *, void *, u64);
	u32 max_entries;
	int flags;
};
__attribute__((section("maps/sockhash:" TP_PIN(tp_accel))))
struct tp_accel_table_t tp_accel = { .max_entries = TP_ACCEL_MAX };
/* Each accelerated socket's state (TP_ACCEL_ON or TP_ACCEL_TCP), freed with the socket. */
BPF_TABLE_PINNED("sk_storage", int, u32, tp_sk_accel, 0, TP_PIN(tp_sk_accel),
		 BPF_F_NO_PREALLOC);

/* Per namespace (created by the loader with the namespace, deleted with it). */
BPF_TABLE_PINNED("percpu_hash", u64, struct tp_ns_counters, tp_counters, TP_MAX_NS,
		 TP_PIN(tp_counters));
/* The node program set's description, and each namespace's by registration name. */
BPF_TABLE_PINNED("array", u32, struct tp_meta, tp_node, 1, TP_PIN(tp_node));
BPF_TABLE_PINNED("hash", struct tp_name, struct tp_meta, tp_ns_meta, TP_MAX_NS,
		 TP_PIN(tp_ns_meta), BPF_F_NO_PREALLOC);
/* The cgroups the node set is attached to, by cgroup id: read by the loader only (which
 * cgroup covers which, status). */
BPF_TABLE_PINNED("hash", u64, struct tp_path, tp_attach, TP_MAX_ATTACH, TP_PIN(tp_attach),
		 BPF_F_NO_PREALLOC);
/* `ebpf-tproxy trace` (tproxy_trace.h): the events, what to leave out, and how many were
 * lost because the reader fell behind. The event maps are declared as BCC's
 * BPF_RINGBUF_OUTPUT and BPF_PERF_OUTPUT declare theirs, which cannot be pinned. The
 * loader probes the ring buffer (5.8) and builds with TP_HAVE_RINGBUF where it loads; a
 * perf event array (one buffer per CPU, filled in by the reader) serves 5.7. */
#ifndef TP_NO_TRACE
#ifdef TP_HAVE_RINGBUF
struct tp_events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" TP_PIN(tp_events))))
struct tp_events_table_t tp_events = { .max_entries = TP_TRACE_BYTES };
#else
struct tp_events_table_t {
	int key;
	u32 leaf;
	int (*perf_submit)(void *, void *, u32);
	int (*perf_submit_skb)(void *, u32, void *, u32);
	u32 max_entries;
};
__attribute__((section("maps/perf_output:" TP_PIN(tp_events))))
struct tp_events_table_t tp_events = { .max_entries = 0 };
#endif
BPF_TABLE_PINNED("array", u32, struct tp_trace_filter, tp_trace_filter, 1,
		 TP_PIN(tp_trace_filter));
BPF_TABLE_PINNED("percpu_array", u32, u64, tp_trace_lost, 1, TP_PIN(tp_trace_lost));
#endif

/* Where learn_netns_cookie (learn_cookie.c) leaves what it learned. */
BPF_TABLE_PINNED("array", u32, u64, tp_learned_cookie, 1, TP_PIN(tp_learned_cookie));

#endif /* TPROXY_MAPS_H */
