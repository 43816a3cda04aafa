#!/usr/bin/env python3
"""make kernels: the kernel tests (tests/kernel) under Debian's own kernels, each booted
under qemu (software emulation, TCG) with this host's root filesystem by virtme-ng.

    .venv/bin/python tests/kernels/run.py [--kernels 5.10,6.1,6.12] [--tests PATHS]
                                          [--timeout MIN] [--jobs N] [--cpus N]
                                          [-- PYTEST ARGS]

For each series (5.10: bullseye, 6.1: bookworm, 6.12: bookworm-backports):
  1. the newest linux-image-*-amd64 of that suite and its two header packages are fetched
     with `apt-get download` through a private apt configuration (its own sources list,
     lists and status file under the cache: the host's apt is not touched) and extracted
     with dpkg-deb into the cache (never installed);
  2. virtme-ng boots the image under qemu with a copy-on-write view of the host's root
     filesystem; the package's modules are seen as /lib/modules/<version> inside the
     guest only, with build/source pointing at the extracted headers (what BCC compiles
     against);
  3. tests/kernels/guest.py runs in the guest: mounts what is missing (cgroup2, bpffs),
     runs `loader.cli check --output json` and pytest with --junitxml into a directory
     shared with the host;
  4. the host writes tests/kernels/results/<series>.json and summary.md and prints a table.

Exits 1 if any kernel had a failure, an error, or did not boot/finish.

Cache: $EBPF_TPROXY_KERNEL_CACHE or /var/cache/ebpf-tproxy-kernels (virtme-ng's venv,
apt lists, .deb files, extracted kernels). Nothing is written under the host's
/lib/modules, /boot or /etc/apt. Missing host packages (qemu-system-x86, busybox-static,
kmod, file, udev) are installed with apt-get, which needs root; so does the whole run.
See tests/kernels/README.md.
"""
import argparse
import datetime
import glob
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "results")
CACHE = os.environ.get("EBPF_TPROXY_KERNEL_CACHE", "/var/cache/ebpf-tproxy-kernels")
VNG_VERSION = "1.42"
# udev: virtme-ng-init runs it in the guest to name the virtio-serial ports that carry the
# command's output and exit code (without it: console fallback, exit code lost).
HOST_PKGS = ("qemu-system-x86", "busybox-static", "kmod", "file", "udev")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# series -> suites, as (archive, suite): "main" is the host's Debian archive, "security"
# its security archive (both read from the host's own apt configuration).
SERIES = {
    "5.10": (("main", "bullseye"), ("security", "bullseye-security")),
    "6.1": (("main", "bookworm"), ("main", "bookworm-updates"), ("security", "bookworm-security")),
    "6.12": (("main", "bookworm-backports"),),
}
DEFAULT_KERNELS = "5.10,6.1,6.12"
LIST_MAX_AGE = 24 * 3600        # refresh a series' apt lists once a day
STOP = threading.Event()        # SIGTERM/SIGINT: stop the guest, report what finished


def say(msg):
    print(f"kernels: {msg}", flush=True)


