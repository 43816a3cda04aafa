"""`ebpf-tproxy cni install`: what Kuma's install-cni container does for Kuma CNI, for
ebpf-tproxy. Run by the DaemonSet's install-cni container with the host's CNI directories
mounted:

  1. the shim (loader/cni/shim.py) into the CNI bin dir as `ebpf-tproxy`, atomically;
  2. our entry appended to the network configuration the runtime uses: the lexically first
     *.conf, *.conflist or *.json of the conf dir (what containerd's go-cni and CRI-O's
     ocicni take as the default network). A bare .conf/.json is wrapped into
     <base>.conflist and the original kept aside (<name>.ebpf-tproxy-orig), since go-cni
     refuses a conflist in a .conf file (Kuma writes it under the .conf name);
  3. kept there: checked every --interval seconds and patched again in place when the
     primary plugin rewrote its file (Kuma exits and waits for a restart instead);
  4. on SIGTERM, SIGINT or SIGHUP everything is reverted: first the configuration (so no
     pod is set up with a plugin that is about to go), then the binary.
Files are written through dotfile temporaries renamed into place: a runtime never reads a
half-written file.
"""
import glob
import json
import os
import shutil
import signal
import time

from . import plugin, podconfig

ORIG_SUFFIX = ".ebpf-tproxy-orig"


class InstallError(RuntimeError):
    pass


def entry(agent_socket, bpffs_path, cgroup_path="", kubeconfig="",
          exclude_namespaces=("kube-system",), environ=None):
    """Our conflist entry; node defaults are the KUMA_RUNTIME_KUBERNETES_* variables of
    this process (the DaemonSet gives them from its ConfigMap)."""
    environ = os.environ if environ is None else environ
    e = {"type": plugin.PLUGIN_TYPE,
         "capabilities": {plugin.ANNOTATIONS_CAPABILITY: True, "dns": True},
         "agent_socket": agent_socket, "bpffs_path": bpffs_path,
         "kubernetes": {"exclude_namespaces": list(exclude_namespaces)},
         "node_defaults": {k: v for k, v in sorted(environ.items())
                           if k in podconfig.KNOWN_NODE_DEFAULTS}}
    if cgroup_path:
        e["cgroup_path"] = cgroup_path
    if kubeconfig:
        e["kubernetes"]["kubeconfig"] = kubeconfig
    return e


def default_network(conf_dir):
    """The file the runtime takes as its network: the lexically first *.conf, *.conflist
    or *.json (go-cni loadFromConfDir, ocicni loadNetworks). None if there is none."""
    files = sorted(f for pat in ("*.conf", "*.conflist", "*.json")
                   for f in glob.glob(os.path.join(glob.escape(conf_dir), pat)))
    return files[0] if files else None


def _read(path):
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict):
        raise InstallError(f"{path}: not a JSON object")
    return doc


def _write(path, doc):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)


def _ours(p):
    return isinstance(p, dict) and p.get("type") == plugin.PLUGIN_TYPE


def patched(conf_dir, ours):
    """Whether the default network ends with exactly our entry."""
    path = default_network(conf_dir)
    if path is None or not path.endswith(".conflist"):
        return False
    try:
        plugins = _read(path).get("plugins")
    except (OSError, ValueError, InstallError):
        return False
    return isinstance(plugins, list) and bool(plugins) and plugins[-1] == ours \
        and sum(map(_ours, plugins)) == 1


def patch(conf_dir, ours):
    """Put our entry last in the default network's chain. Returns the file written."""
    path = default_network(conf_dir)
    if path is None:
        raise InstallError(f"no *.conf, *.conflist or *.json in {conf_dir}: the primary CNI "
                           "plugin has not written its configuration yet")
    try:
        doc = _read(path)
    except ValueError as e:
        raise InstallError(f"{path}: not JSON ({e})") from None
    if isinstance(doc.get("plugins"), list):
        if not doc.get("name"):
            raise InstallError(f"{path}: a conflist without a name")
        doc["plugins"] = [p for p in doc["plugins"] if not _ours(p)] + [ours]
        _write(path, doc)
        return path
    if not doc.get("type"):
        raise InstallError(f"{path}: neither a conflist (plugins) nor a plugin (type)")
    base = os.path.splitext(path)[0]
    target = base + ".conflist"
    wrapped = {"cniVersion": doc.get("cniVersion", "0.3.1"), "name": doc.get("name", "k8s-pod-network"),
               "plugins": [doc, ours]}
    _write(target, wrapped)
    os.rename(path, path + ORIG_SUFFIX)   # kept for revert; no runtime glob matches it
    return target


