"""Property (issue 17): whatever flags, environment variables and config files the CLI is
given, valid or not, ASCII or not, `install --dry-run` (and status/uninstall on a path that
is no bpffs) never prints a traceback, exits 0 or 2, and changes nothing in the kernel.

The CLI runs in-process (click's runner) so that a few hundred cases take seconds; --netns
is drawn from values that cannot name a namespace (the runner shares this process, so a
real one would move the test itself). The seed corpus is issue 17's cases. Derandomized:
CI runs the same cases every time; a new failure is a new seed here."""
import os

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loader import cli, config, kernel

from .residue import snapshot, wait_back_to

# argv and the environment hold no NUL and no lone surrogate; config files may hold both.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                      blacklist_characters="\x00"), max_size=40)
NUMBERISH = st.sampled_from(["0", "1", "65535", "65536", "70000", "-1", "+80", "1_000", "８０",
                            "٥٦٧٨", "²", "0x50", " 80", "80 ", "", "15001", "5678",
                            "99999999999999999999999"])
CIDRISH = st.sampled_from(["10.0.0.0/8", "10.0.0.0/40", "::/0", "fe80::1%lo", "1.2.3.4",
                           "not-an-ip", "", ",", "10.0.0.1,,", "300.1.1.1"])
VALUE = st.one_of(TEXT, NUMBERISH, CIDRISH)
FLAGS = [o.opts[0] for o in (opt(lambda: None).__click_params__[0]
                             for opt in cli.KUMA_OPTIONS)
         if o.opts[0].startswith("--") and o.opts[0] not in ("--netns", "--dry-run", "--help")]
BAD_NETNS = st.sampled_from(["", ".", "..", "x/y", "no-such-ns-7f3a", "/nonexistent/ns"])


def flag_args():
    one = st.tuples(st.sampled_from(FLAGS), VALUE).map(lambda fv: [f"{fv[0]}={fv[1]}"])
    netns = BAD_NETNS.map(lambda v: [f"--netns={v}"])
    return st.lists(st.one_of(one, netns), max_size=6).map(lambda xs: sum(xs, []))


def env_vars():
    return st.dictionaries(st.sampled_from(sorted(config.ENV_NAMES)), VALUE, max_size=4)


SCALAR = st.one_of(st.text(max_size=20), st.integers(-2, 2**33), st.booleans(), st.none(),
                   st.floats(allow_nan=True))
YAML_VALUE = st.recursive(SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)


def config_docs():
    keys = st.sampled_from(sorted(config.LEAVES))

    def nest(items):
        doc = {}
        for path, v in items:
            d = doc
            *head, last = path.split(".")
            for h in head:
                d = d.setdefault(h, {}) if isinstance(d.get(h, {}), dict) else {}
            d[last] = v
        return doc
    return st.lists(st.tuples(keys, YAML_VALUE), max_size=5).map(nest)


SEEDS = {
    "nul.yaml": b'kumaDPUser: "no\\0body"\n',
    "notutf8.yaml": b"kumaDPUser: nob\xffody\n",
    "deep.yaml": b"redirect: {outbound: {excludePorts: " + b"[" * 5000 + b"22" + b"]" * 5000
                 + b"}}\n",
    "bomb.yaml": ("\n".join(["a0: &a0 [x,x,x,x,x,x,x,x,x]"] + [
        f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)])
        + "\nredirect: {outbound: {excludePorts: *a9}}\n").encode(),
    "devzero.yaml": b"redirect: {dns: {enabled: true, resolvConfigPath: /dev/zero}}\n",
    "nulpath.yaml": b'redirect: {dns: {enabled: true, resolvConfigPath: "/etc/r\\0"}}\n',
}


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("seeds")
    for name, data in SEEDS.items():
        (d / name).write_bytes(data)
    return d


def check_result(r):
    out = (r.output or "") + (getattr(r, "stderr", "") or "")
    assert "Traceback" not in out, out
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code in (0, 2), (r.exit_code, out)