def run(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


# ------------------------------------------------------------------------ host deps
def ensure_host_deps():
    missing = []
    for p in HOST_PKGS:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                           text=True)
        if "install ok installed" not in r.stdout:
            missing.append(p)
    if missing:
        say(f"installing {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            env=env, stdout=subprocess.DEVNULL)
    venv = os.path.join(CACHE, "vng-venv")
    vng = os.path.join(venv, "bin", "vng")
    if os.path.exists(vng):
        r = subprocess.run([vng, "--version"], capture_output=True, text=True)
        if VNG_VERSION in r.stdout + r.stderr:
            return vng
    say(f"installing virtme-ng {VNG_VERSION} into {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    run(["/usr/bin/python3", "-m", "venv", venv])
    run([os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check",
         f"virtme-ng=={VNG_VERSION}"])
    return vng


# ------------------------------------------------------------------------ private apt
def host_archives():
    """The host's Debian archive and security archive URIs, from its apt configuration."""
    out = subprocess.run(["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE)"],
                         capture_output=True, text=True).stdout
    main = security = None
    for line in sorted(set(out.splitlines())):
        parts = line.split()
        if len(parts) != 2:
            continue
        uri, release = parts
        if release.endswith("-security"):
            security = security or uri
        elif "-" not in release and "debian" in uri:
            main = main or uri
    main = os.environ.get("EBPF_TPROXY_DEBIAN_ARCHIVE", main)
    security = os.environ.get("EBPF_TPROXY_DEBIAN_SECURITY", security)
    if not main or not security:
        raise SystemExit("kernels: cannot find the Debian archive in the host's apt "
                         "configuration; set EBPF_TPROXY_DEBIAN_ARCHIVE and "
                         "EBPF_TPROXY_DEBIAN_SECURITY to its URIs")
    return {"main": main, "security": security}


class PrivateApt:
    """apt-get/apt-cache with their own sources, lists, cache and (empty) status."""

    def __init__(self, series, archives):
        self.dir = os.path.join(CACHE, "apt", series)
        self.lists = os.path.join(self.dir, "lists")
        for d in (os.path.join(self.lists, "partial"), os.path.join(self.dir, "parts"),
                  os.path.join(self.dir, "prefs"),
                  os.path.join(self.dir, "cache", "archives", "partial")):
            os.makedirs(d, exist_ok=True)
        status = os.path.join(self.dir, "status")
        if not os.path.exists(status):
            open(status, "w").close()
        self.sources = os.path.join(self.dir, "sources.list")
        text = "".join(f"deb [signed-by={KEYRING}] {archives[a]} {suite} main\n"
                       for a, suite in SERIES[series])
        old = open(self.sources).read() if os.path.exists(self.sources) else None
        if old != text:
            with open(self.sources, "w") as f:
                f.write(text)
            shutil.rmtree(self.lists, ignore_errors=True)
            os.makedirs(os.path.join(self.lists, "partial"))
        self.opts = [
            "-o", f"Dir::Etc::SourceList={self.sources}",
            "-o", f"Dir::Etc::SourceParts={os.path.join(self.dir, 'parts')}",
            "-o", f"Dir::Etc::Preferences={os.path.join(self.dir, 'preferences')}",
            "-o", f"Dir::Etc::PreferencesParts={os.path.join(self.dir, 'prefs')}",
            "-o", f"Dir::State::Lists={self.lists}",
            "-o", f"Dir::State::Status={status}",
            "-o", f"Dir::Cache={os.path.join(self.dir, 'cache')}",
            "-o", "APT::Sandbox::User=root",
            "-o", "Debug::NoLocking=1",
        ]

    def update(self):
        stamp = os.path.join(self.dir, "updated")
        if os.path.exists(stamp) and time.time() - os.path.getmtime(stamp) < LIST_MAX_AGE:
            return True
        r = subprocess.run(["apt-get", *self.opts, "-qq", "update"], capture_output=True,
                           text=True)
        if r.returncode != 0:
            say(f"apt-get update failed ({r.stderr.strip().splitlines()[-1:]}); "
                "using the lists and packages already cached")
            return False
        open(stamp, "w").close()
        return True

    def show(self, pkg):
        r = subprocess.run(["apt-cache", *self.opts, "show", pkg], capture_output=True,
                           text=True)
        return r.stdout if r.returncode == 0 else ""

    def candidate(self, pkg):
        r = subprocess.run(["apt-cache", *self.opts, "policy", pkg], capture_output=True,
                           text=True)
        m = re.search(r"Candidate:\s*(\S+)", r.stdout)
        return m.group(1) if m and m.group(1) != "(none)" else None

    def depends(self, pkg, pattern):
        stanza = self.show(pkg).split("\n\n")[0]
        m = re.search(r"^Depends:(.*)$", stanza, re.M)
        deps = [d.strip().split()[0] for d in m.group(1).split(",")] if m else []
        return [d for d in deps if re.fullmatch(pattern, d)]

    def download(self, pkgs, dest):
        os.makedirs(dest, exist_ok=True)
        need = [p for p in pkgs if not glob.glob(os.path.join(dest, f"{p}_*.deb"))]
        if need:
            say(f"apt-get download {' '.join(need)}")
            run(["apt-get", *self.opts, "-qq", "download", *need], cwd=dest,
                stdout=subprocess.DEVNULL)
        return [glob.glob(os.path.join(dest, f"{p}_*.deb"))[0] for p in pkgs]


# ------------------------------------------------------------------------ kernels
class Kernel:
    def __init__(self, series, kver, root):
        self.series, self.kver, self.root = series, kver, root
        self.vmlinuz = os.path.join(root, "boot", f"vmlinuz-{kver}")


def resolve(series, archives):
    """The newest kernel of a series: (kernel version, [packages])."""
    apt = PrivateApt(series, archives)
    fresh = apt.update()
    try:
        cand = apt.candidate("linux-image-amd64")
        images = apt.depends(f"linux-image-amd64={cand}", r"linux-image-\S+") if cand else []
        if not images:
            raise RuntimeError("no linux-image-amd64 in the lists")
        kver = images[0][len("linux-image-"):]
        common = apt.depends(f"linux-headers-{kver}", r"linux-headers-\S+-common")
        if not common:
            raise RuntimeError(f"linux-headers-{kver}: no -common dependency")
        pkgs = [f"linux-image-{kver}", f"linux-headers-{kver}", common[0]]
        return apt, kver, pkgs
    except RuntimeError as e:
        # Offline: the newest kernel of the series already extracted.
        done = sorted(glob.glob(os.path.join(CACHE, "kernels", f"{series}.*", ".ready")))
        if fresh or not done:
            raise SystemExit(f"kernels: {series}: {e}")
        kver = os.path.basename(os.path.dirname(done[-1]))
        return None, kver, []


def prepare(series, archives):
    """Fetch and extract a series' newest kernel and headers (cached); a Kernel."""
    apt, kver, pkgs = resolve(series, archives)
    root = os.path.join(CACHE, "kernels", kver)
    ready = os.path.join(root, ".ready")
    if os.path.exists(ready):
        return Kernel(series, kver, root)
    debs = apt.download(pkgs, os.path.join(CACHE, "debs"))
    say(f"{series}: extracting {kver}")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    for deb in debs:
        run(["dpkg-deb", "-x", deb, root])
    moddir = next((d for d in (os.path.join(root, "lib", "modules", kver),
                               os.path.join(root, "usr", "lib", "modules", kver))
                   if os.path.isdir(d)), None)
    if moddir is None:
        raise SystemExit(f"kernels: {kver}: no modules directory in the package")
    if not os.path.exists(os.path.join(root, "boot", f"vmlinuz-{kver}")):
        raise SystemExit(f"kernels: {kver}: no /boot/vmlinuz-{kver} in the package")
    # BCC compiles against /lib/modules/<ver>/{build,source}: point them at the extracted
    # headers by their host path, which the guest sees too (the host's root is its root).
    src = os.path.join(root, "usr", "src")
    arch = os.path.join(src, f"linux-headers-{kver}")
    common = [d for d in glob.glob(os.path.join(src, "linux-headers-*-common"))]
    if not os.path.isdir(arch) or len(common) != 1:
        raise SystemExit(f"kernels: {kver}: unexpected header layout under {src}")
    for name, target in (("build", arch), ("source", common[0])):
        link = os.path.join(moddir, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(target, link)
    run(["depmod", "-a", "-b", os.path.dirname(os.path.dirname(os.path.dirname(moddir))),
         kver], stderr=subprocess.DEVNULL)
    open(ready, "w").close()
    return Kernel(series, kver, root)


# ------------------------------------------------------------------------ boot + run
def fast_exports(k):
    """Extra read-only 9p exports that guest.py mounts with cache=loose over the guest's
    uncached view of the same host directories: the root virtme-ng exports has no cache,
    which makes every Python import and BCC's header reads round trips to the host."""
    return [("tpusr", "/usr"), ("tpproj", PROJECT), ("tpkern", os.path.join(CACHE, "kernels"))]


def boot(vng, k, outdir, pytest_args, timeout, memory, cpus, test_timeout, fast=True):
    """Run guest.py under kernel k; returns (exit code or None on timeout, boot seconds)."""
    shutil.rmtree(outdir, ignore_errors=True)
    os.makedirs(outdir)
    exports = fast_exports(k) if fast else []
    guest = [os.path.join(PROJECT, ".venv", "bin", "python"), os.path.join(HERE, "guest.py"),
             "--out", outdir]
    guest += [f"--fast-mount={tag}:{path}" for tag, path in exports]
    # virtme-ng hands the command to the guest on the kernel command line (2,048 bytes on
    # x86, base64 inside; a longer one is cut and the guest hangs at boot), so the pytest
    # arguments, which can list many node ids, go in a file of the shared output directory.
    args_file = os.path.join(outdir, "pytest-args.json")
    with open(args_file, "w") as f:
        json.dump(list(pytest_args), f)
    guest += [f"--test-timeout={test_timeout}", f"--args-file={args_file}"]
    qemu = []
    for i, (tag, path) in enumerate(exports):
        qemu += ["-fsdev", f"local,id=tpfs{i},path={path},security_model=none,readonly=on,"
                 "multidevs=remap", "-device", f"virtio-9p-pci,fsdev=tpfs{i},mount_tag={tag}"]
    cmd = [vng, "--run", k.vmlinuz, "--disable-kvm", "--cpus", str(cpus),
           "--memory", memory, "--cwd", PROJECT,
           # The guest mounts a tmpfs over /var/cache: share the extracted kernels (the
           # /lib/modules symlink and build/source point there) and the output directory.
           "--rodir", os.path.join(CACHE, "kernels"), "--rwdir", outdir,
           "--exec", " ".join(_quote(a) for a in guest)]
    if qemu:
        cmd.append("--qemu-opts=" + " ".join(qemu))
    with open(os.path.join(outdir, "vng-cmd.txt"), "w") as f:
        f.write(" ".join(_quote(a) for a in cmd) + "\n")
    start = time.monotonic()
    first_guest_line = [None]
    log = open(os.path.join(outdir, "console.log"), "w")
    # virtme-run's temporary files (the exit-status channel) in a directory of our own,
    # removed below also when the guest had to be killed. Under /tmp: the guest sees it.
    tmp = tempfile.mkdtemp(prefix=f"ebpf-tproxy-kernels-{k.series}-")
    env = dict(os.environ, PATH=os.path.dirname(vng) + os.pathsep + os.environ["PATH"],
               TMPDIR=tmp)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=PROJECT,
                         text=True, errors="replace", bufsize=1)
    timed_out, done = threading.Event(), threading.Event()

    def watchdog():
        deadline = time.monotonic() + timeout
        while not done.wait(1):
            if STOP.is_set() or time.monotonic() > deadline:
                timed_out.set()
                why = "asked to stop" if STOP.is_set() else f"timeout after {timeout:.0f} s"
                say(f"{k.series}: {why}: stopping the guest")
                _stop(p)
                return

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        for line in p.stdout:
            log.write(line)
            log.flush()
            if first_guest_line[0] is None and line.startswith("guest:"):
                first_guest_line[0] = time.monotonic() - start
            print(f"[{k.series}] {line}", end="", flush=True)
        rc = p.wait()
    finally:
        done.set()
        _stop(p)      # vng, virtme-run, qemu: nothing of the run survives it
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return (None if timed_out.is_set() else rc), first_guest_line[0]


def _stop(p):
    """End the process group that p leads (vng and its qemu): TERM, then KILL."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 0)):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                return
            p.poll()
            time.sleep(0.2)


def _quote(s):
    return s if re.fullmatch(r"[\w@%+=:,./-]+", s) else "'" + s.replace("'", "'\\''") + "'"


# ------------------------------------------------------------------------ results
def junit_counts(path):
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips = [], []
    if not os.path.exists(path):
        return None, failures, skips
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {c.tag: c for c in case}
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            el = kinds[tag]
            # An error in teardown of a failed test is the same test: count it once.
            counts["failed" if tag == "failure" else "errors"] += 1
            msg = (el.get("message") or el.text or "").strip().splitlines()
            failures.append({"test": name, "kind": tag, "message": msg[0][:300] if msg else ""})
        elif "skipped" in kinds:
            counts["skipped"] += 1
            skips.append({"test": name, "message": (kinds["skipped"].get("message") or "")[:200]})
        else:
            counts["passed"] += 1
    return counts, failures, skips


def progress_counts(path):
    try:
        with open(path) as f:
            entries = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None, [], []
    if not entries:
        return None, [], []
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    key = {"passed": "passed", "failed": "failed", "error": "errors", "skipped": "skipped"}
    failures, skips = [], []
    for e in entries:
        if e["outcome"] == "error" and e["when"] == "teardown" and any(
                f["test"] == e["test"] for f in failures):
            continue    # a failed test's teardown error: the same test
        counts[key[e["outcome"]]] += 1
        first = (e.get("message") or "").strip().splitlines()
        if e["outcome"] in ("failed", "error"):
            failures.append({"test": e["test"], "kind": "failure" if e["outcome"] == "failed"
                             else "error", "message": first[0][:300] if first else ""})
        elif e["outcome"] == "skipped":
            skips.append({"test": e["test"], "message": first[0][:200] if first else ""})
    return counts, failures, skips


def console_counts(path):
    seen = {}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = re.match(r"(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", line)
                if m:
                    seen[m.group(1)] = m.group(2)
    except OSError:
        return None, [], []
    if not seen:
        return None, [], []
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors",
           "SKIPPED": "skipped", "XFAIL": "skipped"}
    failures = []
    for test, outcome in seen.items():
        counts[key[outcome]] += 1
        if outcome in ("FAILED", "ERROR"):
            failures.append({"test": test, "kind": outcome.lower(),
                             "message": "(from the console: no junit file)"})
    return counts, failures, []


def collect(k, outdir, rc, boot_s, wall_s):
    res = {"series": k.series, "kernel": k.kver, "date": datetime.date.today().isoformat(),
           "host": platform.release(), "wall_seconds": round(wall_s, 1),
           "boot_seconds": round(boot_s, 1) if boot_s is not None else None,
           "exit": rc, "timed_out": rc is None}
    guest = _load(os.path.join(outdir, "guest.json")) or {}
    res["guest_kernel"] = guest.get("uname")
    res["check_seconds"] = guest.get("check_seconds")
    res["pytest_seconds"] = guest.get("pytest_seconds")
    res["pytest_exit"] = guest.get("pytest_exit")
    res["pytest_args"] = guest.get("pytest_args")
    check = _load(os.path.join(outdir, "check.json"))
    if check:
        res["check_ok"] = check.get("ok")
        res["features"] = {c["name"]: (True if c["ok"] else c["detail"])
                           for c in check.get("checks", [])}
    counts, failures, skips = junit_counts(os.path.join(outdir, "junit.xml"))
    if counts is None:
        # No junit file (timeout, crash): what progress.py wrote test by test, else what
        # pytest -v printed before it stopped.
        counts, failures, skips = progress_counts(os.path.join(outdir, "progress.jsonl"))
        if counts is None:
            counts, failures, skips = console_counts(os.path.join(outdir, "console.log"))
        res["partial"] = counts is not None
    res["tests"] = counts
    res["failures"] = failures
    res["skips"] = skips
    res["ok"] = bool(counts) and counts["failed"] == 0 and counts["errors"] == 0 and \
        rc == 0 and res["pytest_exit"] == 0
    if not counts:
        res["problem"] = _tail(os.path.join(outdir, "console.log"))
    return res


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def feature_names(results):
    names = []
    for r in results:
        for n in (r.get("features") or {}):
            if n not in names:
                names.append(n)
    return names


def table(results):
    def cell(r):
        t = r.get("tests")
        if not t:
            return "—", "—", "—", "—"
        return str(t["passed"]), str(t["failed"] + t["errors"]), str(t["skipped"]), \
            ("timeout" if r["timed_out"] else "")
    rows = [["series", "kernel", "passed", "failed", "skipped", "boot s", "check s",
             "tests s", "wall s", "result"]]
    for r in results:
        p, f, s, note = cell(r)
        rows.append([r["series"], r["kernel"], p, f, s, _n(r.get("boot_seconds")),
                     _n(r.get("check_seconds")), _n(r.get("pytest_seconds")),
                     _n(r["wall_seconds"]),
                     "ok" if r["ok"] else ("timeout" if r["timed_out"] else "FAIL")])
    return rows


def _n(x):
    return "—" if x is None else f"{x:.0f}"


def feature_rows(results):
    names = feature_names(results)
    rows = [["feature"] + [r["series"] for r in results]]
    for n in names:
        row = [n]
        for r in results:
            v = (r.get("features") or {}).get(n)
            row.append("—" if v is None else ("yes" if v is True else "no"))
        rows.append(row)
    return rows


def text_table(rows):
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def md_table(rows):
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def write_summary(results):
    os.makedirs(RESULTS, exist_ok=True)
    # Keep the other series' last results in the summary when only some were run.
    merged = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        r = _load(path)
        if r and "series" in r:
            merged[r["series"]] = r
    for r in results:
        merged[r["series"]] = r
    order = sorted(merged.values(), key=lambda r: [int(x) for x in r["series"].split(".")])
    lines = ["# Kernel matrix (make kernels)", "",
             "Kernel tests (tests/kernel) under Debian's kernels, booted under qemu (TCG) by "
             "tests/kernels/run.py.", "", md_table(table(order)), "",
             "Tests run (a timeout or stop: counts of the tests that finished before it):", ""]
    lines += [f"- {r['series']}: `{' '.join(r.get('selection') or r.get('pytest_args') or [])}`"
              f"{' (stopped at the time limit)' if r.get('timed_out') else ''}"
              f"{', code ' + r['code'] if r.get('code') else ''}"
              f"{' ' + r['note'] if r.get('note') else ''}" for r in order]
    lines += ["", "## Features (`ebpf-tproxy check` in the guest)", "",
              md_table(feature_rows(order)), ""]
    for r in order:
        if r.get("failures"):
            lines += [f"## {r['series']} ({r['kernel']}): failures", ""]
            lines += [f"- `{f['test']}` ({f['kind']}): {f['message']}" for f in r["failures"]]
            lines.append("")
        elif r.get("problem"):
            lines += [f"## {r['series']} ({r['kernel']}): no test results", "", "```",
                      r["problem"].rstrip(), "```", ""]
    with open(os.path.join(RESULTS, "summary.md"), "w") as f:
        f.write("\n".join(lines))


def code_version():
    """The project's commit, "-dirty" when the work tree differs from it: what the guests
    ran (they see the work tree itself, over 9p). None outside a git checkout. The files
    this run writes itself (results/, README's table) do not count: with guests side by
    side, the first kernel's results are written while the others still run."""
    def git(*a):
        out = subprocess.run(["git", "-C", PROJECT, *a], capture_output=True, text=True,
                             timeout=30)
        return out.stdout.strip() if out.returncode == 0 else None
    try:
        head = git("rev-parse", "--short=7", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":(exclude)tests/kernels/results", ":(exclude)README.md")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not head:
        return None
    return head + "-dirty" if changed else head


def one_run_at_a_time():
    """One matrix run per host: a second guest on the same cores halves both (the time
    limits then fail tests), and both would share the cache's run directories. A second
    run waits for the first instead of someone stopping it by hand."""
    import fcntl
    f = open(os.path.join(CACHE, "run.lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        say(f"another run is in progress ({f.read().strip() or 'pid unknown'}): waiting")
        while True:   # polled, not a blocking flock: TERM/Ctrl-C must end the wait too
            if STOP.wait(1):
                raise SystemExit("kernels: stopped while waiting for the other run")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                continue
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
    f.flush()
    return f


def parallelism(n_kernels, jobs, cpus, memory):
    """(guests at once, vCPUs each). A guest spends most of its time in one single-threaded
    process (clang inside BCC compiling an install, ~15 s under TCG), so one guest per
    kernel even beyond one per core wins: on 2 cores three 1-vCPU guests ran the whole
    suite on 5.10, 6.1 and 6.12 in about 2 h, where one after the other (2 vCPUs each)
    was estimated at 60-75 min per kernel. Memory bounds it: each guest holds --memory."""
    if jobs <= 0:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        per = int(memory.rstrip("GgMm")) * (1 << 30 if memory[-1] in "Gg" else 1 << 20)
        jobs = max(1, min(n_kernels, (avail - (1 << 30)) // per))
    if cpus <= 0:
        cpus = max(1, (os.cpu_count() or 1) // jobs)
    return jobs, cpus


# ------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=os.environ.get("KERNELS", DEFAULT_KERNELS),
                    help=f"series to run, comma-separated (default {DEFAULT_KERNELS}; "
                    "env KERNELS)")
    ap.add_argument("--tests", default=os.environ.get("KERNEL_TESTS", "tests/kernel"),
                    help="test paths for pytest, space-separated (default tests/kernel; "
                    "env KERNEL_TESTS)")
    ap.add_argument("--timeout", type=float,
                    default=float(os.environ.get("KERNEL_TIMEOUT", 150)),
                    help="minutes per kernel before the guest is stopped (default 150; the "
                    "whole suite took about 2 h per kernel with three guests on two cores)")
    ap.add_argument("--test-timeout", type=int, default=900,
                    help="pytest-timeout per test in the guest, seconds (default 900: TCG "
                    "is 10-30 times slower than the host; pyproject's 300 is for hosts)")
    ap.add_argument("--plain-9p", action="store_true",
                    help="do not remount /usr, the project and the kernels with 9p caching "
                    "in the guest (slower; for debugging)")
    ap.add_argument("--memory", default="3G")
    ap.add_argument("--cpus", type=int, default=int(os.environ.get("KERNEL_CPUS", 0)),
                    help="vCPUs per guest (default: host cores / jobs, at least 1; env "
                    "KERNEL_CPUS)")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("KERNEL_JOBS", 0)),
                    help="guests booted at once (default: one per kernel, as memory allows; "
                    "env KERNEL_JOBS)")
    ap.add_argument("--fetch-only", action="store_true",
                    help="fetch and extract the kernels, boot nothing")
    ap.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments")
    args = ap.parse_args(argv)
    # TERM or Ctrl-C (CI's time limit, kill): the guest is stopped, the tests that finished
    # are reported, no further kernel is booted.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: STOP.set())
    if os.geteuid() != 0:
        raise SystemExit("kernels: run as root (qemu, apt-get, mounts in the guest)")
    series = [s.strip() for s in args.kernels.split(",") if s.strip()]
    for s in series:
        if s not in SERIES:
            raise SystemExit(f"kernels: unknown series {s!r}; known: {', '.join(SERIES)}")
    if not os.path.exists(os.path.join(PROJECT, ".venv", "bin", "python")):
        raise SystemExit("kernels: no .venv: run make setup first")
    os.makedirs(CACHE, exist_ok=True)
    _lock = one_run_at_a_time()   # noqa: F841 (held until exit)
    vng = ensure_host_deps()
    archives = host_archives()
    kernels = []
    for s in series:
        say(f"{s}: looking up the newest kernel")
        k = prepare(s, archives)
        say(f"{s}: {k.kver} ready in {k.root}")
        kernels.append(k)
    if args.fetch_only:
        return 0
    pytest_args = args.tests.split() + list(args.pytest_args)
    args.jobs, args.cpus = parallelism(len(kernels), args.jobs, args.cpus, args.memory)
    say(f"{args.jobs} guest(s) at once, {args.cpus} vCPU(s) each")
    code = code_version()
    # The guest cannot write __pycache__ (read-only view of the host), and compiling the
    # project's modules at every process start is slow under TCG: compile them here.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j0", "loader", "tests"],
                   cwd=PROJECT, stdout=subprocess.DEVNULL)

    def run_one(k):
        if STOP.is_set():
            return None
        outdir = os.path.join(CACHE, "runs", k.series)
        say(f"{k.series}: booting {k.kver} under qemu (TCG), then pytest {' '.join(pytest_args)}")
        t0 = time.monotonic()
        rc, boot_s = boot(vng, k, outdir, pytest_args, args.timeout * 60, args.memory,
                          args.cpus, args.test_timeout, fast=not args.plain_9p)
        wall = time.monotonic() - t0
        r = collect(k, outdir, rc, boot_s, wall)
        r["raw"] = outdir
        r["stopped"] = STOP.is_set()
        r["selection"] = pytest_args
        r["jobs"], r["cpus"] = args.jobs, args.cpus
        # The guests read the work tree live: an edit during the run shows as a change.
        r["code"], r["code_at_end"] = code, code_version()
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, f"{k.series}.json"), "w") as f:
            json.dump(r, f, indent=2)
            f.write("\n")
        t = r["tests"] or {}
        say(f"{k.series}: {'ok' if r['ok'] else 'FAILED'} in {wall:.0f} s: "
            f"{t.get('passed', 0)} passed, {t.get('failed', 0) + t.get('errors', 0)} failed, "
            f"{t.get('skipped', 0)} skipped")
        return r

    # --jobs N boots N guests at once. Worth it with --cpus 1: a guest spends most of its
    # time in one single-threaded process (clang inside BCC, 15 s per install under TCG),
    # so one guest per host core roughly divides the matrix's wall time by N.
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = [r for r in pool.map(run_one, kernels) if r is not None]
    write_summary(results)
    print()
    print(text_table(table(results)))
    print()
    print(text_table(feature_rows(results)))
    for r in results:
        for f in r.get("failures", []):
            print(f"[{r['series']}] {f['kind']}: {f['test']}: {f['message']}")
        if r.get("problem"):
            print(f"[{r['series']}] no test results; console tail:\n{r['problem']}")
    print(f"\nresults: {RESULTS}/<series>.json, {RESULTS}/summary.md; raw: {CACHE}/runs/")
    total = {k: sum((r["tests"] or {}).get(k, 0) for r in results)
             for k in ("passed", "failed", "errors", "skipped")}
    if STOP.is_set():
        say("stopped before the end: the last kernel's counts are partial")
    # The closing line, all kernels together (a kernel without results counts as failed).
    print(f"{total['passed']} passed, "
          f"{total['failed'] + total['errors'] + sum(1 for r in results if not r['tests'])} "
          f"failed, {total['skipped']} skipped")
    return 0 if results and all(r["ok"] for r in results) and not STOP.is_set() else 1


if __name__ == "__main__":
    sys.exit(main())
