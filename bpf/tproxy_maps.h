/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tproxy_maps.h - every map of an instance, pinned under TP_PIN_DIR (set by the loader to
 * <bpffs>/ebpf-tproxy/<instance>/maps-v<TP_ABI_VERSION>).
 *
 * BCC opens a pinned map when the pin exists and creates and pins it otherwise, which is
 * what makes an upgrade in place possible: new programs are compiled against the same
 * maps, so recorded connections and counters survive the switch.
 *
 * Configuration is double-buffered by generation (tp_active selects 0 or 1): the loader
 * fills the inactive generation, then flips tp_active with one 4-byte write, so a
 * connect() never sees half of an old and half of a new configuration.
 */
#ifndef TPROXY_MAPS_H
#define TPROXY_MAPS_H

#include "tproxy_abi.h"

#define TP_PIN(name) TP_PIN_DIR "/" #name

BPF_TABLE_PINNED("array", u32, u32, tp_active, 1, TP_PIN(tp_active));
BPF_TABLE_PINNED("array", u32, struct tp_config, tp_config, 2, TP_PIN(tp_config));
BPF_TABLE_PINNED("array", u32, struct tp_uid_rule, tp_uid_rules, 2 * TP_MAX_UID_RULES,
		 TP_PIN(tp_uid_rules));
BPF_TABLE_PINNED("hash", struct tp_port_key, u8, tp_ports, 4 * 65536, TP_PIN(tp_ports),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct tp_cidr_key, u8, tp_cidrs, 65536, TP_PIN(tp_cidrs),
		 BPF_F_NO_PREALLOC);
/* Original destination of the application's own socket: freed with the socket. */
BPF_TABLE_PINNED("sk_storage", int, struct tp_orig_dst, tp_sk_orig, 0, TP_PIN(tp_sk_orig),
		 BPF_F_NO_PREALLOC);
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

/* The proxy's listening sockets on the inbound port (TP_LISTENER_SLOTS per family), for
 * sk_lookup.
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
struct tp_listeners_table_t tp_listeners = { .max_entries = 2 * TP_LISTENER_SLOTS };

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
BPF_TABLE_PINNED("percpu_array", u32, u64, tp_accel_counters, TP_A_COUNT,
		 TP_PIN(tp_accel_counters));

BPF_TABLE_PINNED("percpu_array", u32, u64, tp_counters, TP_R_COUNT, TP_PIN(tp_counters));
BPF_TABLE_PINNED("array", u32, struct tp_meta, tp_meta, 1, TP_PIN(tp_meta));

#endif /* TPROXY_MAPS_H */
