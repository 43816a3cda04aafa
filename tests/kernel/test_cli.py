"""check, install --dry-run and status as a user sees them."""
import json

import pytest

from loader.programs import PROGRAMS

from .conftest import DP_USER
from .residue import cgroup_attachments, pins, snapshot, wait_back_to


@pytest.mark.kernel_ci
def test_check_passes_here_and_probes_every_hook(lab):
    r = lab.tproxy("check", "--output", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    for hook in ("cgroup/connect6", "cgroup/sock_ops with skops->sk", "cgroup/getsockopt",
                 "cgroup/getpeername4", "cgroup/getpeername6"):
        assert checks[hook]["ok"] and checks[hook]["detail"] == "loads", checks[hook]
    assert checks["kernel >= 5.7"]["ok"]


def test_check_refuses_a_cgroup_path_outside_cgroup2(lab):
    r = lab.tproxy("check", "--ebpf-cgroup-path", "/tmp")
    assert r.returncode == 1
    assert "not a directory in a cgroup2 mount" in r.stdout


def test_dry_run_prints_the_plan_and_changes_nothing(lab):
    before = snapshot()
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--exclude-outbound-ports", "22",
                   "--exclude-outbound-ips", "10.0.0.0/8", "--dry-run")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    maps = plan["maps"]
    hooks = {p["hook"]: p["attach"] for p in plan["programs"]}
    assert list(hooks) == [p.hook for p in PROGRAMS]
    assert "netns/sk_lookup" in hooks and "cgroup/sendmsg4" in hooks
    assert all(v == lab.cgroup for k, v in hooks.items() if k.startswith("cgroup/"))
    assert hooks["netns/sk_lookup"].startswith("network namespace")
    assert maps["tp_ports"]["exclude_inbound"] == [22]
    assert maps["tp_ports"]["exclude_outbound"] == [22]
    assert maps["tp_cidrs"]["exclude_outbound"] == ["10.0.0.0/8"]
    assert "198.18.0.1/32" in maps["tp_cidrs"]["local"]   # the lab namespace's address
    assert maps["tp_config"]["instance_ip4"] == "198.18.0.1"
    assert cgroup_attachments(lab.cgroup) == [] and pins(lab.bpffs) == []
    assert wait_back_to(before) == {}


@pytest.mark.alone("status and uninstall of a node with no namespace registered")
def test_status_without_instances(lab):
    r = lab.tproxy("status")
    assert r.returncode == 0 and "no namespace registered" in r.stdout
    r = lab.tproxy("uninstall")
    assert r.returncode == 0 and "nothing to uninstall" in r.stdout


def test_dry_run_explain_prints_kumas_rules_beside_the_plan(lab):
    r = lab.tproxy("install", "--kuma-dp-user", DP_USER, "--dry-run", "--explain",
                   "--exclude-outbound-ports", "22")
    assert r.returncode == 0, r.stderr
    assert "# iptables-restore equivalent" in r.stdout
    assert "-A KUMA_MESH_OUTBOUND -p tcp --dport 22 -j RETURN" in r.stdout
    assert "# ip6tables-restore equivalent" in r.stdout
