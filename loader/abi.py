"""Python twin of bpf/tproxy_abi.h: the constants and struct layouts shared with the BPF side.

bpf/tproxy_abi.h is the source of truth. tests/unit/test_abi.py checks every constant here
against it, and tests/kernel/test_abi_layout.py checks these ctypes layouts against the
structs BCC compiled from it.
"""
import ctypes as ct
import ipaddress

TP_ABI_VERSION = 4
TP_MAX_NS = 1024
TP_MAX_UID_RULES = 32
TP_MAX_PORT_RANGES = 16
TP_CONN_MAX = 262144
TP_PORTS_MAX = 1048576
TP_CIDRS_MAX = 1048576
TP_NS_ADDRS_MAX = 65536
TP_SO_ORIGINAL_DST = 80

TP_F_OUTBOUND = 0x1
TP_F_IPV6 = 0x2
TP_F_OUT_INCLUDE = 0x4
TP_F_INBOUND = 0x8
TP_F_IN_INCLUDE = 0x10
TP_F_DNS = 0x20
TP_F_DNS_ALL = 0x40
TP_F_ACCELERATE = 0x80
TP_F_TRACE = 0x100

TP_TRACE_BYTES = 1048576
TP_HOOK_CONNECT4 = 1
TP_HOOK_CONNECT6 = 2
TP_HOOK_SENDMSG4 = 3
TP_HOOK_SENDMSG6 = 4
TP_HOOK_RECVMSG4 = 5
TP_HOOK_RECVMSG6 = 6
TP_HOOK_SK_LOOKUP = 7
TP_HOOK_GETSOCKOPT = 8
HOOKS = {TP_HOOK_CONNECT4: "connect4", TP_HOOK_CONNECT6: "connect6",
         TP_HOOK_SENDMSG4: "sendmsg4", TP_HOOK_SENDMSG6: "sendmsg6",
         TP_HOOK_RECVMSG4: "recvmsg4", TP_HOOK_RECVMSG6: "recvmsg6",
         TP_HOOK_SK_LOOKUP: "sk_lookup", TP_HOOK_GETSOCKOPT: "getsockopt"}
TP_TF_PID = 0x1
TP_TF_UID = 0x2
TP_TF_REASONS = 0x4
TP_TF_DST = 0x8
TP_TF_PORT = 0x10
TP_TF_ACTIVE = 0x20

TP_ACCEL_MAX = 65536
TP_ACCEL_ON = 1
TP_ACCEL_TCP = 2

TP_PORT_EXCLUDE_OUT = 1
TP_PORT_INCLUDE_OUT = 2
TP_PORT_EXCLUDE_IN = 3
TP_PORT_INCLUDE_IN = 4
TP_CIDR_EXCLUDE_OUT = 1
TP_CIDR_LOCAL = 2
TP_CIDR_EXCLUDE_IN = 3
TP_CIDR_DNS_SERVER = 4

TP_LISTENER_V4 = 0
TP_LISTENER_V6 = 1
TP_LISTENER_SLOTS = 16

TP_ANSWER_OUTBOUND = 1
TP_ANSWER_INBOUND = 2

TP_PROTO_TCP = 0x1
TP_PROTO_UDP = 0x2

# Counter index -> name shown by `status`. Order is the TP_R_* numbering.
REASONS = [
    ("TP_R_UNUSED_0", "unused_0"),
    ("TP_R_FAMILY_OFF", "ipv6_not_captured"),
    ("TP_R_EXCL_UID_PORT", "excluded_uid_port"),
    ("TP_R_EXCL_IP", "excluded_ip"),
    ("TP_R_OUTBOUND_OFF", "outbound_disabled"),
    ("TP_R_EXCL_PORT", "excluded_port"),
    ("TP_R_PASSTHROUGH_SRC", "passthrough_source"),
    ("TP_R_DP_HAIRPIN", "dp_hairpin_to_inbound"),
    ("TP_R_APP_LOCAL", "app_to_local"),
    ("TP_R_DP_DIRECT", "dp_direct"),
    ("TP_R_LOOPBACK", "loopback"),
    ("TP_R_NOT_INCLUDED", "not_in_include_ports"),
    ("TP_R_REDIRECT_OUT", "redirected_outbound"),
    ("TP_R_ORIG_DST_ANSWERED", "orig_dst_answered"),
    ("TP_R_ORIG_DST_MISSED", "orig_dst_missed"),
    ("TP_R_CONN_TRACKED", "conn_tracked"),
    ("TP_R_CONN_TRACK_FAILED", "conn_track_failed"),
    ("TP_R_CONN_RELEASED", "conn_released"),
    ("TP_R_PEERNAME_RESTORED", "peername_restored"),
    ("TP_R_NO_STORAGE", "no_storage_left_direct"),
    ("TP_R_IN_OFF", "inbound_disabled"),
    ("TP_R_IN_LOCAL_SOURCE", "inbound_local_source"),
    ("TP_R_IN_EXCL_IP", "inbound_excluded_ip"),
    ("TP_R_IN_NOT_INCLUDED", "inbound_not_in_include_ports"),
    ("TP_R_IN_EXCL_PORT", "inbound_excluded_port"),
    ("TP_R_IN_REDIRECT", "redirected_inbound"),
    ("TP_R_IN_NO_LISTENER", "inbound_refused_no_listener"),
    ("TP_R_IN_LISTENER_SET", "inbound_listener_registered"),
    ("TP_R_IN_ORIG_DST_ANSWERED", "inbound_orig_dst_answered"),
    ("TP_R_DNS_DP_DIRECT", "dns_dp_direct"),
    ("TP_R_DNS_REDIRECT", "redirected_dns"),
    ("TP_R_DNS_TCP_DIRECT", "dns_tcp_direct"),
    ("TP_R_DNS_NOT_REDIRECTABLE", "dns_not_redirectable"),
    ("TP_R_DNS_REPLY_RESTORED", "dns_reply_source_restored"),
    ("TP_R_IN_LISTENER_FAILED", "inbound_listener_registration_failed"),
    ("TP_R_ORIG_DST_REFUSED", "orig_dst_refused_loop"),
    ("TP_R_CONN_REPLACED", "conn_stale_replaced"),
]
TP_R_COUNT = len(REASONS)
REASON_INDEX = {name: i for i, (_, name) in enumerate(REASONS)}

