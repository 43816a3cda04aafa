"""bench/udp_cost.py's summary: rates paired with no capture's in the same repetition, and
our programs' runs and nanoseconds per datagram from the counted totals (no root)."""
from .bench_modules import load


def _udp_cost():
    return load("udp_cost")


def _run(rate, sends=0, send_ns=0, recvs=0, recv_ns=0):
    return {"rate": rate, "datagrams": 1000,
            "programs": {"sendmsg4": {"runs": sends, "run_time_ns": send_ns},
                         "recvmsg4": {"runs": recvs, "run_time_ns": recv_ns}}}


def test_ratios_are_paired_by_repetition_and_run_times_come_from_the_totals():
    u = _udp_cost()
    raw = {m: {ld: [] for ld in u.LOADS} for m in u.MODES}
    for base, ours in ((100.0, 90.0), (200.0, 190.0), (50.0, 50.0)):
        for ld in u.LOADS:
            raw["none"][ld].append(_run(base))
            for m in u.MODES[1:]:
                raw[m][ld].append(_run(ours, 1000, 50_000, 1000 if ld == "echo" else 0,
                                       120_000 if ld == "echo" else 0))
    s = u.summarize(raw)
    r = s["send"]["ebpf"]["ratio"]
    assert (r["min"], r["median"], r["max"]) == (0.9, 0.95, 1.0)
    assert s["echo"]["ebpf-dns"]["sendmsg4"]["ns_per_run"]["median"] == 50
    assert s["echo"]["ebpf-dns"]["recvmsg4"]["ns_per_run"]["median"] == 120
    assert s["send"]["ebpf"]["recvmsg4"]["runs_per"]["median"] == 0
    lines = u.summary_lines({"machine": {"cpu": "x", "cpus": 2, "kernel": "k"}, "reps": 3,
                             "seconds": 3, "summary": s})
    send_ebpf = next(x for x in lines if x.startswith("| send | ebpf |"))
    assert "0.95 (0.90–1.00)" in send_ebpf and "1.0, 50 (50–50)" in send_ebpf
