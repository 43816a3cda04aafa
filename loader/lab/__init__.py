"""A lab for the demo and the kernel tests: two network namespaces joined by veth, a child
cgroup for the application and its proxy, and a private bpffs for the pins.

    app ns     198.18.0.1/24  fd00:7470::1/64   (the pod: application + proxy, in the cgroup)
    remote ns  198.18.0.2/24  fd00:7470::2/64   (another host)

Addresses are from the benchmarking range 198.18.0.0/15 and a ULA prefix: only lab hosts.
Processes join the cgroup before they enter the netns (`ip netns exec` would remount /sys
and hide the cgroup2 mount), through nsenter, which keeps the mounts. Everything the lab
made is removed by close(), also after a failure: processes killed, cgroup removed,
namespaces deleted, bpffs unmounted.
"""
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from .. import kernel

APP_IP4, REMOTE_IP4 = "198.18.0.1", "198.18.0.2"
APP_IP6, REMOTE_IP6 = "fd00:7470::1", "fd00:7470::2"
PYTHON = sys.executable
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _make_root_only(tree):
    """Unlink the symlinks in tree, give every other entry to root, mode 0700 or less."""
    if os.path.islink(tree):
        os.unlink(tree)
        return
    for dirpath, dirnames, filenames in os.walk(tree):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                os.unlink(p)
    for dirpath, dirnames, filenames in os.walk(tree):
        for p in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            os.chown(p, 0, 0, follow_symlinks=False)
            os.chmod(p, 0o700 if os.path.isdir(p) else 0o600)