# Acceleration counter index -> name shown by `status` (TP_A_* numbering).
ACCEL_COUNTERS = [
    ("TP_A_SOCK_ADDED", "accel_sockets_added"),
    ("TP_A_SOCK_FAILED", "accel_sockets_failed"),
    ("TP_A_MSG_REDIRECTED", "accel_msgs_redirected"),
    ("TP_A_MSG_TCP", "accel_msgs_via_tcp"),
]
TP_A_COUNT = len(ACCEL_COUNTERS)

TP_META_SIZE = 8188
TP_NAME_MAX = 64
TP_MAX_ATTACH = 4096
TP_PATH_MAX = 4096


class TpConfig(ct.Structure):
    _fields_ = [
        ("flags", ct.c_uint32),
        ("dp_uid", ct.c_uint32),
        ("outbound_port", ct.c_uint16),
        ("inbound_port", ct.c_uint16),
        ("dns_port", ct.c_uint16),
        ("gen", ct.c_uint8),
        ("pad", ct.c_uint8),
        ("n_uid_rules", ct.c_uint32),
        ("ns_index", ct.c_uint32),
        ("netns_cookie", ct.c_uint64),
        ("instance_ip4", ct.c_uint8 * 16),
        ("instance_ip6", ct.c_uint8 * 16),
    ]


class TpPortRange(ct.Structure):
    _fields_ = [("lo", ct.c_uint16), ("hi", ct.c_uint16)]


class TpUidRule(ct.Structure):
    _fields_ = [
        ("uid_lo", ct.c_uint32),
        ("uid_hi", ct.c_uint32),
        ("protos", ct.c_uint8),
        ("n_ranges", ct.c_uint8),
        ("pad", ct.c_uint16),
        ("ranges", TpPortRange * TP_MAX_PORT_RANGES),
    ]


class TpUidRuleKey(ct.Structure):
    _fields_ = [("netns_cookie", ct.c_uint64), ("index", ct.c_uint32), ("pad", ct.c_uint32)]


class TpPortKey(ct.Structure):
    _fields_ = [("netns_cookie", ct.c_uint64), ("gen", ct.c_uint8), ("kind", ct.c_uint8),
                ("port", ct.c_uint16), ("pad", ct.c_uint32)]


class TpCidrKey(ct.Structure):
    _fields_ = [
        ("prefixlen", ct.c_uint32),
        ("netns_lo", ct.c_uint32),
        ("netns_hi", ct.c_uint32),
        ("gen", ct.c_uint8),
        ("kind", ct.c_uint8),
        ("family", ct.c_uint8),
        ("pad", ct.c_uint8),
        ("addr", ct.c_uint8 * 16),
    ]


class TpAddrKey(ct.Structure):
    _fields_ = [("addr", ct.c_uint8 * 16)]


class TpOrigDst(ct.Structure):
    _fields_ = [("addr", ct.c_uint8 * 16), ("port", ct.c_uint16), ("family", ct.c_uint16)]


class TpSkOrig(ct.Structure):
    _fields_ = [("orig", TpOrigDst), ("pad", ct.c_uint32), ("netns_cookie", ct.c_uint64)]


