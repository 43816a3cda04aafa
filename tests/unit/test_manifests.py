"""deploy/kubernetes/: every object parses into the `kubernetes` client's typed model and
serializes back to exactly its source (a misspelt field would be dropped by the model and
show up here), and the DaemonSet runs what the README says."""
import glob
import json
import os

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes", reason="make setup installs the test extra")

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "kubernetes")
MODELS = {"DaemonSet": "V1DaemonSet", "ServiceAccount": "V1ServiceAccount",
          "ClusterRole": "V1ClusterRole", "ClusterRoleBinding": "V1ClusterRoleBinding",
          "ConfigMap": "V1ConfigMap", "Pod": "V1Pod"}


def objects():
    for path in sorted(glob.glob(os.path.join(DEPLOY, "*.yaml"))):
        if os.path.basename(path).startswith("values"):
            continue
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    yield os.path.basename(path), doc


class _Response:
    def __init__(self, doc):
        self.data = json.dumps(doc)


@pytest.mark.parametrize("name,doc", list(objects()),
                         ids=[f"{n}:{d['kind']}" for n, d in objects()])
def test_every_object_round_trips_through_its_model(name, doc):
    api = kubernetes.client.ApiClient()
    try:   # the client's deserialize of an API response: its text since version 31 ...
        obj = api.deserialize(json.dumps(doc), MODELS[doc["kind"]], "application/json")
    except TypeError:   # ... the response object before (Debian's 22.6)
        obj = api.deserialize(_Response(doc), MODELS[doc["kind"]])
    assert api.sanitize_for_serialization(obj) == doc


def test_the_daemonset_and_the_example_pod_run_what_is_documented():
    ds = next(d for _, d in objects() if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] and spec["hostPID"]
    agent, inst = spec["containers"]
    assert agent["command"] == ["ebpf-tproxy", "agent"]
    assert "--cni-socket=/run/ebpf-tproxy/cni.sock" in agent["args"]
    assert agent["securityContext"]["privileged"]
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"
    assert {"/run/ebpf-tproxy", "/sys/fs/cgroup", "/run/netns"} <= set(mounts)
    assert inst["command"] == ["ebpf-tproxy", "cni", "install"]
    assert "--agent-socket=/run/ebpf-tproxy/cni.sock" in inst["args"]
    assert inst["envFrom"][0]["configMapRef"]["name"] == "ebpf-tproxy-node-defaults"
    # Every option given is one the CLI has (click would refuse the container at start).
    from click.testing import CliRunner

    from loader.cli import main
    pod = next(d for _, d in objects() if d["kind"] == "Pod")
    validation = pod["spec"]["initContainers"][0]
    assert validation["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert validation["securityContext"]["runAsUser"] == 5678
    for argv in (agent["command"][1:] + agent["args"], inst["command"][1:] + inst["args"],
                 validation["command"][1:] + validation["args"]):
        r = CliRunner().invoke(main, argv[:1 + (argv[0] == "cni")] + ["--help"])
        assert r.exit_code == 0
        for a in argv:
            if a.startswith("--"):
                assert a.split("=")[0] in r.output, a


def test_the_node_defaults_are_variables_the_plugin_reads():
    from loader.cni import podconfig
    cm = next(d for _, d in objects() if d["kind"] == "ConfigMap")
    assert set(cm["data"]) <= podconfig.KNOWN_NODE_DEFAULTS