def revert(conf_dir):
    """Remove our entry from every configuration of conf_dir and restore what we wrapped.
    Returns what was changed."""
    changed = []
    for orig in sorted(glob.glob(os.path.join(glob.escape(conf_dir), "*" + ORIG_SUFFIX))):
        path = orig[:-len(ORIG_SUFFIX)]
        wrapper = os.path.splitext(path)[0] + ".conflist"
        os.rename(orig, path)
        if os.path.exists(wrapper):
            os.unlink(wrapper)
        changed.append(path)
    for path in sorted(glob.glob(os.path.join(glob.escape(conf_dir), "*.conflist"))):
        try:
            doc = _read(path)
        except (OSError, ValueError, InstallError):
            continue
        plugins = doc.get("plugins")
        if isinstance(plugins, list) and any(map(_ours, plugins)):
            doc["plugins"] = [p for p in plugins if not _ours(p)]
            _write(path, doc)
            changed.append(path)
    return changed


def install_binary(bin_dir):
    from . import shim
    target = os.path.join(bin_dir, plugin.PLUGIN_TYPE)
    tmp = os.path.join(bin_dir, "." + plugin.PLUGIN_TYPE + ".tmp")
    shutil.copyfile(shim.__file__, tmp)
    os.chmod(tmp, 0o755)
    os.rename(tmp, target)
    return target


def remove_binary(bin_dir):
    try:
        os.unlink(os.path.join(bin_dir, plugin.PLUGIN_TYPE))
        return True
    except FileNotFoundError:
        return False


def run(bin_dir, conf_dir, ours, interval=1.0, wait=300.0, once=False, say=print,
        ready_file=None):
    """Install, then keep it so until a signal; revert on it. once: install and return."""
    for d, what in ((bin_dir, "--cni-bin-dir"), (conf_dir, "--cni-conf-dir")):
        if not os.path.isdir(d):
            raise InstallError(f"{what}: {d} is not a directory (mount the host's)")
    stop = []
    if not once:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: stop.append(signum))
    say(f"installed {install_binary(bin_dir)}")
    try:
        deadline = time.monotonic() + wait
        while default_network(conf_dir) is None:
            if stop or time.monotonic() > deadline:
                raise InstallError(f"no network configuration appeared in {conf_dir} within "
                                   f"{wait:.0f} s: is the primary CNI plugin installed?")
            say(f"waiting for the primary plugin's configuration in {conf_dir}")
            time.sleep(min(interval, 5))   # polling a directory another component writes
        say(f"chained into {patch(conf_dir, ours)}")
        if ready_file:
            open(ready_file, "w").close()
        if once:
            return
        while not stop:
            time.sleep(interval)   # the re-check period (a signal is seen when it ends)
            if not stop and not patched(conf_dir, ours):
                try:
                    say(f"the configuration changed: chained again into "
                        f"{patch(conf_dir, ours)}")
                except (OSError, InstallError) as e:
                    say(f"cannot chain again yet: {e}")
    except BaseException:
        if not once:
            _revert_all(bin_dir, conf_dir, say, ready_file)
        raise
    _revert_all(bin_dir, conf_dir, say, ready_file)


def _revert_all(bin_dir, conf_dir, say, ready_file):
    for path in revert(conf_dir):
        say(f"reverted {path}")
    if remove_binary(bin_dir):
        say(f"removed {os.path.join(bin_dir, plugin.PLUGIN_TYPE)}")
    if ready_file and os.path.exists(ready_file):
        os.unlink(ready_file)
