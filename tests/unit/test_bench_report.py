"""bench/run.py's report: the README's Speed table is rendered from a run's result, between
its markers, and nothing else in the README changes (no root, no measuring)."""
import os

from .bench_modules import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    return load("run")


def _stat(x):
    return {"median": x, "min": x * 0.9, "max": x * 1.1}


def _variant(bench, modes, factor=1.0):
    per_mode = {"none": 1.0, "iptables": 0.5, "ebpf": 0.8 * factor, "ebpf-accel": 0.9 * factor}
    summary = {m: {"conn": {"rps": _stat(10000 * per_mode[m])},
                   "latency": {"rps": _stat(20000 * per_mode[m]),
                               "p50_us": _stat(200 / per_mode[m]),
                               "p99_us": _stat(500 / per_mode[m])},
                   "bulk": {"bytes_per_s": _stat(2e9 * per_mode[m])}} for m in modes}
    paired = {f"{m} {w} {key}": _stat(summary[m][w][key]["median"]
                                      / summary["none"][w][key]["median"])
              for m in modes[1:] for w, key, _l, _u in bench.METRICS}
    return {"label": f"set-up {factor}", "modes": list(modes), "summary": summary,
            "paired_ratios": paired, "goals": bench.goals(paired), "stalls": []}


def _result(bench):
    scale = {f"{m}-{n}": {"rps": _stat(5000.0 if m == "iptables" else 9000.0)}
             for m in ("iptables", "ebpf") for n in (10, 1000, 10000)}
    variants = {"haproxy": _variant(bench, bench.MODES),
                "ipv6": dict(_variant(bench, bench.VARIANT_MODES, 1.25),
                             stalls=[{"rep": 0, "workload": "conn", "mode": "ebpf"}])}
    return {"machine": {"cpu": "Test CPU", "cpus": 2, "kernel": "6.0-test"}, "reps": 5,
            "seconds": 3, "variants": variants, "rule_scaling": scale}


def test_table_has_every_mode_and_its_ratio_to_no_capture():
    bench = _bench()
    lines = bench.summary_lines(_result(bench))
    text = "\n".join(lines)
    assert "Test CPU, 2 cores, kernel 6.0-test" in text
    conn = next(row for row in lines if row.startswith("| new connections/s"))
    cells = [c.strip() for c in conn.strip("|").split("|")]
    # label, (a) (b) (c) (d), then (b)/(a) (c)/(a) (d)/(a), each with its min-max
    assert cells[1].startswith("10000 ") and cells[4].startswith("9000 ")
    assert [c.split()[0] for c in cells[5:]] == ["0.50", "0.80", "0.90"]
    assert "| 10000 | 5000 (4500–5500) | 9000 (8100–9900) |" in lines


def test_goals_table_marks_each_set_up_against_issue_16():
    bench = _bench()
    lines = bench.summary_lines(_result(bench))
    main = next(row for row in lines if row.startswith("| set-up 1.0 |"))
    cells = [c.strip() for c in main.strip("|").split("|")][1:]
    # new connections (c) 0.80 and (d) 0.90 miss 0.95; keep-alive (d) 0.90 misses 1.15
    assert cells[0].startswith("0.80") and cells[0].endswith("✗")
    assert cells[1].startswith("0.90") and cells[1].endswith("✗")
    assert cells[3].endswith("✗")
    v6 = next(row for row in lines if row.startswith("| set-up 1.25 (1 run stalled) |"))
    cells = [c.strip() for c in v6.strip("|").split("|")][1:]
    assert cells[0].startswith("1.00") and cells[0].endswith("✓")   # 0.8 x 1.25


def test_paired_ratios_are_taken_within_each_repetition():
    bench = _bench()
    raw = {"none": {"conn": [{"rps": 100.0}, {"rps": 50.0}]},
           "ebpf": {"conn": [{"rps": 90.0}, {"rps": 45.0}]}}
    # drift between repetitions (100 -> 50) cancels: both pairs are 0.9
    r = bench.paired_ratios({m: dict(w, latency=[], bulk=[]) for m, w in raw.items()},
                            ("none", "ebpf"))
    assert r["ebpf conn rps"] == {"median": 0.9, "min": 0.9, "max": 0.9}


def test_readme_block_is_replaced_and_the_rest_kept(tmp_path):
    bench = _bench()
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.README_BEGIN}\nold table\n{bench.README_END}\noutro\n")
    bench.update_readme(["new", "table"], path=str(readme))
    assert readme.read_text() == (f"intro\n{bench.README_BEGIN}\nnew\ntable\n"
                                  f"{bench.README_END}\noutro\n")


def test_the_project_readme_has_the_markers():
    bench = _bench()
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert text.index(bench.README_BEGIN) < text.index(bench.README_END)
