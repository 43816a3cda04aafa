/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tproxy_abi.h - the structures and constants shared by the BPF programs and the loader.
 *
 * This is the single source of truth for the layouts.  loader/abi.py is its Python twin;
 * tests/unit/test_abi.py checks that every constant below matches, and
 * tests/kernel/test_abi_layout.py checks that the struct layouts BCC compiled match the
 * ctypes structures byte for byte.  Change both sides together.
 *
 * Conventions: IPv4 addresses are stored as IPv4-mapped IPv6 (::ffff:a.b.c.d) in every
 * 16-byte address field, so one lookup path serves both families and a v4-mapped address
 * on an AF_INET6 socket is, as Kuma requires, treated as the IPv4 address it is.
 * Ports are host byte order unless the name ends in _be.
 */
#ifndef TPROXY_ABI_H
#define TPROXY_ABI_H

/* Layout version: part of the pin directory, so an incompatible loader never reuses the
 * maps of an older one by accident. Bump it when any struct below changes. */
#define TP_ABI_VERSION 4

/* Network namespaces one node program set serves at once (tp_ns). Kubernetes runs 110 pods
 * a node by default. The per-namespace tables are keyed by the namespace's cookie and
 * allocated per entry (BPF_F_NO_PREALLOC), so for them this bounds memory rather than
 * reserving it; the per-CPU counters (tp_counters) and the listener sockmap (8 bytes per
 * slot) are preallocated for TP_MAX_NS. */
#define TP_MAX_NS 1024
#define TP_MAX_UID_RULES 32      /* --exclude-outbound-ports-for-uids entries (per namespace) */
#define TP_MAX_PORT_RANGES 16    /* port ranges in one such entry */
/* Redirected connections between connect() and the proxy's end existing at once (the
 * table only spans the handshake). The loader may build it smaller (-DTP_CONN_MAX), which
 * the tests do to show what a full table does. */
#ifndef TP_CONN_MAX
#define TP_CONN_MAX 262144
#endif
/* Shared by every namespace: a namespace's update writes its new generation before the old
 * one goes, so one namespace may use at most half (config.py and namespace.py check both
 * before anything is written). */
#define TP_PORTS_MAX 1048576    /* tp_ports: one entry per port, kind and generation */
#define TP_CIDRS_MAX 1048576    /* tp_cidrs: one entry per CIDR, kind and generation */
#define TP_NS_ADDRS_MAX 65536    /* tp_ns_addrs: the namespaces' own addresses */
#define TP_SO_ORIGINAL_DST 80    /* SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST */

/* tp_config.flags */
#define TP_F_OUTBOUND 0x1        /* redirect.outbound.enabled */
#define TP_F_IPV6 0x2            /* ipFamilyMode dualstack: IPv6 is captured too */
#define TP_F_OUT_INCLUDE 0x4     /* redirect.outbound.includePorts is set */
#define TP_F_INBOUND 0x8         /* redirect.inbound.enabled */
#define TP_F_IN_INCLUDE 0x10     /* redirect.inbound.includePorts is set */
#define TP_F_DNS 0x20            /* redirect.dns.enabled: UDP 53 to resolv.conf's servers */
#define TP_F_DNS_ALL 0x40        /* redirect.dns.captureAll: all UDP 53 */
#define TP_F_ACCELERATE 0x80     /* --ebpf-accelerate: application <-> proxy bytes via tp_accel */
#define TP_F_TRACE 0x100         /* `ebpf-tproxy trace` watches this namespace: each decision
				  * is also sent to tp_events (a namespace nobody traces pays
				  * this one test) */

