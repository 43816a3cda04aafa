"""The ctypes twins in loader/abi.py have the layout BCC compiled from bpf/tproxy_abi.h:
same size and the same offset for every field."""
import ctypes as ct
import tempfile

import pytest

from loader import abi, programs

# C struct used as a key or value of a map -> (map, "Key" or "Leaf")
VIA_MAPS = {
    "tp_config": ("tp_ns", "Leaf"),
    "tp_uid_rule": ("tp_uid_rules", "Leaf"),
    "tp_uid_rule_key": ("tp_uid_rules", "Key"),
    "tp_port_key": ("tp_ports", "Key"),
    "tp_cidr_key": ("tp_cidrs", "Key"),
    "tp_addr_key": ("tp_ns_addrs", "Key"),
    "tp_sk_orig": ("tp_sk_orig", "Leaf"),
    "tp_conn_key": ("tp_conns", "Key"),
    "tp_conn": ("tp_conns", "Leaf"),
    "tp_answer": ("tp_sk_answer", "Leaf"),
    "tp_sock_key": ("tp_accel", "Key"),
    "tp_ns_counters": ("tp_counters", "Leaf"),
    "tp_meta": ("tp_node", "Leaf"),
    "tp_name": ("tp_ns_meta", "Key"),
    "tp_path": ("tp_attach", "Leaf"),
    "tp_trace_filter": ("tp_trace_filter", "Leaf"),
}
# Maps BCC has no table class for (a sockhash, sk_storage): decoded from the module's
# description directly.
DECODED = {"tp_accel", "tp_sk_orig", "tp_sk_answer"}


@pytest.fixture(scope="module")
def compiled():
    import subprocess
    d = tempfile.mkdtemp(prefix="tp-abi-")
    subprocess.run(["mount", "-t", "bpf", "bpf", d], check=True)
    bpf = programs.compile_programs(d)
    try:
        yield bpf
    finally:
        bpf.cleanup()
        subprocess.run(["umount", d], check=True)
        import os
        os.rmdir(d)


def bcc_struct(compiled, map_name, which):
    """The ctypes type BCC derived for a map's key or leaf."""
    import json
    from bcc.libbcc import lib
    if map_name in DECODED:
        desc = (lib.bpf_table_key_desc if which == "Key" else lib.bpf_table_leaf_desc)(
            compiled.module, map_name.encode())
        return compiled._decode_table_type(json.loads(desc))
    table = compiled[map_name.encode()]
    if which == "Leaf" and hasattr(table, "sLeaf"):
        return table.sLeaf   # a per-CPU map: Leaf is one slot per CPU
    return getattr(table, which)


def layout(t):
    out = []
    for name, ftype in t._fields_:
        if name.startswith("__pad_"):
            continue   # BCC names implicit holes; the named fields' offsets are what count
        out.append((name, getattr(t, name).offset, ct.sizeof(ftype)))
    return ct.sizeof(t), out


@pytest.mark.parametrize("cname", sorted(VIA_MAPS))
def test_struct_layout_matches_bcc(compiled, cname):
    map_name, which = VIA_MAPS[cname]
    bcc_type = bcc_struct(compiled, map_name, which)
    mine = abi.STRUCTS[cname]
    size, fields = layout(mine)
    bsize, bfields = layout(bcc_type)
    assert size == bsize
    assert [(o, s) for _, o, s in fields] == [(o, s) for _, o, s in bfields]
    assert [n for n, _, _ in fields] == [n for n, _, _ in bfields]


def test_event_layout_matches_bcc():
    # tp_event is the value of no map (the ring buffer's records are bytes): compiled as
    # an array's value here, from the same header.
    text = ("#include <uapi/linux/bpf.h>\n" + programs.source(files=("tproxy_abi.h",))
            + "BPF_ARRAY(tp_event_twin, struct tp_event, 1);\n")
    bpf = programs.bcc_compile(text.encode(), programs.QUIET_CFLAGS)
    try:
        assert layout(abi.TpEvent) == layout(bpf[b"tp_event_twin"].Leaf)
    finally:
        bpf.cleanup()


def test_every_twin_is_checked():
    assert set(abi.STRUCTS) - set(VIA_MAPS) == {"tp_event", "tp_port_range", "tp_orig_dst"}


def test_orig_dst_layout_matches_bcc(compiled):
    # tp_orig_dst is the first member of tp_conn (sk_storage maps expose no Leaf type).
    bcc_orig = dict(compiled[b"tp_conns"].Leaf._fields_)["orig"]
    assert layout(abi.TpOrigDst) == layout(bcc_orig)


def test_every_namespace_table_serves_the_node_limit(compiled):
    assert compiled[b"tp_ns"].max_entries == abi.TP_MAX_NS
    assert compiled[b"tp_counters"].max_entries == abi.TP_MAX_NS