def sh(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


class Lab:
    def __init__(self, tag="lab", conntrack=False):
        self.id = f"{tag}-{uuid.uuid4().hex[:6]}"
        self.conntrack = conntrack
        self.extra_ns = []        # more namespaces a test asked for (add_netns)
        self.child_cgroups = []   # child cgroups of the lab's cgroup (child_cgroup)
        self.sibling_cgroups = []  # cgroups beside it (sibling_cgroup)
        self.app_ns = f"tp-{self.id}-app"
        self.remote_ns = f"tp-{self.id}-rem"
        root = kernel.cgroup2_mount()
        if root is None:
            raise RuntimeError("no cgroup2 mount: the lab needs one")
        self.cgroup = os.path.join(root, f"ebpf-tproxy-{self.id}")
        self.bpffs = None
        self.state_dir = None
        self.tmpdir = None
        self.procs = []
        self.veth = ("tpa" + self.id[-6:], "tpr" + self.id[-6:])

    # ------------------------------------------------------------------ build
    def open(self):
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    def _build(self):
        for ns in (self.app_ns, self.remote_ns):
            sh("ip", "netns", "add", ns)
            self.ip(ns, "link", "set", "lo", "up")
        a, r = self.veth
        sh("ip", "link", "add", a, "netns", self.app_ns, "type", "veth",
           "peer", "name", r, "netns", self.remote_ns)
        for ns, dev, ip4, ip6 in ((self.app_ns, a, APP_IP4, APP_IP6),
                                  (self.remote_ns, r, REMOTE_IP4, REMOTE_IP6)):
            # No kernel-made link-local address appearing a moment after "up": the lab's
            # addresses are all known when install reads them.
            self.ip(ns, "link", "set", dev, "addrgenmode", "none")
            self.ip(ns, "addr", "add", f"{ip4}/24", "dev", dev)
            self.ip(ns, "-6", "addr", "add", f"{ip6}/64", "dev", dev, "nodad")
            self.ip(ns, "link", "set", dev, "up")
        if self.conntrack:
            self._enable_conntrack()
        os.mkdir(self.cgroup)
        self.bpffs = tempfile.mkdtemp(prefix="tp-bpffs-")
        # The agent's store of the lab (EBPF_TPROXY_STATE_DIR in env()): the host's
        # /var/lib/ebpf-tproxy is never read or written by a lab install or uninstall.
        self.state_dir = tempfile.mkdtemp(prefix=f"tp-{self.id}-state-")
        sh("mount", "-t", "bpf", "bpf", self.bpffs)

    def _enable_conntrack(self):
        """What Docker, kube-proxy, firewalld, ufw and Kuma's own --drop-invalid-packets put
        in a namespace: a rule that needs connection tracking, which from then on tracks
        every connection of the namespace and answers SO_ORIGINAL_DST for each of them."""
        for ns in (self.app_ns, self.remote_ns):
            for tool in ("iptables", "ip6tables"):
                for chain in ("OUTPUT", "INPUT"):
                    sh("nsenter", f"--net=/run/netns/{ns}", tool, "-w", "-A", chain, "-m",
                       "conntrack", "--ctstate", "INVALID", "-j", "DROP")

    def add_netns(self):
        """Another namespace in the lab (loopback up, nothing else), removed by close()."""
        ns = f"tp-{self.id}-x{len(self.extra_ns)}"
        sh("ip", "netns", "add", ns)
        self.extra_ns.append(ns)
        self.ip(ns, "link", "set", "lo", "up")
        return ns

    def child_cgroup(self, name):
        """A child of the lab's cgroup (a nested instance's), removed by close()."""
        path = os.path.join(self.cgroup, name)
        os.mkdir(path)
        self.child_cgroups.append(path)
        return path

    def sibling_cgroup(self, name):
        """A cgroup beside the lab's (not captured), removed by close()."""
        path = f"{self.cgroup}-{name}"
        os.mkdir(path)
        self.sibling_cgroups.append(path)
        return path

    def ip(self, ns, *args):
        return sh("ip", "-n", ns, *args)

    # ------------------------------------------------------------------ run
    def command(self, argv, ns=None, user=None, in_cgroup=True, resolv=None):
        """argv wrapped to run in the netns (and as user), for Popen(preexec_fn=...).
        resolv: a file seen as /etc/resolv.conf by the command (in a mount namespace of
        its own), so the lab's resolvers never touch the host's."""
        ns = ns or self.app_ns
        wrapped = ["nsenter", f"--net=/run/netns/{ns}"]
        if resolv:
            wrapped += ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount --bind "$0" /etc/resolv.conf && exec "$@"', resolv]
        if user is not None:
            try:
                ent = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
                uid, gid = ent.pw_uid, ent.pw_gid
            except KeyError:
                if not isinstance(user, int):
                    raise
                uid = gid = user   # a pod's uid (Kuma's 5678): no entry on the host
            wrapped += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        return wrapped + list(argv)

    def _preexec(self, in_cgroup):
        """in_cgroup: True for the lab's cgroup, False for none, or a cgroup path."""
        cg = in_cgroup if isinstance(in_cgroup, str) else self.cgroup

        def join():
            os.setsid()
            if in_cgroup:
                with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                    f.write("0")
        return join

    def spawn(self, argv, ns=None, user=None, in_cgroup=True, ready=b"ready", **kw):
        """Start a long-running lab process; wait for its 'ready' line."""
        p = subprocess.Popen(self.command(argv, ns, user), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, preexec_fn=self._preexec(in_cgroup),
                             env=self.env(), **kw)
        self.procs.append(p)
        if ready:
            line = p.stdout.readline()
            if ready not in line:
                err = p.stderr.read1(4096) if p.poll() is not None else b""
                raise RuntimeError(f"{argv} did not start: {line!r} {err!r}")
        return p

    def start_agent(self, *extra, ns=None, cgroup=False, private_cgroupns=False):
        """`ebpf-tproxy agent` on the lab's bpffs and store, its metrics on a free loopback
        port, in namespace ns (None: this process's). Waits for its ready line (after the
        node set's build: seconds here, minutes in an emulated guest). Returns (process,
        log path, metrics port). cgroup: a cgroup path to start it in (False: this
        process's); private_cgroupns: in a cgroup namespace of its own rooted there, as a
        container is."""
        if self.tmpdir is None:
            self.shared_file("agent-logs", "")   # makes the lab's directory
        log_path = os.path.join(self.tmpdir, f"agent-{len(self.procs)}.log")
        argv = [PYTHON, "-m", "loader.cli", "agent", "--ebpf-bpffs-path", self.bpffs,
                "--state-dir", self.state_dir, "--metrics-address", "127.0.0.1:0", *extra]
        with open(log_path, "w") as log:
            if private_cgroupns:
                argv = ["unshare", "--cgroup", *argv]
            p = subprocess.Popen(self.command(argv, ns) if ns else argv,
                                 stdout=subprocess.DEVNULL, stderr=log,
                                 preexec_fn=self._preexec(cgroup), env=self.env())
        self.procs.append(p)

        def text():
            with open(log_path) as f:
                return f.read()

        def started():
            if p.poll() is not None:
                raise RuntimeError(f"the agent exited with {p.returncode}: {text()}")
            return " ready: " in text() or '"event": "ready"' in text()
        self.wait_for(started, "the agent's ready line", timeout=900)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", text()).group(1))
        return p, log_path, port

    def run(self, argv, ns=None, user=None, in_cgroup=True, timeout=120, check=False,
            resolv=None):
        return subprocess.run(self.command(argv, ns, user, resolv=resolv),
                              capture_output=True, text=True,
                              preexec_fn=self._preexec(in_cgroup), timeout=timeout,
                              env=self.env(), check=check)

    def wait_listening(self, port, ns=None, proc=None, timeout=60.0):
        """Wait until something listens on TCP port in the netns (read from the kernel's
        socket table, so no connection is made that a proxy could mistake for traffic).
        The limit is generous: HAProxy took over 10 s to start in an emulated guest (make
        kernels, three guests on two cores); waiting costs nothing when it is up sooner."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode} before listening on {port}:"
                                   f" {proc.stderr.read().decode(errors='replace')[-500:]}")
            r = sh("nsenter", f"--net=/run/netns/{ns or self.app_ns}", "ss", "-Hltn",
                   f"sport = :{port}", check=False)
            if r.stdout.strip():
                return
            time.sleep(0.05)   # polling the socket table
        raise TimeoutError(f"nothing listens on port {port} after {timeout}s")

    @staticmethod
    def wait_for(condition, what, timeout=60.0):
        """Poll condition() until true; TimeoutError naming what was awaited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.05)   # polling state only the kernel can tell
        raise TimeoutError(f"{what}: not after {timeout}s")

    def shared_file(self, name, text):
        """A file lab processes running as other users can read (in the lab's own dir)."""
        if self.tmpdir is None:
            self.tmpdir = tempfile.mkdtemp(prefix=f"tp-{self.id}-")
            os.chmod(self.tmpdir, 0o755)
        path = os.path.join(self.tmpdir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)
        return path

    def env(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = PROJECT_DIR + os.pathsep + env.get("PYTHONPATH", "")
        if self.state_dir:
            env["EBPF_TPROXY_STATE_DIR"] = self.state_dir
        return env

    def py(self, *args, **kw):
        """Run `python -m loader.lab.servers ARGS` in the lab."""
        return self.run([PYTHON, "-m", "loader.lab.servers", *args], **kw)

    def tproxy(self, *args, netns=True, **kw):
        """Run the ebpf-tproxy CLI from the host, aimed at the lab (app netns, cgroup, bpffs)."""
        argv = [PYTHON, "-m", "loader.cli", *args]
        if netns and args and args[0] == "install":
            argv += ["--netns", self.app_ns]
        if args and args[0] in ("install", "status", "uninstall") and \
                not any(a.startswith("--ebpf-bpffs-path") for a in args):
            argv += ["--ebpf-bpffs-path", self.bpffs]
        if args and args[0] == "install" and \
                not any(a.startswith("--ebpf-cgroup-path") for a in args):
            argv += ["--ebpf-cgroup-path", self.cgroup]
        kw.setdefault("env", self.env())
        # An install builds the node set: over 90 s in an emulated guest (make kernels).
        kw.setdefault("timeout", 300)
        return subprocess.run(argv, capture_output=True, text=True, **kw)

    # ------------------------------------------------------------------ teardown
    def close(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)   # spawn() made it a group leader
                except ProcessLookupError:
                    p.kill()
            p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                if f:
                    f.close()
        self.procs = []
        for cg in reversed(self.child_cgroups):
            self.kill_cgroup(cg)
        self.child_cgroups = []
        self.kill_cgroup(self.cgroup)
        for cg in self.sibling_cgroups:
            self.kill_cgroup(cg)
        self.sibling_cgroups = []
        if self.bpffs:
            if kernel.is_bpffs(self.bpffs):
                # Detach whatever an aborted test left attached, then drop the mount.
                from .. import lifecycle, pinfs
                try:
                    lifecycle.uninstall(self.bpffs, everything=True)
                except pinfs.UnsafeTree:
                    # A test planted another user's directory or a symlink and failed
                    # before removing it: do what the refusal tells the operator to do.
                    _make_root_only(os.path.join(self.bpffs, "ebpf-tproxy"))
                    lifecycle.uninstall(self.bpffs, everything=True)
                sh("umount", self.bpffs, check=False)
            # An agent killed in the lab leaves its (unlocked) lock file behind.
            from .. import lifecycle
            with contextlib.suppress(OSError):
                os.unlink(lifecycle.agent_lock_path(self.bpffs))
            with contextlib.suppress(OSError):
                os.rmdir(lifecycle.MOUNT_MARKER_DIR)
            shutil.rmtree(self.bpffs, ignore_errors=True)
            self.bpffs = None
        for ns in (self.app_ns, self.remote_ns, *self.extra_ns):
            sh("ip", "netns", "del", ns, check=False)
        self.extra_ns = []
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        if self.state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None

    def kill_cgroup(self, cgroup):
        """Kill the processes of one cgroup (not its children) and remove it."""
        if not os.path.isdir(cgroup):
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(os.path.join(cgroup, "cgroup.procs")) as f:
                    pids = [int(x) for x in f.read().split()]
            except FileNotFoundError:
                return
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)   # polling for the kernel to reap the killed processes
        try:
            os.rmdir(cgroup)
        except OSError:
            pass