/* Kinds of entries in tp_ports and tp_cidrs. */
#define TP_PORT_EXCLUDE_OUT 1    /* --exclude-outbound-ports */
#define TP_PORT_INCLUDE_OUT 2    /* redirect.outbound.includePorts */
#define TP_PORT_EXCLUDE_IN 3     /* --exclude-inbound-ports */
#define TP_PORT_INCLUDE_IN 4     /* redirect.inbound.includePorts */
#define TP_CIDR_EXCLUDE_OUT 1    /* --exclude-outbound-ips */
#define TP_CIDR_LOCAL 2          /* addresses of the network namespace ("-o lo") */
#define TP_CIDR_EXCLUDE_IN 3     /* --exclude-inbound-ips (source addresses) */
#define TP_CIDR_DNS_SERVER 4     /* nameservers of resolv.conf (redirect.dns.resolvConfigPath) */

/* Keys of tp_listeners: the proxy's listening sockets on the inbound port, in slots per
 * namespace and family: key = (ns_index * 2 + family) * TP_LISTENER_SLOTS + slot, where
 * ns_index is the namespace's row (tp_config.ns_index). Envoy opens one SO_REUSEPORT
 * listener per worker; each takes a slot, so the group stays reachable while any lives. */
#define TP_LISTENER_V4 0         /* AF_INET listeners (0.0.0.0 or an address) */
#define TP_LISTENER_V6 1         /* AF_INET6 listeners; serve IPv4 too unless V6ONLY */
#define TP_LISTENER_SLOTS 16

/* Acceleration (--ebpf-accelerate). Sockets in tp_accel at most: two per connection, so
 * 32,768 accelerated connections at once; beyond that a connection simply stays on TCP. */
#define TP_ACCEL_MAX 65536
/* tp_sk_accel: a socket's acceleration state, fixed for its lifetime once it leaves ON. */
#define TP_ACCEL_ON 1            /* in tp_accel: sendmsg goes straight to the peer socket */
#define TP_ACCEL_TCP 2           /* once through TCP, always through TCP (byte order) */

/* Acceleration counters: struct tp_counters.accel[]. */
#define TP_A_SOCK_ADDED 0        /* a socket (application or proxy end) joined tp_accel */
#define TP_A_SOCK_FAILED 1       /* tp_accel full or storage refused: that end stays on TCP */
#define TP_A_MSG_REDIRECTED 2    /* a sendmsg went socket to socket */
#define TP_A_MSG_TCP 3           /* the peer socket was not there: TCP from then on */
#define TP_A_COUNT 4

/* tp_answer.kind: what SO_ORIGINAL_DST answers on a proxy's accepted socket. */
#define TP_ANSWER_OUTBOUND 1     /* a connection connect4/6 redirected: its original dst */
#define TP_ANSWER_INBOUND 2      /* a connection sk_lookup steered: the address dialed */

/* tp_uid_rule.protos */
#define TP_PROTO_TCP 0x1
#define TP_PROTO_UDP 0x2

/* Why a connect() was decided the way it was: one counter each (tp_counters). */
#define TP_R_UNUSED_0 0           /* (was: another netns; those now leave uncounted) */
#define TP_R_FAMILY_OFF 1         /* IPv6 with ipFamilyMode ipv4 */
#define TP_R_EXCL_UID_PORT 2      /* rule 1: exclude-outbound-ports-for-uids */
#define TP_R_EXCL_IP 3            /* rule 2: exclude-outbound-ips */
#define TP_R_OUTBOUND_OFF 4       /* rule 4a: outbound redirect disabled */
#define TP_R_EXCL_PORT 5          /* rule 4b: exclude-outbound-ports */
#define TP_R_PASSTHROUGH_SRC 6    /* rule 4c: source 127.0.0.6 / ::6 to a local address */
#define TP_R_DP_HAIRPIN 7         /* rule 4d: DP user to a local address -> inbound port */
#define TP_R_APP_LOCAL 8          /* rule 4e: non-DP user to a local address */
#define TP_R_DP_DIRECT 9          /* rule 4f: DP user's own upstream connection */
#define TP_R_LOOPBACK 10          /* rule 4g: destination 127.0.0.1 / ::1 */
#define TP_R_NOT_INCLUDED 11      /* rule 4h: includePorts set, port not in it */
#define TP_R_REDIRECT_OUT 12      /* rule 4h: -> outbound port */
#define TP_R_ORIG_DST_ANSWERED 13 /* getsockopt(SO_ORIGINAL_DST) answered (outbound) */
#define TP_R_ORIG_DST_MISSED 14   /* SO_ORIGINAL_DST asked, nothing recorded, no kernel answer */
#define TP_R_CONN_TRACKED 15      /* a redirected connection was recorded at its SYN */
#define TP_R_CONN_TRACK_FAILED 16 /* tp_conns full: SO_ORIGINAL_DST fails for it, loudly */
#define TP_R_CONN_RELEASED 17     /* an entry left tp_conns: handed to the proxy's socket, or
				   * the application's end closed first */
