"""Regenerate README.md's kernel support table from the last `make kernels` results
(tests/kernels/results/<series>.json): which hooks and features each kernel got, and how
its tests went. `make kernels` runs this after the matrix; by hand:

    .venv/bin/python tests/kernels/readme_table.py
"""
import glob
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(os.path.dirname(HERE)), "README.md")
BEGIN, END = "<!-- kernels:begin -->", "<!-- kernels:end -->"
HOST_CHECKS = {"kernel >= 5.7", "cgroup2 mounted", "bpffs", "privileges",
               "bcc (python3-bpfcc)", "kernel headers"}   # not kernel features


def _series_key(r):
    return tuple(int(x) for x in r["series"].split("."))


def table(results):
    results = sorted(results, key=_series_key)
    head = "| | " + " | ".join(f"{r['series']} ({r['kernel']})" for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    features = []
    for r in results:
        features += [f for f in r.get("features", {}) if f not in features and
                     f not in HOST_CHECKS]
    for f in features:
        cells = []
        for r in results:
            v = r.get("features", {}).get(f)   # True, or the probe's error when missing
            cells.append("?" if v is None else "yes" if v is True else "**no**")
        lines.append(f"| {f} | " + " | ".join(cells) + " |")

    def tests(r):
        t = r.get("tests") or {}
        if not t:
            return "not run"
        cell = (f"{t.get('passed', 0)} passed, {t.get('failed', 0) + t.get('errors', 0)} "
                f"failed, {t.get('skipped', 0)} skipped")
        sel = r.get("selection") or r.get("pytest_args") or []
        if "-m" in sel:
            cell += f" (tests marked {sel[sel.index('-m') + 1]})"
        elif sel and sel != ["tests/kernel"]:
            cell += f" (of {', '.join(os.path.basename(s) for s in sel)})"
        if r.get("partial") or r.get("timed_out"):
            cell += ", partial"
        return cell
    lines.append("| tests | " + " | ".join(tests(r) for r in results) + " |")
    lines.append("| wall time | " + " | ".join(f"{r.get('wall_seconds', 0) / 60:.0f} min"
                                             for r in results) + " |")
    lines.append("| run on | " + " | ".join(r.get("date", "?") for r in results) + " |")
    lines.append("| code | " + " | ".join(r.get("code") or "?" for r in results) + " |")
    notes = {}    # text -> the series it applies to: a note shared by several is written once
    for r in results:
        said = [r.get("note")]
        if r.get("code") and r.get("code_at_end") and r["code_at_end"] != r["code"]:
            said.append(f"the work tree changed during the run ({r['code']} at the start, "
                        f"{r['code_at_end']} at the end)")
        for f in r.get("failures") or []:
            msg = " ".join(str(f.get("message", "")).split())[:240]
            said.append(f"failed `{f.get('test')}`: {msg}")
        for text in filter(None, said):
            notes.setdefault(text, []).append(r["series"])
    notes = [f"- {', '.join(series)}: {text}" for text, series in notes.items()]
    return "\n".join(lines + ([""] + notes if notes else []))


def main():
    results = [json.load(open(p)) for p in glob.glob(os.path.join(HERE, "results", "*.json"))]
    text = open(README).read()
    if BEGIN not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    block = f"{BEGIN}\n{table(results)}\n{END}"
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    with open(README, "w") as f:
        f.write(text)
    print(block)


if __name__ == "__main__":
    main()
