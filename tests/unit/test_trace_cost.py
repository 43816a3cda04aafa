"""bench/trace_cost.py's summary: each state's rate paired with no trace code's in the same
repetition, and the goal judged as the table shows it (no root needed)."""
from .bench_modules import load


def run(rps, lost=0):
    return {"rps": rps, "requests": int(rps), "events": int(2 * rps), "lost": lost}


def test_ratios_pair_repetitions_and_judge_the_goal_as_shown():
    t = load("trace_cost")
    raw = {"no-code": [run(1000), run(2000)], "off": [run(994), run(1980)],
           "on": [run(900), run(1700, lost=3)]}
    s = t.summarize(raw)
    assert s["off"]["ratio"]["min"] == 0.99 and s["off"]["ratio"]["max"] == 0.994
    assert s["off"]["goal"] == [0.99, True]
    assert s["on"]["ratio"]["median"] == (0.9 + 0.85) / 2
    assert s["on"]["lost"]["max"] == 3
    lines = t.summary_lines({"machine": {"cpu": "x", "cpus": 2, "kernel": "k"}, "reps": 2,
                             "seconds": 1, "summary": s})
    assert "| off | 1487 (994–1980) | 0.992 (0.990–0.994) |  |  |" in lines
    assert lines[-1].startswith("Goal: off ≥ 0.99 of no-code: met")


def test_program_times_are_summarized_when_measured():
    t = load("trace_cost")
    ns = {"connect4": 500.0, "getsockopt_orig_dst": 100.0}
    raw = {k: [dict(run(1000), ns_per_run=ns)] for k in ("no-code", "off", "on")}
    s = t.summarize(raw)
    assert s["off"]["ns_per_run"]["connect4"]["median"] == 500.0
    lines = t.summary_lines({"machine": {"cpu": "x", "cpus": 2, "kernel": "k"}, "reps": 1,
                             "seconds": 1, "summary": s})
    row = "| off | 1000 (1000–1000) | 1.000 (1.000–1.000) | 500 (500–500) | 100 (100–100) |"
    assert row in lines


def test_a_miss_is_said():
    t = load("trace_cost")
    raw = {"no-code": [run(1000)], "off": [run(980)], "on": [run(900)]}
    assert t.summarize(raw)["off"]["goal"] == [0.98, False]