#define TP_R_PEERNAME_RESTORED 18 /* getpeername() showed the original destination */
#define TP_R_NO_STORAGE 19        /* sk_storage full: connection left direct, not half-captured */
#define TP_R_IN_OFF 20            /* inbound: redirect.inbound.enabled=false */
#define TP_R_IN_LOCAL_SOURCE 21   /* inbound: from this namespace, not the network: untouched */
#define TP_R_IN_EXCL_IP 22        /* inbound: source in --exclude-inbound-ips */
#define TP_R_IN_NOT_INCLUDED 23   /* inbound: includePorts set, port not in it */
#define TP_R_IN_EXCL_PORT 24      /* inbound: port in --exclude-inbound-ports */
#define TP_R_IN_REDIRECT 25       /* inbound: steered to the proxy's inbound listener */
#define TP_R_IN_NO_LISTENER 26    /* inbound: no proxy listening: refused, never delivered around it */
#define TP_R_IN_LISTENER_SET 27   /* the proxy's listener on the inbound port was registered */
#define TP_R_IN_ORIG_DST_ANSWERED 28 /* SO_ORIGINAL_DST answered for an inbound connection */
#define TP_R_DNS_DP_DIRECT 29     /* DNS rule: UDP 53 from the DP user goes direct */
#define TP_R_DNS_REDIRECT 30      /* DNS rule: UDP 53 -> the DNS port */
#define TP_R_DNS_TCP_DIRECT 31    /* DNS rule: TCP 53 from anyone but the DP user: direct */
#define TP_R_DNS_NOT_REDIRECTABLE 32 /* UDP 53 to a link-local (or mapped) server via sendmsg6 */
#define TP_R_DNS_REPLY_RESTORED 33 /* a DNS reply's source shown as the server queried */
#define TP_R_IN_LISTENER_FAILED 34 /* the proxy's listener could not be put in tp_listeners */
#define TP_R_ORIG_DST_REFUSED 35  /* nothing recorded, and conntrack's answer was the proxy's
				   * own address (a loop): refused with EPERM */
#define TP_R_CONN_REPLACED 36     /* a stale tp_conns entry under the same key was replaced */
#define TP_R_COUNT 37

/* `ebpf-tproxy trace`: one event per decision of a traced namespace (TP_F_TRACE), in
 * tp_events -- a ring buffer where the kernel has one (5.8), else a perf event array. */
#define TP_TRACE_BYTES 1048576   /* ring buffer size (1 MiB): 10,922 events waiting */
/* Where a decision was made: tp_event.hook. */
#define TP_HOOK_CONNECT4 1
#define TP_HOOK_CONNECT6 2
#define TP_HOOK_SENDMSG4 3
#define TP_HOOK_SENDMSG6 4
#define TP_HOOK_RECVMSG4 5
#define TP_HOOK_RECVMSG6 6
#define TP_HOOK_SK_LOOKUP 7      /* softirq: no process, so pid, uid and comm are 0 */
#define TP_HOOK_GETSOCKOPT 8
/* tp_trace_filter.flags: which of its fields apply (all of them must match). */
#define TP_TF_PID 0x1
#define TP_TF_UID 0x2
#define TP_TF_REASONS 0x4
#define TP_TF_DST 0x8            /* addr within dst/dst_prefix */
#define TP_TF_PORT 0x10          /* port == dst_port */
#define TP_TF_ACTIVE 0x20        /* a trace is reading (set by trace while it runs) */

