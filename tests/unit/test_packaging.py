"""A non-editable install works: the wheel carries bpf/ (BCC compiles those sources at run
time) and the lab subpackage, and an installed loader finds its C sources in the install,
not in this checkout. Offline: no build isolation, no index (no root needed)."""
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BPF_SOURCES = sorted(os.path.basename(p) for ext in ("*.c", "*.h")
                     for p in glob.glob(os.path.join(ROOT, "bpf", ext)))
# The build works on a copy: an in-tree build would leave build/ and egg-info behind.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", ".kernels", ".vagrant", ".pytest_cache",
                                    "__pycache__", "*.egg-info", "build", "dist")


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout}\n{r.stderr}"
    return r


def clean_env():
    """No PYTHONPATH or virtualenv of ours leaking into the throwaway one."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    missing = [m for m in ("setuptools", "wheel") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not importable by {sys.executable}: "
                    "cannot build a wheel offline")
    src = tmp_path_factory.mktemp("src") / "ebpf-tproxy"
    shutil.copytree(ROOT, src, ignore=NOT_COPIED)
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "-q", "-w", str(out)], env=clean_env())
    wheels = glob.glob(str(out / "ebpf_tproxy-*.whl"))
    assert len(wheels) == 1, os.listdir(out)
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A throwaway venv with only the wheel installed (no dependencies: see below)."""
    d = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(d)], env=clean_env())
    py = str(d / "bin" / "python")
    run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
         "-q", wheel], env=clean_env())
    return d


def test_wheel_contents(wheel):
    assert "connect.c" in BPF_SOURCES and "tproxy_abi.h" in BPF_SOURCES
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for f in BPF_SOURCES:
            assert f"loader/bpf/{f}" in names, f"bpf/{f} is not in the wheel"
            with open(os.path.join(ROOT, "bpf", f), "rb") as src:
                assert z.read(f"loader/bpf/{f}") == src.read(), f
        entry_points = next(z.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
    for f in ("loader/__init__.py", "loader/cli.py", "loader/programs.py",
              "loader/lab/__init__.py", "loader/lab/servers.py", "loader/lab/demo.py"):
        assert f in names, f
    # The lab moved into its own subpackage; the old modules must not linger.
    for f in ("loader/lab.py", "loader/labservers.py", "loader/demo.py"):
        assert f not in names, f
    assert not [n for n in names if n.startswith(("tests/", "bench/", "bpf/"))]
    assert "ebpf-tproxy = loader.cli:main" in entry_points


def test_installed_loader_reads_its_own_bpf_sources(venv, tmp_path):
    code = ("import json; from loader import programs; "
            "print(json.dumps([programs.__file__, programs.BPF_DIR, programs.source()[:100]]))")
    r = run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=clean_env())
    path, bpf_dir, head = json.loads(r.stdout.strip().splitlines()[-1])
    assert path.startswith(str(venv)), path
    assert bpf_dir.startswith(str(venv)) and bpf_dir.endswith(os.path.join("loader", "bpf"))
    with open(os.path.join(ROOT, "bpf", "connect.c")) as f:
        connect_c = f.read()
    assert head == connect_c[:100]
    assert "connect.c" in head


def test_installed_console_script(venv, tmp_path):
    """`ebpf-tproxy --help` from the install. The dependencies come from this interpreter's
    site-packages, appended by a .pth file (a plain path: no .pth of that directory runs, so
    an editable loader there stays invisible), since the wheel was installed offline."""
    import click
    import pyroute2
    import yaml
    site = run([str(venv / "bin" / "python"), "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
               env=clean_env()).stdout.strip()
    deps = sorted({os.path.dirname(os.path.dirname(m.__file__)) for m in (click, pyroute2, yaml)})
    with open(os.path.join(site, "zz_test_deps.pth"), "w") as f:
        f.write("".join(d + "\n" for d in deps))
    r = run([str(venv / "bin" / "python"), "-c",
             "import loader.cli, loader.lab, loader.lab.servers, loader.lab.demo; "
             "print(loader.cli.__file__)"], cwd=tmp_path, env=clean_env())
    assert r.stdout.strip().startswith(str(venv)), r.stdout
    r = run([str(venv / "bin" / "ebpf-tproxy"), "--help"], cwd=tmp_path, env=clean_env())
    assert "Example:" in r.stdout or "Usage:" in r.stdout