@pytest.fixture(scope="module")
def untouched():
    before = snapshot()
    mounts = open("/proc/self/mountinfo").read()
    yield
    assert wait_back_to(before) == {}
    assert open("/proc/self/mountinfo").read() == mounts


runner = CliRunner()


@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(args=flag_args(), env=env_vars(), doc=st.one_of(st.none(), config_docs()),
       seed=st.one_of(st.none(), st.sampled_from(sorted(SEEDS))))
@example(args=["--kuma-dp-user=²"], env={}, doc=None, seed=None)
@example(args=[], env={"KUMA_TRANSPARENT_PROXY_KUMA_DP_USER": "²"}, doc=None, seed=None)
@example(args=["--netns="], env={}, doc=None, seed=None)
@example(args=["--ebpf-cgroup-path="], env={}, doc=None, seed=None)
@example(args=[], env={"KUMA_TRANSPARENT_PROXY_EBPF_CGROUP_PATH": ""}, doc=None, seed=None)
@example(args=["--ebpf-cgroup-path=x/.."], env={}, doc=None, seed=None)
@example(args=["--name=a.b"], env={}, doc=None, seed=None)
@example(args=["--redirect-outbound-port=８０"], env={}, doc=None, seed=None)
@example(args=["--exclude-outbound-ports=1_000"], env={}, doc=None, seed=None)
@example(args=["--ebpf-bpffs-path=/nonexistent"], env={}, doc=None, seed=None)
@example(args=[], env={}, doc={"redirect": {"outbound": {"excludePorts": [[[22]]]}}}, seed=None)
@example(args=[], env={}, doc=None, seed="bomb.yaml")
@example(args=[], env={}, doc=None, seed="deep.yaml")
def test_install_dry_run_never_crashes_nor_changes_the_kernel(untouched, seed_dir, tmp_path,
                                                             args, env, doc, seed):
    import yaml
    argv = ["install", "--dry-run", *args]
    if seed:
        argv += ["--config", str(seed_dir / seed)]
    if doc is not None:
        f = tmp_path / "fuzz.yaml"
        f.write_text(yaml.safe_dump(doc, allow_unicode=True))
        argv += ["--config", str(f)]
    check_result(runner.invoke(cli.main, argv, env=env, catch_exceptions=True))


NAMES = st.one_of(TEXT, st.sampled_from(["", ".", "..", "../../x", "a.b", "default",
                                         "x" * 64, "pod-1"]))
NOT_BPFFS = st.one_of(TEXT, st.sampled_from(["", "/", "rel", "/nonexistent", "/tmp"])).filter(
    lambda p: not kernel.is_bpffs(p) if p.startswith("/") else True)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(cmd=st.sampled_from(["status", "uninstall"]), name=NAMES, bpffs=NOT_BPFFS,
       everything=st.booleans())
def test_status_and_uninstall_of_any_name_never_crash(untouched, cmd, name, bpffs, everything):
    argv = [cmd, f"--name={name}", f"--ebpf-bpffs-path={bpffs}"]
    if cmd == "uninstall" and everything:
        argv.append("--all")
    check_result(runner.invoke(cli.main, argv, catch_exceptions=True))


def test_the_fuzzer_reaches_the_refusals(seed_dir):
    """The property is not vacuous: the seed cases are refused with exit 2 and one line."""
    for argv in (["--kuma-dp-user=²"], ["--netns="], ["--name=a.b"],
                 ["--ebpf-bpffs-path=/nonexistent"], ["--ebpf-cgroup-path="],
                 ["--redirect-outbound-port=８０"], ["--config", str(seed_dir / "bomb.yaml")]):
        r = runner.invoke(cli.main, ["install", "--dry-run", *argv])
        assert r.exit_code == 2 and "ebpf-tproxy: error: " in r.output, (argv, r.output)
    assert len(FLAGS) > 30 and "--kuma-dp-user" in FLAGS   # the flags were found
    assert os.geteuid() == 0