/* One namespace's configuration: the value of tp_ns, keyed by the namespace's cookie.
 * Replacing the whole value is what switches a namespace to a new configuration at once
 * (tp_ns is BPF_F_NO_PREALLOC: an update swaps in a new element, a program that looked up
 * the old one keeps reading it whole until it finishes). */
struct tp_config {
	__u32 flags;            /* TP_F_* */
	__u32 dp_uid;           /* --kuma-dp-user */
	__u16 outbound_port;    /* --redirect-outbound-port */
	__u16 inbound_port;     /* --redirect-inbound-port */
	__u16 dns_port;         /* --redirect-dns-port */
	__u8 gen;               /* generation of this namespace's port, CIDR and uid entries */
	__u8 pad;
	__u32 n_uid_rules;      /* entries used in tp_uid_rules for this generation */
	__u32 ns_index;         /* the namespace's row in tp_listeners (< TP_MAX_NS) */
	__u64 netns_cookie;     /* the key it is stored under, kept for status */
	__u8 instance_ip4[16];  /* source for redirected IPv4 connections (mapped); 0 = none */
	__u8 instance_ip6[16];  /* source for redirected IPv6 connections; 0 = none */
};

struct tp_port_range {
	__u16 lo;
	__u16 hi;
};

struct tp_uid_rule {
	__u32 uid_lo;
	__u32 uid_hi;
	__u8 protos;            /* TP_PROTO_* */
	__u8 n_ranges;
	__u16 pad;
	struct tp_port_range ranges[TP_MAX_PORT_RANGES];
};

struct tp_uid_rule_key {
	__u64 netns_cookie;
	__u32 index;            /* gen * TP_MAX_UID_RULES + rule */
	__u32 pad;
};

struct tp_port_key {
	__u64 netns_cookie;
	__u8 gen;
	__u8 kind;              /* TP_PORT_* */
	__u16 port;
	__u32 pad;              /* explicit: hash keys compare every byte */
};

/* LPM key. The namespace's cookie comes first, so one trie serves every namespace. The
 * family byte keeps an IPv6 CIDR such as ::/0 from matching IPv4 traffic, which is stored
 * mapped: ip6tables rules never see IPv4 packets either. The cookie is two 32-bit words:
 * a __u64 right after prefixlen would leave a hole the trie would compare. */
struct tp_cidr_key {
	__u32 prefixlen;        /* 64 (cookie) + 32 (gen, kind, family, pad) + 128 at most */
	__u32 netns_lo;         /* the cookie's low and high words */
	__u32 netns_hi;
	__u8 gen;
	__u8 kind;              /* TP_CIDR_* */
	__u8 family;            /* 4 or 6 */
	__u8 pad;
	__u8 addr[16];
};

/* One of a namespace's own addresses: the key of tp_ns_addrs, by which sk_lookup (which
 * has no netns cookie helper) finds the namespace a connection arrives in. */
struct tp_addr_key {
	__u8 addr[16];          /* mapped for IPv4 */
};

/* The original destination of one redirected connection. */
struct tp_orig_dst {
	__u8 addr[16];          /* mapped for IPv4 */
	__u16 port;
	__u16 family;           /* AF_INET or AF_INET6: the answer's sockaddr family */
};

/* What connect4/6 keeps with the application's socket (tp_sk_orig): where it was going,
 * and the namespace whose rules decided it, for the hooks that run later without a netns
 * cookie of their own (sock_ops before 5.15). */
struct tp_sk_orig {
	struct tp_orig_dst orig;
	__u32 pad;
	__u64 netns_cookie;
};

