"""`ebpf-tproxy trace` without a kernel: what its options mean to the in-kernel filter, and
how an event reads (no root needed)."""
import json

import pytest
from click.testing import CliRunner

from loader import abi, trace
from loader.cli import main
from loader.config import ConfigError


@pytest.mark.parametrize("value,want", [
    ("10.0.0.0/8", ("10.0.0.0/8", None)),
    ("10.0.0.5:80", ("10.0.0.5/32", 80)),
    ("10.0.0.0/8:80", ("10.0.0.0/8", 80)),
    (":53", (None, 53)),
    ("fd00::1", ("fd00::1/128", None)),
    ("fd00::/64", ("fd00::/64", None)),
    ("[fd00::/64]:443", ("fd00::/64", 443)),
    ("[::1]", ("::1/128", None)),
])
def test_dst_forms(value, want):
    assert trace.parse_dst(value) == want


@pytest.mark.parametrize("value,says", [
    ("10.0.0.0/33", "not an address or CIDR"),
    ("10.0.0.1:0", "not 1-65535"),
    ("10.0.0.1:70000", "not 1-65535"),
    ("10.0.0.1:٨٠", "not 1-65535"),   # ASCII digits only, as every number this tool reads
    ("[fd00::1:443", r"not \[ADDRESS\]:PORT"),
    ("host.example:80", "not an address or CIDR"),
])
def test_bad_dst_is_refused_with_the_cause(value, says):
    with pytest.raises(ConfigError, match=says):
        trace.parse_dst(value)


def test_reasons_are_the_counter_names():
    assert trace.parse_reasons("redirected_outbound, orig_dst_missed") == (
        "redirected_outbound", "orig_dst_missed")
    with pytest.raises(ConfigError, match="unknown reason 'unused_0'"):
        trace.parse_reasons("unused_0")
    with pytest.raises(ConfigError, match="at least one"):
        trace.parse_reasons(",")


def test_every_reason_fits_the_filter_mask():
    assert abi.TP_R_COUNT <= 64   # tp_trace_filter.reasons is one 64-bit mask


def test_filter_struct_says_which_fields_apply():
    f = trace.Filter().struct()
    assert f.flags == abi.TP_TF_ACTIVE   # a trace reads, and leaves nothing out
    f = trace.Filter(pid=7, uid=0, reasons=("excluded_port",), dst="10.1.0.0/16",
                     port=80).struct()
    assert f.flags == (abi.TP_TF_ACTIVE | abi.TP_TF_PID | abi.TP_TF_UID | abi.TP_TF_REASONS
                       | abi.TP_TF_DST | abi.TP_TF_PORT)
    assert (f.pid, f.uid, f.port) == (7, 0, 80)
    assert f.reasons == 1 << abi.REASON_INDEX["excluded_port"]
    # IPv4 is compared as the BPF side stores it: mapped, so 96 bits more of prefix.
    assert f.dst_prefix == 96 + 16 and bytes(f.dst) == bytes(abi.addr16("10.1.0.0"))
    assert trace.Filter(dst="fd00::/64").struct().dst_prefix == 64


def event(**kw):
    ev = abi.TpEvent(ts_ns=2_500_000_000, netns_cookie=4097, pid=42, uid=0, comm=b"curl",
                     port=80, hook=abi.TP_HOOK_CONNECT4, proto=6,
                     reason=abi.REASON_INDEX["redirected_outbound"], target_port=15001)
    ev.addr = abi.addr16("198.18.0.2")
    ev.peer = abi.addr16("0.0.0.0")
    for k, v in kw.items():
        setattr(ev, k, v)
    return ev


def test_an_outbound_event_reads_as_the_application_saw_it():
    d = trace.describe(event(), {4097: "default"}, 500_000_000)
    assert d == {"time": 2.0, "pid": 42, "comm": "curl", "uid": 0, "namespace": "default",
                 "netns_cookie": 4097, "hook": "connect4", "protocol": "tcp",
                 "address": "198.18.0.2:80", "peer": None, "reason": "redirected_outbound",
                 "sent_to": "127.0.0.1:15001"}
    json.dumps(d)
    line = trace.text_line(d)
    assert line.split() == ["2.000", "42", "curl", "0", "default", "connect4", "tcp",
                            "198.18.0.2:80", "-", "redirected_outbound", "127.0.0.1:15001"]


def test_an_inbound_event_has_a_client_and_no_process():
    ev = event(hook=abi.TP_HOOK_SK_LOOKUP, pid=0, uid=0, comm=b"", port=8080,
               reason=abi.REASON_INDEX["redirected_inbound"], target_port=15006,
               peer_port=40000)
    ev.addr = abi.addr16("fd00::1")
    ev.peer = abi.addr16("fd00::2")
    d = trace.describe(ev, {}, 0)
    assert (d["pid"], d["comm"], d["uid"], d["namespace"]) == (None, None, None, "4097")
    assert (d["address"], d["peer"], d["sent_to"]) == ("[fd00::1]:8080", "[fd00::2]:40000",
                                                       "listener :15006")


def test_a_missed_answer_has_no_address():
    ev = event(hook=abi.TP_HOOK_GETSOCKOPT, reason=abi.REASON_INDEX["orig_dst_missed"],
               port=0, target_port=15001, peer_port=5555)
    ev.addr = (abi.TpEvent.addr.size * __import__("ctypes").c_uint8)()
    ev.peer = abi.addr16("127.0.0.1")
    d = trace.describe(ev, {4097: "default"}, 0)
    assert (d["address"], d["peer"], d["sent_to"]) == (None, "127.0.0.1:5555", "proxy :15001")


def test_a_direct_decision_was_sent_nowhere():
    d = trace.describe(event(target_port=0, reason=abi.REASON_INDEX["excluded_port"]), {}, 0)
    assert d["sent_to"] is None and d["reason"] == "excluded_port"


@pytest.mark.parametrize("args,says", [
    (["--pid", "abc"], "--pid: 'abc' is not a process id"),
    (["--pid", "0"], "--pid: '0' is not a process id"),
    (["--pid", "١٢"], "--pid: '١٢' is not a process id"),
    (["--count", "0"], "--count"),
    (["--duration", "0"], "--duration"),
    (["--dst", "300.0.0.1"], "--dst: '300.0.0.1' is not an address or CIDR"),
    (["--reason", "redirected"], "--reason: unknown reason 'redirected'"),
])
def test_bad_options_are_one_line_before_anything_is_touched(args, says):
    r = CliRunner().invoke(main, ["trace", *args])
    assert r.exit_code == 2, r.output
    assert says in r.output, r.output


def test_help_shows_real_output_and_the_filters():
    r = CliRunner().invoke(main, ["trace", "--help"])
    assert r.exit_code == 0
    for word in ("Example:", "TIME(s)", "redirected_outbound", "--dst", "--pid", "--uid",
                 "--reason", "--count", "--duration", "--output"):
        assert word in r.output, word
