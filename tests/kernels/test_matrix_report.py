"""The kernel matrix's reporting (tests/kernels/run.py), without booting anything."""
import json

from tests.kernels import run

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="4">
<testcase classname="tests.kernel.test_a" name="test_ok" time="1.0"/>
<testcase classname="tests.kernel.test_a" name="test_bad" time="1.0">
  <failure message="AssertionError: assert 1 == 2&#10;more">trace</failure></testcase>
<testcase classname="tests.kernel.test_b" name="test_skip" time="0.0">
  <skipped type="pytest.skip" message="needs 5.15">skip</skipped></testcase>
<testcase classname="tests.kernel.test_b" name="test_err" time="0.0">
  <error message="failed on setup with &quot;RuntimeError: no cgroup2&quot;">x</error></testcase>
</testsuite></testsuites>
"""

CONSOLE = """[    1.0] something
tests/kernel/test_a.py::test_ok PASSED [ 50%]
tests/kernel/test_a.py::test_bad[ipv4] FAILED [100%]
tests/kernel/test_b.py::test_skip SKIPPED (needs 5.15) [100%]
"""


def test_junit_counts(tmp_path):
    p = tmp_path / "junit.xml"
    p.write_text(JUNIT)
    counts, failures, skips = run.junit_counts(str(p))
    assert counts == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert failures[0] == {"test": "tests.kernel.test_a::test_bad", "kind": "failure",
                           "message": "AssertionError: assert 1 == 2"}
    assert failures[1]["kind"] == "error" and "no cgroup2" in failures[1]["message"]
    assert skips == [{"test": "tests.kernel.test_b::test_skip", "message": "needs 5.15"}]
    assert run.junit_counts(str(tmp_path / "none.xml"))[0] is None


def test_console_counts_after_a_timeout(tmp_path):
    p = tmp_path / "console.log"
    p.write_text(CONSOLE)
    counts, failures, _ = run.console_counts(str(p))
    assert counts == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1}
    assert failures[0]["test"] == "tests/kernel/test_a.py::test_bad[ipv4]"


def result(series, ok=True, features=None):
    return {"series": series, "kernel": f"{series}.0-1-amd64", "ok": ok, "timed_out": False,
            "wall_seconds": 100.0, "boot_seconds": 20.0, "check_seconds": 9.0,
            "pytest_seconds": 70.0,
            "tests": {"passed": 3, "failed": 0 if ok else 1, "errors": 0, "skipped": 1},
            "features": features or {"cgroup/connect4": True},
            "failures": [] if ok else [{"test": "t::x", "kind": "failure", "message": "boom"}]}


def test_summary_keeps_other_series_and_orders_them(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "RESULTS", str(tmp_path))
    (tmp_path / "6.12.json").write_text(json.dumps(result("6.12")))
    run.write_summary([result("5.10", ok=False, features={"cgroup/connect4": True,
                                                          "SO_NETNS_COOKIE": "not supported"}),
                       result("6.1")])
    md = (tmp_path / "summary.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 5.") or
            line.startswith("| 6.")]
    assert [r.split("|")[1].strip() for r in rows] == ["5.10", "6.1", "6.12"]
    assert "| 5.10 | 5.10.0-1-amd64 | 3 | 1 | 1 |" in md and "FAIL" in md
    assert "| SO_NETNS_COOKIE | no | — | — |" in md
    assert "- `t::x` (failure): boom" in md


def test_text_table_aligns():
    out = run.text_table([["a", "bb"], ["ccc", "d"]]).splitlines()
    assert out == ["a    bb", "ccc  d "]


def test_progress_counts_when_the_guest_was_stopped(tmp_path):
    lines = [{"test": "a::ok", "when": "call", "outcome": "passed", "message": ""},
             {"test": "a::bad", "when": "call", "outcome": "failed",
              "message": "AssertionError: boom\nassert 1 == 2"},
             {"test": "a::bad", "when": "teardown", "outcome": "error", "message": "x"},
             {"test": "b::skip", "when": "setup", "outcome": "skipped",
              "message": "Skipped: needs 5.15"}]
    p = tmp_path / "progress.jsonl"
    p.write_text("".join(json.dumps(e) + "\n" for e in lines))
    counts, failures, skips = run.progress_counts(str(p))
    assert counts == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1}
    assert failures == [{"test": "a::bad", "kind": "failure", "message": "AssertionError: boom"}]
    assert skips[0]["message"] == "Skipped: needs 5.15"


def test_parallelism_defaults_to_one_guest_per_kernel_within_memory(monkeypatch):
    monkeypatch.setattr(run.os, "cpu_count", lambda: 2)
    pages = {"SC_PAGE_SIZE": 4096, "SC_AVPHYS_PAGES": (8 << 30) // 4096}   # 8 GiB free
    monkeypatch.setattr(run.os, "sysconf", lambda name: pages[name])
    assert run.parallelism(3, 0, 0, "3G") == (2, 1)     # 8 GiB - 1 GiB spare: two 3G guests
    assert run.parallelism(3, 0, 0, "2G") == (3, 1)
    assert run.parallelism(1, 0, 0, "3G") == (1, 2)     # make kernels-ci: one guest, 2 vCPUs
    assert run.parallelism(3, 1, 0, "3G") == (1, 2)     # given: kept
    assert run.parallelism(3, 3, 2, "3G") == (3, 2)


def test_code_version_names_the_commit_and_a_changed_tree(tmp_path, monkeypatch):
    import subprocess
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "f").write_text("1")
    subprocess.run(git + ["add", "f"], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)

    def head():
        return subprocess.run(git + ["rev-parse", "--short=7", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(run, "PROJECT", str(tmp_path))
    assert run.code_version() == head()
    # The run's own output (a first kernel's results while others still run) is no change.
    results = tmp_path / "tests" / "kernels" / "results"
    results.mkdir(parents=True)
    (results / "6.1.json").write_text("{}")
    (tmp_path / "README.md").write_text("table")
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "results"], check=True)
    (results / "6.1.json").write_text('{"series": "6.1"}')
    (tmp_path / "README.md").write_text("new table")
    assert run.code_version() == head()
    (tmp_path / "f").write_text("2")       # what a guest would read over 9p mid-run
    assert run.code_version() == head() + "-dirty"
    monkeypatch.setattr(run, "PROJECT", str(tmp_path / "not-a-checkout"))
    assert run.code_version() is None


def test_readme_table_shows_the_code_and_a_tree_changed_mid_run():
    from tests.kernels import readme_table
    same, changed = result("6.1"), result("5.10")
    same.update(code="abc1234", code_at_end="abc1234", date="2026-11-22")
    changed.update(code="abc1234", code_at_end="def5678-dirty", date="2026-11-22")
    md = readme_table.table([same, changed])
    assert "| code | abc1234 | abc1234 |" in md
    assert md.count("the work tree changed during the run") == 1
    assert "- 5.10: the work tree changed during the run (abc1234 at the start, " \
        "def5678-dirty at the end)" in md


def test_readme_table_writes_a_note_shared_by_kernels_once():
    from tests.kernels import readme_table
    rs = [result(s) for s in ("6.12", "5.10", "6.1")]
    for r in rs:
        r.update(note="three guests side by side", date="2026-11-22")
    rs[0].update(ok=False, failures=[{"test": "t::x", "kind": "failure", "message": "boom"}])
    md = readme_table.table(rs)
    assert "- 5.10, 6.1, 6.12: three guests side by side" in md
    assert md.count("three guests side by side") == 1
    assert "- 6.12: failed `t::x`: boom" in md