/* A connection as the application's socket sees it, in its network namespace: the key
 * of tp_conns. Loopback 4-tuples repeat across namespaces; the cookie keeps them apart. */
struct tp_conn_key {
	__u64 netns_cookie;
	__u8 app_addr[16];
	__u8 proxy_addr[16];
	__u16 app_port;
	__u16 proxy_port;
	__u32 pad;              /* explicit: hash keys compare every byte */
};

/* One socket as it sees its connection: the key of tp_accel. The peer socket's key is the
 * same four values swapped (both ends live in the same network namespace, no NAT); the
 * cookie keeps equal loopback 4-tuples of different namespaces apart. */
struct tp_sock_key {
	__u64 netns_cookie;
	__u8 local_addr[16];
	__u8 remote_addr[16];
	__u16 local_port;
	__u16 remote_port;
	__u32 pad;
};

/* A redirected connection from the application's SYN until the proxy's end exists. */
struct tp_conn {
	struct tp_orig_dst orig;
};

/* What getsockopt(SO_ORIGINAL_DST) answers on a proxy's accepted socket: kept with that
 * socket (sk_storage), so it lives exactly as long as the socket that can ask. */
struct tp_answer {
	struct tp_orig_dst orig;
	__u32 kind;             /* TP_ANSWER_* */
	__u64 netns_cookie;     /* the namespace it was decided for: counters */
};

/* Counters of one namespace (the value of tp_counters, per CPU, keyed by its cookie). */
struct tp_ns_counters {
	__u64 reason[TP_R_COUNT];
	__u64 accel[TP_A_COUNT];
};

/* One decision, as `trace` shows it. What addr/port and peer mean depends on the hook:
 *   connect, sendmsg: addr:port the destination asked for; peer the bound source (if any)
 *   recvmsg:          addr:port the server the reply is shown as coming from
 *   sk_lookup:        addr:port the address dialed; peer:peer_port the client
 *   getsockopt:       addr:port the answer (zero if none); peer:peer_port the proxy
 *                     socket's peer (the application's end) */
struct tp_event {
	__u64 ts_ns;            /* bpf_ktime_get_ns() */
	__u64 netns_cookie;
	__u32 pid;              /* thread group id (the process), 0 in sk_lookup */
	__u32 uid;
	char comm[16];
	__u8 addr[16];          /* mapped for IPv4 */
	__u8 peer[16];
	__u16 port;
	__u16 peer_port;
	__u16 target_port;      /* where it was sent: 0 = left as it was */
	__u8 reason;            /* TP_R_* */
	__u8 hook;              /* TP_HOOK_* */
	__u8 proto;             /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad[7];
};

/* What `trace` asked the kernel to leave out (tp_trace_filter[0]): one tracer at a time. */
struct tp_trace_filter {
	__u64 reasons;          /* bit r: reason r is shown (TP_TF_REASONS) */
	__u32 flags;            /* TP_TF_* */
	__u32 pid;
	__u32 uid;
	__u16 port;
	__u8 dst_prefix;        /* bits of dst (mapped for IPv4, so 96 + n) */
	__u8 pad;
	__u8 dst[16];
};

/* A description as JSON written by the loader (status reads it back): the node program
 * set's (tp_node) and each namespace's (tp_ns_meta, keyed by its registration name). */
#define TP_META_SIZE 8188
#define TP_NAME_MAX 64
struct tp_meta {
	__u32 len;
	char json[TP_META_SIZE];
};

struct tp_name {
	char name[TP_NAME_MAX];  /* NUL-padded */
};

/* A cgroup the node set is attached to: its path, by cgroup id (tp_attach). */
#define TP_MAX_ATTACH 4096
#define TP_PATH_MAX 4096
struct tp_path {
	char path[TP_PATH_MAX];  /* NUL-padded */
};

#endif /* TPROXY_ABI_H */