class TpConnKey(ct.Structure):
    _fields_ = [
        ("netns_cookie", ct.c_uint64),
        ("app_addr", ct.c_uint8 * 16),
        ("proxy_addr", ct.c_uint8 * 16),
        ("app_port", ct.c_uint16),
        ("proxy_port", ct.c_uint16),
        ("pad", ct.c_uint32),
    ]


class TpSockKey(ct.Structure):
    _fields_ = [
        ("netns_cookie", ct.c_uint64),
        ("local_addr", ct.c_uint8 * 16),
        ("remote_addr", ct.c_uint8 * 16),
        ("local_port", ct.c_uint16),
        ("remote_port", ct.c_uint16),
        ("pad", ct.c_uint32),
    ]


class TpConn(ct.Structure):
    _fields_ = [("orig", TpOrigDst)]


class TpAnswer(ct.Structure):
    _fields_ = [("orig", TpOrigDst), ("kind", ct.c_uint32), ("netns_cookie", ct.c_uint64)]


class TpNsCounters(ct.Structure):
    _fields_ = [("reason", ct.c_uint64 * TP_R_COUNT), ("accel", ct.c_uint64 * TP_A_COUNT)]


class TpEvent(ct.Structure):
    _fields_ = [
        ("ts_ns", ct.c_uint64),
        ("netns_cookie", ct.c_uint64),
        ("pid", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("comm", ct.c_char * 16),
        ("addr", ct.c_uint8 * 16),
        ("peer", ct.c_uint8 * 16),
        ("port", ct.c_uint16),
        ("peer_port", ct.c_uint16),
        ("target_port", ct.c_uint16),
        ("reason", ct.c_uint8),
        ("hook", ct.c_uint8),
        ("proto", ct.c_uint8),
        ("pad", ct.c_uint8 * 7),
    ]


class TpTraceFilter(ct.Structure):
    _fields_ = [
        ("reasons", ct.c_uint64),
        ("flags", ct.c_uint32),
        ("pid", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("port", ct.c_uint16),
        ("dst_prefix", ct.c_uint8),
        ("pad", ct.c_uint8),
        ("dst", ct.c_uint8 * 16),
    ]


class TpMeta(ct.Structure):
    _fields_ = [("len", ct.c_uint32), ("json", ct.c_char * TP_META_SIZE)]


class TpName(ct.Structure):
    _fields_ = [("name", ct.c_char * TP_NAME_MAX)]


class TpPath(ct.Structure):
    _fields_ = [("path", ct.c_char * TP_PATH_MAX)]


# Which ctypes twin stands for which C struct (checked by the layout test).
STRUCTS = {
    "tp_config": TpConfig,
    "tp_port_range": TpPortRange,
    "tp_uid_rule": TpUidRule,
    "tp_uid_rule_key": TpUidRuleKey,
    "tp_port_key": TpPortKey,
    "tp_cidr_key": TpCidrKey,
    "tp_addr_key": TpAddrKey,
    "tp_orig_dst": TpOrigDst,
    "tp_sk_orig": TpSkOrig,
    "tp_conn_key": TpConnKey,
    "tp_conn": TpConn,
    "tp_answer": TpAnswer,
    "tp_sock_key": TpSockKey,
    "tp_ns_counters": TpNsCounters,
    "tp_event": TpEvent,
    "tp_trace_filter": TpTraceFilter,
    "tp_meta": TpMeta,
    "tp_name": TpName,
    "tp_path": TpPath,
}


def addr16(ip):
    """An address as the BPF side stores it: 16 bytes, IPv4 as ::ffff:a.b.c.d."""
    ip = ipaddress.ip_address(ip)
    if ip.version == 4:
        ip = ipaddress.IPv6Address("::ffff:" + str(ip))
    return (ct.c_uint8 * 16)(*ip.packed)


def addr_from16(raw, family=None):
    """Inverse of addr16: an IPv4Address for mapped addresses, else IPv6Address."""
    ip = ipaddress.IPv6Address(bytes(raw))
    return ip.ipv4_mapped or ip


def cidr_key(netns_cookie, gen, kind, network):
    """The tp_cidrs LPM key for one CIDR of a namespace: 64 bits of cookie, 32 of (gen, kind,
    family, pad), then the address bits."""
    net = ipaddress.ip_network(network, strict=False)
    bits = net.prefixlen + (96 if net.version == 4 else 0)
    return TpCidrKey(prefixlen=64 + 32 + bits, netns_lo=netns_cookie & 0xFFFFFFFF,
                     netns_hi=netns_cookie >> 32, gen=gen, kind=kind, family=net.version,
                     addr=addr16(net.network_address))


def name_key(name):
    """A registration name as the key of tp_ns_meta."""
    raw = name.encode()
    if len(raw) >= TP_NAME_MAX:
        raise ValueError(f"name {name!r} is longer than {TP_NAME_MAX - 1} bytes")
    return TpName(raw)
