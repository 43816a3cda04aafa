"""bench/run.py's report: the README's Speed table is rendered from a run's result, between
its markers, and nothing else in the README changes (no root, no measuring)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "bench", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stat(x):
    return {"median": x, "min": x * 0.9, "max": x * 1.1}


def _result(bench):
    per_mode = {"none": 1.0, "iptables": 0.5, "ebpf": 0.8, "ebpf-accel": 0.9}
    summary = {m: {"conn": {"rps": _stat(10000 * f)},
                   "latency": {"p50_us": _stat(200 / f), "p99_us": _stat(500 / f)},
                   "bulk": {"bytes_per_s": _stat(2e9 * f)}} for m, f in per_mode.items()}
    ratios = {}
    for m in bench.MODES[1:]:
        for w, key in (("conn", "rps"), ("latency", "p50_us"), ("latency", "p99_us"),
                       ("bulk", "bytes_per_s")):
            ratios[f"{m} {w} {key}"] = summary[m][w][key]["median"] / summary["none"][w][key]["median"]
    scale = {f"{m}-{n}": {"rps": _stat(5000.0 if m == "iptables" else 9000.0)}
             for m in ("iptables", "ebpf") for n in (10, 1000, 10000)}
    return {"machine": {"cpu": "Test CPU", "cpus": 2, "kernel": "6.0-test"}, "reps": 5,
            "seconds": 3, "summary": summary, "rule_scaling": scale, "ratios_to_none": ratios}


def test_table_has_every_mode_and_its_ratio_to_no_capture():
    bench = _bench()
    lines = bench.summary_lines(_result(bench))
    text = "\n".join(lines)
    assert "Test CPU, 2 cores, kernel 6.0-test" in text
    conn = next(row for row in lines if row.startswith("| new connections/s"))
    cells = [c.strip() for c in conn.strip("|").split("|")]
    # label, (a) (b) (c) (d), then (b)/(a) (c)/(a) (d)/(a)
    assert cells[1].startswith("10000 ") and cells[4].startswith("9000 ")
    assert cells[5:] == ["0.50", "0.80", "0.90"]
    assert "| 10000 | 5000 (4500–5500) | 9000 (8100–9900) |" in lines


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
