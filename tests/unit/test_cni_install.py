"""`ebpf-tproxy cni install` on directories made by the test (the host's /etc/cni and
/opt/cni are never touched), and the API-server fallback against a recorded pod object."""
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from loader.cni import apiserver, install, plugin, proto

BRIDGE = {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}}
OURS = install.entry("/run/ebpf-tproxy/cni.sock", "/sys/fs/bpf", environ={
    "KUMA_RUNTIME_KUBERNETES_SIDECAR_TRAFFIC_EXCLUDE_OUTBOUND_PORTS": "22", "HOME": "/root"})


def write(path, doc):
    with open(path, "w") as f:
        json.dump(doc, f)


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def dirs(tmp_path):
    b, c = tmp_path / "bin", tmp_path / "net.d"
    b.mkdir()
    c.mkdir()
    return str(b), str(c)


def test_the_entry_carries_only_the_node_default_variables():
    assert OURS["node_defaults"] == {
        "KUMA_RUNTIME_KUBERNETES_SIDECAR_TRAFFIC_EXCLUDE_OUTBOUND_PORTS": "22"}
    assert OURS["capabilities"] == {"io.kubernetes.cri.pod-annotations": True, "dns": True}
    plugin.PluginConf(dict(OURS, name="n", cniVersion="1.0.0"))   # the plugin accepts it


def test_conflist_gets_our_entry_last_once(dirs):
    _, conf = dirs
    path = os.path.join(conf, "10-bridge.conflist")
    write(path, {"cniVersion": "1.0.0", "name": "pods", "plugins": [BRIDGE, dict(OURS, x=1)]})
    assert install.patch(conf, OURS) == path
    install.patch(conf, OURS)
    assert read(path)["plugins"] == [BRIDGE, OURS]
    assert install.patched(conf, OURS)
    install.revert(conf)
    assert read(path)["plugins"] == [BRIDGE]


def test_a_bare_conf_is_wrapped_into_a_conflist_and_restored(dirs):
    _, conf = dirs
    path = os.path.join(conf, "10-bridge.conf")
    original = dict(BRIDGE, cniVersion="0.4.0", name="pods")
    write(path, original)
    before = open(path).read()
    target = install.patch(conf, OURS)
    assert target == os.path.join(conf, "10-bridge.conflist")
    assert read(target) == {"cniVersion": "0.4.0", "name": "pods",
                            "plugins": [original, OURS]}
    assert install.default_network(conf) == target   # the runtime now reads the conflist
    install.revert(conf)
    assert sorted(os.listdir(conf)) == ["10-bridge.conf"] and open(path).read() == before


def test_the_lexically_first_configuration_is_the_runtimes(dirs):
    _, conf = dirs
    write(os.path.join(conf, "20-b.conflist"), {"name": "b", "plugins": [BRIDGE]})
    write(os.path.join(conf, "10-a.json"), dict(BRIDGE, name="a"))
    assert install.default_network(conf) == os.path.join(conf, "10-a.json")


def test_install_keeps_the_chain_and_reverts_everything_on_sigterm(dirs, tmp_path):
    bin_dir, conf = dirs
    path = os.path.join(conf, "10-bridge.conflist")
    write(path, {"cniVersion": "1.0.0", "name": "pods", "plugins": [BRIDGE]})
    ready = str(tmp_path / "ready")
    p = subprocess.Popen([sys.executable, "-m", "loader.cli", "cni", "install",
                          "--cni-bin-dir", bin_dir, "--cni-conf-dir", conf, "--interval", "0.1",
                          "--ready-file", ready], stderr=subprocess.PIPE, text=True)
    try:
        wait(lambda: os.path.exists(ready), "chained")
        assert os.access(os.path.join(bin_dir, "ebpf-tproxy"), os.X_OK)
        assert read(path)["plugins"][-1]["type"] == "ebpf-tproxy"
        # The primary plugin rewrites its configuration: chained again, in place.
        write(path, {"cniVersion": "1.0.0", "name": "pods", "plugins": [BRIDGE]})
        wait(lambda: read(path)["plugins"][-1]["type"] == "ebpf-tproxy", "chained again")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
    assert read(path)["plugins"] == [BRIDGE]
    assert os.listdir(bin_dir) == [] and not os.path.exists(ready)


def test_install_refuses_a_missing_directory_in_one_line(dirs):
    bin_dir, _ = dirs
    r = subprocess.run([sys.executable, "-m", "loader.cli", "cni", "install", "--once",
                        "--cni-bin-dir", bin_dir, "--cni-conf-dir", "/nonexistent/net.d"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--cni-conf-dir" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and os.listdir(bin_dir) == []


def wait(cond, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)   # polling files another process writes


# ------------------------------------------------------------ the API-server fallback

RECORDED = os.path.join(os.path.dirname(__file__), "data", "pod-injected.json")


@pytest.fixture
def fake_api(tmp_path):
    """A local HTTP server answering GET pod with a recorded pod object (not a real API
    server), and a kubeconfig pointing at it."""
    with open(RECORDED) as f:
        pod = json.load(f)
    path = f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/{pod['metadata']['name']}"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(pod if self.path.split("?")[0] == path else
                              {"kind": "Status", "code": 404}).encode()
            self.send_response(200 if self.path.split("?")[0] == path else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: t\n"
        f"clusters: [{{name: t, cluster: {{server: 'http://127.0.0.1:{srv.server_port}'}}}}]\n"
        "users: [{name: t, user: {token: recorded}}]\n"
        "contexts: [{name: t, context: {cluster: t, user: t}}]\n")
    yield str(kubeconfig), pod
    srv.shutdown()
    srv.server_close()


def test_api_fallback_reads_a_recorded_pod_object_from_a_local_fake_api_server(fake_api):
    kubeconfig, pod = fake_api
    got = apiserver.read_pod(kubeconfig, "shop", pod["metadata"]["name"], attempts=1)
    assert got.annotations == pod["metadata"]["annotations"]
    assert got.containers == ["web", "kuma-sidecar"]
    assert got.init_containers == ["kuma-validation"]
    # Through the plugin: a request without runtime annotations asks the API, and the
    # recorded pod is selected with its annotation applied.
    req = proto.Request(
        {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0",
         "CNI_PATH": "/x", "CNI_ARGS": f"K8S_POD_NAMESPACE=shop;K8S_POD_NAME="
                                       f"{pod['metadata']['name']}"},
        json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "ebpf-tproxy",
                    "api_attempts": 1, "kubernetes": {"kubeconfig": kubeconfig}}).encode())
    settings, why_not = plugin._settings(req, plugin.PluginConf(req.conf), "cni-x")
    assert why_not is None and settings.outbound_exclude_ports == (5432,)


def test_api_fallback_missing_pod_is_try_again_later(fake_api):
    kubeconfig, _ = fake_api
    with pytest.raises(proto.CNIError) as e:
        apiserver.read_pod(kubeconfig, "shop", "nope", attempts=1)
    assert e.value.code == 11 and "shop/nope" in e.value.msg
