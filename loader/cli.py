"""ebpf-tproxy: the command line (check, install, status, uninstall, demo).

Flags, config keys and KUMA_TRANSPARENT_PROXY_* variables are Kuma's; see
docs/kuma-compatibility.md. Bad input exits 2 with one line and touches nothing.
"""
import json
import os
import sys

import click

from . import config, kernel, lifecycle, namespace, netns, node, seams, store
from . import trace as tracing
from .config import ConfigError

EXIT_BAD_INPUT = 2
STATE_DIR_ENV = "EBPF_TPROXY_STATE_DIR"   # --state-dir of install, uninstall and agent
EXIT_FAILED = 1


def fail(msg, code=EXIT_BAD_INPUT):
    click.echo(f"ebpf-tproxy: error: {msg}", err=True)
    sys.exit(code)


def progress(msg):
    click.echo(f"  - {msg}", err=True)


def enter_netns(value):
    """--netns: act on a named network namespace (or a /proc/PID/ns/net path) without
    `ip netns exec`, which remounts /sys and hides the cgroup2 and bpffs mounts."""
    if value is None:
        return
    try:
        netns.enter(netns.resolve(value))
    except ConfigError as e:
        fail(str(e))


def _netns_to_store(value):
    """The path the store keeps for the namespace install acts on (--store)."""
    if value is not None:
        return store.stable_netns_path(netns.resolve(value))
    here = netns.current_inode()
    if here == netns.inode_of(netns.HOST):
        return netns.HOST
    found = netns.find(here)
    if found and found.startswith("/run/netns/"):
        return found
    raise ConfigError("--store: this network namespace has no name in /run/netns, so the "
                      "agent could not find it again; pass --netns with its path")


def check_bpffs_path(path):
    """--ebpf-bpffs-path: a bpffs, or a directory install may mount one on (exit 2)."""
    if not kernel.is_bpffs(path) and (not os.path.isdir(path) or os.path.islink(path)):
        raise ConfigError(f"--ebpf-bpffs-path: {path} is not a directory; give a bpffs mount "
                          "point, or a directory to mount one on (default /sys/fs/bpf)")


def _checked(check):
    """A click callback: the value through check (a ConfigError is one line, exit 2)."""
    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            return check(value, "--" + param.name.replace("_", "-"))
        except ConfigError as e:
            fail(str(e))
    return callback


def _bpffs_path(value, what):
    path = config.parse_path(value, what)
    check_bpffs_path(path)
    return path


def need_privileges():
    priv = kernel.check_privileges()
    if not priv.ok:
        fail(f"{priv.detail}: {priv.fix}")


# Optional-value booleans: Kuma users write both "--redirect-inbound" and
# "--redirect-inbound=false".
def bool_option(name, help):
    return click.option(name, is_flag=False, flag_value="true", default=None,
                        metavar="[=BOOL]", help=help)


# The agent's store, for install (--store), uninstall (forgets) and the agent alike.
STATE_DIR_OPTION = click.option(
    "--state-dir", default=store.DEFAULT_STATE_DIR, show_default=True, envvar=STATE_DIR_ENV,
    callback=_checked(config.parse_path),
    help=f"The agent's store of configurations (env {STATE_DIR_ENV}).")


KUMA_OPTIONS = [
    click.option("--config", "config_files", multiple=True, metavar="FILE",
                 help="Kuma config file (YAML or JSON), repeatable or comma list; - is stdin."),
    click.option("--kuma-dp-user", help="Name or uid the proxy runs as (default: uid 5678, "
                 "else user kuma-dp)."),
    click.option("--redirect-outbound-port", help="Proxy's outbound listener (default 15001)."),
    click.option("--redirect-inbound-port", help="Proxy's inbound listener (default 15006)."),
    bool_option("--redirect-inbound", "Capture connections from other hosts for the "
                "inbound port (default true; gateways use --redirect-inbound=false)."),
    click.option("--exclude-outbound-ports", multiple=True, metavar="PORTS",
                 help="Comma list of ports sent direct; repeated flag: last wins."),
    click.option("--exclude-outbound-ips", multiple=True, metavar="CIDRS",
                 help="IPs/CIDRs sent direct; repeatable and comma lists."),
    click.option("--exclude-outbound-ports-for-uids", multiple=True,
                 metavar="[PROTO:][PORTS:]UIDS",
                 help="Ports sent direct for these uids, e.g. tcp:53,3000-5000:106-108; "
                 "repeatable."),
    click.option("--exclude-inbound-ports", multiple=True, metavar="PORTS",
                 help="Comma list of ports delivered to the application directly (default "
                 "22); repeated flag: last wins."),
    click.option("--exclude-inbound-ips", multiple=True, metavar="CIDRS",
                 help="Source IPs/CIDRs delivered directly; repeatable and comma lists."),
    bool_option("--redirect-dns", "Send UDP 53 to resolv.conf's nameservers to the DNS "
                "port (kuma-dp's DNS server)."),
    bool_option("--redirect-all-dns-traffic", "Send all UDP 53 to the DNS port (exclusive "
                "with --redirect-dns)."),
    click.option("--redirect-dns-port", help="kuma-dp's DNS server port (default 15053)."),
    click.option("--ip-family-mode", help="dualstack (default) or ipv4."),
    bool_option("--ebpf-enabled", "Accepted for Kuma compatibility; always true here."),
    click.option("--ebpf-cgroup-path", help="cgroup2 directory whose processes are captured "
                 "(default: the cgroup2 mount's root)."),
    click.option("--ebpf-bpffs-path", help="bpffs mount for the pins (default /sys/fs/bpf; "
                 "mounted if absent)."),
    click.option("--ebpf-instance-ip", help="The host's/pod's address the proxy sees as "
                 "the source of redirected IPv4 connections (IPv6 ones keep ::1; README, "
                 "Differences from iptables). Default: from netlink."),
    click.option("--ebpf-tc-attach-iface", help="(not used: no tc program)"),
    click.option("--ebpf-programs-source-path", help="(not used: programs are built in)"),
    click.option("--ebpf-accelerate", is_flag=False, flag_value="true", default=None,
                 metavar="[=auto|BOOL]",
                 help="Move bytes between captured applications and the local proxy socket "
                 "to socket (sockmap), skipping TCP/IP. Default auto: on where the kernel "
                 "supports it (5.15+); true refuses a kernel without it; false turns it off."),
    click.option("--vnet", multiple=True, help="(refused: not implemented)"),
    # iptables-only switches: accepted so Kuma invocations keep working; each prints what
    # it means here.
    bool_option("--store", "Keep this configuration in the agent's store (--state-dir): "
                "the agent applies it again after a reboot or a crash. Kuma's "
                "--store-firewalld means the same here."),
    bool_option("--store-firewalld", "Same as --store (Kuma's name: firewalld keeps "
                "iptables rules across reboots)."),
    STATE_DIR_OPTION,
    bool_option("--redirect-inbound-insert-instead-of-append", "(iptables only)"),
    bool_option("--redirect-outbound-insert-instead-of-append", "(iptables only)"),
    bool_option("--skip-dns-conntrack-zone-split", "(iptables only)"),
    bool_option("--iptables-logs", "(iptables only; see the counters of status)"),
    bool_option("--disable-comments", "(iptables only)"),
    bool_option("--drop-invalid-packets", "(iptables only)"),
    click.option("--max-retries", help="(iptables only)"),
    click.option("--sleep-between-retries", help="(iptables only)"),
    click.option("--iptables-executables", help="(iptables only)"),
    click.option("--wait", help="(iptables only)"),
    click.option("--wait-interval", help="(iptables only)"),
    click.option("--name", default="default", show_default=True,
                 help="Name of this namespace's registration in the node program set "
                      "(one per network namespace)."),
    click.option("--netns", help="Network namespace to act on (name in /run/netns or a "
                 "path); default: the one this command runs in."),
    click.option("--dry-run", is_flag=True, default=None,
                 help="Print the plan (programs, attach points, map contents); change nothing."),
    click.option("--verbose", is_flag=True, default=None, help="Show each step."),
    click.option("--explain", is_flag=True, help="With --dry-run: also print the iptables "
                 "rules Kuma would write for this configuration (what the programs stand "
                 "in for)."),
]

FLAG_PATHS = {
    "kuma_dp_user": "kumaDPUser",
    "redirect_outbound_port": "redirect.outbound.port",
    "redirect_inbound_port": "redirect.inbound.port",
    "redirect_inbound": "redirect.inbound.enabled",
    "exclude_outbound_ips": "redirect.outbound.excludePortsForIPs",
    "exclude_outbound_ports_for_uids": "redirect.outbound.excludePortsForUIDs",
    "exclude_inbound_ips": "redirect.inbound.excludePortsForIPs",
    "redirect_dns": "redirect.dns.enabled",
    "redirect_all_dns_traffic": "redirect.dns.captureAll",
    "redirect_dns_port": "redirect.dns.port",
    "ip_family_mode": "ipFamilyMode",
    "ebpf_enabled": "ebpf.enabled",
    "ebpf_cgroup_path": "ebpf.cgroupPath",
    "ebpf_bpffs_path": "ebpf.bpffsPath",
    "ebpf_instance_ip": "ebpf.instanceIP",
    "ebpf_tc_attach_iface": "ebpf.tcAttachIface",
    "ebpf_programs_source_path": "ebpf.programsSourcePath",
    "ebpf_accelerate": "ebpf.accelerate",
    "vnet": "redirect.vnet.networks",
    "store_firewalld": "storeFirewalld",
    "store": "storeFirewalld",
    "redirect_inbound_insert_instead_of_append": "redirect.inbound.insertRedirectInsteadOfAppend",
    "redirect_outbound_insert_instead_of_append":
        "redirect.outbound.insertRedirectInsteadOfAppend",
    "skip_dns_conntrack_zone_split": "redirect.dns.skipConntrackZoneSplit",
    "iptables_logs": "log.enabled",
    "disable_comments": "comments.disabled",
    "drop_invalid_packets": "dropInvalidPackets",
    "max_retries": "retry.maxRetries",
    "sleep_between_retries": "retry.sleepBetweenRetries",
    "iptables_executables": "iptablesExecutables",
    "wait": "wait",
    "wait_interval": "waitInterval",
    "dry_run": "dryRun",
    "verbose": "verbose",
}
# Kuma: a repeated port-list flag replaces the earlier one instead of adding to it.
LAST_WINS = {"exclude_outbound_ports": "redirect.outbound.excludePorts",
             "exclude_inbound_ports": "redirect.inbound.excludePorts"}


def flags_from(kwargs):
    dns, dns_all = kwargs.get("redirect_dns"), kwargs.get("redirect_all_dns_traffic")
    if dns and dns_all and config.parse_bool(dns, "--redirect-dns") and \
            config.parse_bool(dns_all, "--redirect-all-dns-traffic"):
        raise ConfigError("--redirect-dns and --redirect-all-dns-traffic are exclusive: "
                          "choose resolv.conf's nameservers only, or all UDP 53")
    flags = {}
    for key, path in FLAG_PATHS.items():
        val = kwargs.get(key)
        if val is None or val == ():
            continue
        flags[path] = list(val) if isinstance(val, tuple) else val
    for key, path in LAST_WINS.items():
        if kwargs.get(key):
            flags[path] = kwargs[key][-1]
    return flags


def with_options(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return deco


bpffs_option = click.option("--ebpf-bpffs-path", default="/sys/fs/bpf", show_default=True,
                            callback=_checked(_bpffs_path),
                            help="bpffs mount holding the node program set's pins.")
output_option = click.option("--output", type=click.Choice(["table", "json"]), default="table",
                             show_default=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ebpf-tproxy")
def main():
    """Kuma-compatible transparent proxy redirect with eBPF cgroup hooks.

    \b
    Example:
      ebpf-tproxy check
      ebpf-tproxy install --kuma-dp-user kuma-dp --ebpf-cgroup-path /sys/fs/cgroup/unified/app
      ebpf-tproxy status
      ebpf-tproxy uninstall
    """


@main.command()
@click.option("--ebpf-cgroup-path", callback=_checked(config.parse_path),
              help="cgroup the install would target.")
@click.option("--ebpf-bpffs-path", default="/sys/fs/bpf", show_default=True,
              callback=_checked(config.parse_path), help="bpffs mount install would use.")
@output_option
def check(ebpf_cgroup_path, ebpf_bpffs_path, output):
    """Check that install can succeed here: kernel, mounts, privileges, BCC, hooks.

    \b
    Example:
      ebpf-tproxy check
      ebpf-tproxy check --output json
    Exits 0 only if every required check passes.
    """
    from . import probe
    from .programs import PROGRAMS
    checks = [kernel.check_kernel_version(), kernel.check_cgroup2(ebpf_cgroup_path),
              kernel.check_bpffs(ebpf_bpffs_path), kernel.check_privileges(),
              kernel.check_bcc(), kernel.check_headers()]
    ready = all(c.ok for c in checks)
    if ready and checks[0].ok:
        progress("probing each hook by loading a tiny program")
        try:
            for feature, ok, err, progs in probe.probe_hooks():
                mine = [p for p in PROGRAMS if p.name in progs]
                required = any(p.required for p in mine)
                if ok:
                    fix = ""
                elif required:
                    fix = "this kernel lacks a hook install needs"
                elif mine:
                    fix = f"without it, {mine[0].missing_means}"
                else:
                    fix = probe.FEATURE_FALLBACK[feature]
                checks.append(kernel.Check(feature, ok, (err or "loads") if ok else err, fix,
                                           required=required))
        except Exception as e:
            checks.append(kernel.Check("BPF compile", False, str(e).splitlines()[0],
                                       "run 'make setup' (headers, python3-bpfcc)"))
    ok = all(c.ok or not c.required for c in checks)
    if output == "json":
        click.echo(json.dumps({"ok": ok, "checks": [vars(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            mark = "✓" if c.ok else ("✗" if c.required else "!")
            line = f"{mark} {c.name:<44} {c.detail}"
            click.echo(line + (f"\n    fix: {c.fix}" if c.fix and not c.ok else ""))
        click.echo("ready to install" if ok else "not ready: fix the ✗ lines above")
    sys.exit(0 if ok else EXIT_FAILED)


@main.command()
@with_options(KUMA_OPTIONS)
def install(**kw):
    """Register this network namespace for capture (or update it in place).

    Outbound TCP connections of the namespace's processes in --ebpf-cgroup-path land on
    the proxy's outbound port, TCP connections from other hosts on its inbound port, and
    (with --redirect-dns) DNS queries on the DNS port, exactly as Kuma's iptables rules
    would send them; the proxy's getsockopt(SO_ORIGINAL_DST) returns the original
    destination. The first install on a bpffs builds the node program set (BCC); every
    later one, for any namespace or configuration, only writes map entries (a newer
    ebpf-tproxy builds once more and swaps the programs in place); no connection is left
    uncaptured.

    \b
    Example:
      ebpf-tproxy install --kuma-dp-user kuma-dp \\
          --ebpf-cgroup-path /sys/fs/cgroup/unified/app \\
          --exclude-outbound-ports 22 --exclude-outbound-ips 10.0.0.0/8
      ebpf-tproxy install --config tproxy.yaml --dry-run --explain
      KUMA_TRANSPARENT_PROXY_REDIRECT_DNS_RESOLV_CONFIG_PATH=/etc/netns/pod1/resolv.conf \\
        nsenter --net=/run/netns/pod1 ebpf-tproxy install --redirect-dns \\
          --ebpf-cgroup-path /sys/fs/cgroup/unified/pod1 --name pod1
    """
    # kuma-init parity: in a pod's init container (the API server's variables are set and
    # neither --name nor --netns is given) every pod would be "default": each is named by
    # its network namespace instead, and the proxy's uid need not exist in this image.
    ctx = click.get_current_context()
    in_pod = "KUBERNETES_SERVICE_HOST" in os.environ and kw["netns"] is None and \
        ctx.get_parameter_source("name") == click.core.ParameterSource.DEFAULT
    name = f"pod-{netns.current_inode()}" if in_pod else kw["name"]
    try:
        settings, warnings = config.load(kw["config_files"], flags=flags_from(kw),
                                         name=name, pod_uid=in_pod)
        warnings += namespace.dns_servers(settings)[1]
        for w in warnings:
            click.echo(f"ebpf-tproxy: note: {w}", err=True)
        cgroup = kernel.resolve_cgroup(settings.cgroup_path)
        check_bpffs_path(settings.bpffs_path)
        state_dir = kw["state_dir"]
        store.check_dir(state_dir)
    except ConfigError as e:
        fail(str(e))
    enter_netns(kw["netns"])
    stored_as = None
    if settings.store and not settings.dry_run:
        try:
            stored_as = _netns_to_store(kw["netns"])
        except ConfigError as e:
            fail(str(e))
    verbose = settings.verbose
    if settings.dry_run:
        from . import bpfsys, netinfo
        try:
            p = namespace.plan(settings, netinfo.local_networks(),
                               netinfo.default_instance_ips(), cgroup, bpfsys.netns_cookie())
        except ConfigError as e:
            fail(str(e))
        p["maps"] = namespace.map_contents(settings, p)
        p["pins"] = node.NodePaths(settings.bpffs_path).node
        click.echo(config.dump_json(p))
        if kw["explain"]:
            from . import iptables_oracle
            for fam, tool in ((4, "iptables"), (6, "ip6tables")):
                if fam == 4 or settings.ipv6:
                    click.echo(f"\n# {tool}-restore equivalent (Kuma's rules)")
                    click.echo(iptables_oracle.rules(settings, fam, p["dns_servers"]), nl=False)
        return
    ver = kernel.check_kernel_version()
    if not ver.ok:
        fail(f"{ver.detail}: {ver.fix}")
    need_privileges()
    unstored = []

    class StoreFailed(RuntimeError):
        pass

    def record(p):
        # Under the install's bpffs lock: the agent, which checks the store under the same
        # lock, never applies a stored configuration this install has just replaced.
        try:
            if stored_as:
                store.save(state_dir, settings.name, stored_as, settings)
            elif store.forget(state_dir, settings.name):
                unstored.append(settings.name)
        except (ConfigError, OSError) as e:
            raise StoreFailed(f"installed {settings.name!r}, but the store in {state_dir} "
                              f"could not be updated: {e}") from None
    try:
        p = lifecycle.install(settings, cgroup, progress=progress if verbose else None,
                              then=record)
    except StoreFailed as e:
        fail(str(e), EXIT_FAILED)
    except ConfigError as e:
        fail(str(e))
    except (kernel.HostError, node.InstallError, seams.SeamFailure) as e:
        fail(str(e), EXIT_FAILED)
    except OSError as e:
        fail(f"install failed and was rolled back: {e}", EXIT_FAILED)
    for w in p.get("warnings", []):
        click.echo(f"ebpf-tproxy: warning: {w}", err=True)
    if in_pod and not lifecycle.agent_running(settings.bpffs_path):
        click.echo(f"ebpf-tproxy: note: no ebpf-tproxy agent serves {settings.bpffs_path} (or "
                   f"{lifecycle.MOUNT_MARKER_DIR} is not shared with this container): the "
                   "pod is captured, but its address changes are not followed and, once "
                   "the pod is gone, its entries wait for the next install, status or "
                   "uninstall on this node; deploy the ebpf-tproxy DaemonSet", err=True)
    if unstored:
        # The store says what is installed: the agent applies it again after a reboot.
        click.echo(f"ebpf-tproxy: note: {settings.name!r} is no longer stored (installed "
                   "without --store); the agent will not apply it after a reboot", err=True)
    inbound = (f", inbound TCP from other hosts -> port {settings.inbound_port}"
               if settings.inbound_enabled else "")
    click.echo(f"installed {settings.name!r} (network namespace {p['netns_cookie']}, node "
               f"program set on {p.get('attached_at', cgroup)}): outbound TCP -> "
               f"port {settings.outbound_port}{inbound} (DP user {settings.dp_user}, uid "
               f"{settings.dp_uid}, source {p['instance_ip4'] or '-'}"
               f"{' / ' + p['instance_ip6'] if p['instance_ip6'] else ''}), "
               f"sockmap acceleration {p.get('acceleration', 'off')}")


def _size(n):
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


@main.command()
@click.option("--name", callback=_checked(config.check_name),
              help="Only this namespace's registration.")
@bpffs_option
@output_option
def status(name, ebpf_bpffs_path, output):
    """Show the node program set and every registered namespace: attach points,
    configuration, counters, map memory. Namespaces found deleted are removed.

    \b
    Example:
      ebpf-tproxy status
      ebpf-tproxy status --name default --output json
    Exits 1 when something is wrong (a link detached, a map unreadable, an install that
    did not finish: each a PROBLEM line), 0 otherwise.
    """
    from .status import status as node_status
    need_privileges()
    try:
        entries = node_status(ebpf_bpffs_path, name)
    except ConfigError as e:
        fail(str(e))
    except (node.InstallError, OSError) as e:
        fail(f"cannot read the node program set: {e}", EXIT_FAILED)
    problems = any(e.get("problems") for e in entries)
    if output == "json":
        click.echo(json.dumps(entries, indent=2))
    elif not entries:
        click.echo("no namespace registered" + (f" as {name!r}" if name else ""))
    else:
        shown_node = False
        for e in entries:
            meta = e.get("meta") or {}
            nd = e.get("node")
            if nd and not shown_node:
                shown_node = True
                click.echo(f"node program set {nd.get('digest')} (ebpf-tproxy "
                           f"{nd.get('version')}, ABI {nd.get('abi')}): attached to "
                           f"{', '.join(nd.get('cgroups') or []) or 'no cgroup'}")
                click.echo(f"  programs      {', '.join(nd.get('programs') or [])}")
                if nd.get("features"):
                    click.echo(f"  features      {', '.join(nd['features'])}")
            if e.get("removed"):
                click.echo(f"namespace {e['name']}: {e.get('note')}")
                continue
            click.echo(f"namespace {e['name']}")
            labels = meta.get("labels") or {}
            if labels:   # who registered it (the CNI plugin: its pod and attachment)
                click.echo(f"  registered by {labels.get('owner', '?')}: " + ", ".join(
                    f"{k} {v}" for k, v in sorted(labels.items()) if k != "owner"))
            click.echo(f"  cgroup        {meta.get('cgroup', '?')}"
                       + (f" (through {meta['attached_at']})"
                          if meta.get("attached_at") not in (None, meta.get("cgroup")) else ""))
            click.echo(f"  netns cookie  {meta.get('netns_cookie', '?')}  (inode "
                       f"{meta.get('netns_inode', '?')}, generation "
                       f"{e.get('active_generation')})")
            click.echo(f"  source IPs    {meta.get('instance_ip4') or '-'} "
                       f"{meta.get('instance_ip6') or ''}")
            red = meta.get("config", {}).get("redirect", {})
            out, inb = red.get("outbound", {}), red.get("inbound", {})
            click.echo(f"  outbound      port {out.get('port')}  exclude ports "
                       f"[{out.get('excludePorts')}]  exclude IPs "
                       f"{out.get('excludePortsForIPs')}  uids {out.get('excludePortsForUIDs')}")
            if inb.get("enabled"):
                lst = e.get("inbound_listeners") or {}
                click.echo(f"  inbound       port {inb.get('port')}  exclude ports "
                           f"[{inb.get('excludePorts')}]  exclude IPs "
                           f"{inb.get('excludePortsForIPs')}"
                           + (f"  include ports [{inb['includePorts']}]"
                              if inb.get("includePorts") else ""))
                click.echo("  proxy listener " + (", ".join(
                    f"{fam} (socket cookie{'s' if len(cs) > 1 else ''} "
                    f"{', '.join(map(str, cs))})" for fam, cs in lst.items())
                    or "none registered: inbound connections are refused until the proxy "
                       "listens"))
            else:
                click.echo("  inbound       not captured (redirect.inbound.enabled=false)")
            dns = red.get("dns", {})
            if dns.get("enabled"):
                which = "all UDP 53" if dns.get("captureAll") else \
                    "UDP 53 to " + (", ".join(meta.get("dns_servers") or []) or "no nameserver")
                click.echo(f"  dns           {which} -> port {dns.get('port')}")
            else:
                click.echo("  dns           not captured")
            for ln, info in e["links"].items():
                click.echo(f"  link {ln:<22} link id {info.get('link_id')}  prog id "
                           f"{info.get('prog_id')}")
            click.echo(f"  handshakes in flight {e.get('tracked_connections')} (tp_conns; "
                       "answers then live with the proxy's sockets)")
            if (meta.get("config") or {}).get("ebpf", {}).get("accelerate"):
                click.echo(f"  accelerated sockets  {e.get('accelerated_sockets')}")
            mem = e.get("map_memory_bytes") or {}
            if mem:
                click.echo(f"  map memory    ~{_size(sum(mem.values()))} (estimated; "
                           + ", ".join(f"{k} {_size(v)}" for k, v in mem.items() if v) + ")")
            counters = {k: v for k, v in (e.get("counters") or {}).items() if v}
            click.echo("  counters      " + (", ".join(f"{k}={v}" for k, v in counters.items())
                                             or "all zero"))
            if e.get("tracing"):
                click.echo("  tracing       on: 'ebpf-tproxy trace' is showing its decisions")
            for note in e.get("notes", []):
                click.echo(f"  note: {note}")
            for prob in e["problems"]:
                click.echo(f"  PROBLEM: {prob}")
    sys.exit(EXIT_FAILED if problems else 0)


@main.command()
@click.option("--name", default="default", show_default=True,
              callback=_checked(config.check_name))
@click.option("--all", "all_", is_flag=True, help="Every namespace, and the node program set.")
@bpffs_option
@STATE_DIR_OPTION
def uninstall(name, all_, ebpf_bpffs_path, state_dir):
    """Remove one namespace's registration (the others keep capturing); with the last one,
    or --all, the node program set goes too: links, programs, maps and pins. Safe to run
    twice.

    \b
    Example:
      ebpf-tproxy uninstall --name pod1
      ebpf-tproxy uninstall --all
    """
    need_privileges()
    try:
        names = lifecycle.list_names(ebpf_bpffs_path) if all_ else [name]
        store.check_dir(state_dir)

        def forget():
            # Under the uninstall's bpffs lock (see install). --all: the namespaces stored
            # for this bpffs, not those another agent serves from another one.
            gone = []
            for n in (store.names(state_dir) if all_ else [name]):
                if all_ and not store.stored_for(state_dir, n, ebpf_bpffs_path):
                    continue
                if store.forget(state_dir, n):
                    gone.append(f"stored configuration of {n!r}")
            return gone
        removed = lifecycle.uninstall(ebpf_bpffs_path, None if all_ else name,
                                      everything=all_, then=forget)
    except ConfigError as e:
        fail(str(e))
    except (node.InstallError, OSError) as e:
        fail(str(e), EXIT_FAILED)
    which = ", ".join(repr(n) for n in names) or "everything"
    click.echo(f"uninstalled {which}: removed {len(removed)} objects" if removed
               else f"nothing to uninstall for {which}")


def _trace_uid(value, what):
    """--uid: a uid (a pod's user need not exist here) or a user name of this host."""
    import pwd
    v = value.strip()
    uid = config.parse_uint(v)   # ASCII digits only, as every number this tool reads
    if uid is None or uid >= 2**32 - 1:
        try:
            uid = pwd.getpwnam(v).pw_uid
        except KeyError:
            raise ConfigError(f"{what}: no user {v!r} on this host; give a uid or a user "
                              "name") from None
    try:
        return kernel.kernel_uid(uid)
    except kernel.HostError as e:
        raise ConfigError(f"{what}: {e}") from None


def _trace_pid(value, what):
    pid = config.parse_uint(value)
    if pid is None or not 0 < pid <= 2**22:   # pid_max is at most 2^22
        raise ConfigError(f"{what}: {value!r} is not a process id; give e.g. --pid 1234")
    return pid


@main.command()
@click.option("--name", callback=_checked(config.check_name),
              help="Only this registered namespace (default: every one, including those "
              "registered while tracing).")
@click.option("--pid", callback=_checked(_trace_pid), help="Only decisions made for this "
              "process (sk_lookup's have none; nor getsockopt's on 5.10).")
@click.option("--uid", callback=_checked(_trace_uid), help="Only this user's (uid or name).")
@click.option("--reason", callback=_checked(tracing.parse_reasons),
              help="Only these reasons, a comma list of the counter names 'status' shows.")
@click.option("--dst", callback=_checked(tracing.parse_dst), metavar="CIDR[:PORT]",
              help="Only this address asked for (inbound: dialed; SO_ORIGINAL_DST: the "
              "answer), e.g. 10.0.0.0/8:80, [fd00::/64]:443 or :53.")
@click.option("--count", type=click.IntRange(min=1), help="End after this many events.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="End after this long.")
@output_option
@bpffs_option
def trace(name, pid, uid, reason, dst, count, duration, output, ebpf_bpffs_path):
    """Show every capture decision as it happens: one line each, with the process, the
    address asked for, the decision (the counters' reason names) and where it was sent;
    inbound connections from sk_lookup with the client's address, and the proxy's
    SO_ORIGINAL_DST answers. Filters apply in the kernel. Tracing is switched on only
    for the namespaces traced, and off again when trace ends (Ctrl-C, --count,
    --duration, or killed: then by the next command or the agent).

    \b
    Example:
      ebpf-tproxy trace --name default --count 3
      TIME(s)    PID     COMM            UID    NAMESPACE    HOOK       PROTO ADDRESS                    PEER                       DECISION                     TO
      0.107      22644   python          0      default      connect4   tcp   198.18.0.2:8000            -                          redirected_outbound          127.0.0.1:15001
      0.107      22640   python          65534  default      getsockopt tcp   198.18.0.2:8000            198.18.0.1:40322           orig_dst_answered            proxy :15001
      0.552      -       -               -      default      sk_lookup  tcp   198.18.0.1:15006           198.18.0.2:44312           redirected_inbound           listener :15006
      ebpf-tproxy trace --reason redirected_inbound,inbound_refused_no_listener
      ebpf-tproxy trace --dst :53 --output json
    Lost events (the reader fell behind) are counted in the kernel and shown.
    """
    need_privileges()
    net, port = dst if dst else (None, None)
    flt = tracing.Filter(pid=pid, uid=uid, reasons=reason or (), dst=net, port=port)

    def on_event(d):
        click.echo(json.dumps(d) if output == "json" else tracing.text_line(d))

    def on_lost(n):
        click.echo(json.dumps({"lost": n}) if output == "json" else
                   f"LOST {n} events so far: the reader fell behind (tp_trace_lost)")

    if output != "json":
        click.echo(tracing.HEADER)
    try:
        shown, lost, kind = tracing.run(ebpf_bpffs_path, name, flt, count, duration,
                                        on_event, on_lost, progress)
        sys.stdout.flush()
    except BrokenPipeError:
        # The output's reader left (trace | head): Python's own flush at exit would say
        # so once more, on stderr.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    except ConfigError as e:
        fail(str(e))
    except (node.InstallError, OSError) as e:
        fail(str(e), EXIT_FAILED)
    progress(f"{shown} event{'s' * (shown != 1)} shown, {lost} lost"
             + (f" ({kind})" if kind else ""))


@main.command()
@bpffs_option
@STATE_DIR_OPTION
@click.option("--metrics-address", default="127.0.0.1:9590", show_default=True,
              help="HOST:PORT for /metrics (Prometheus), /healthz and /readyz; '' for none.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="One line per event on stderr; json for collectors.")
@click.option("--install-unit", is_flag=True,
              help="Write the systemd unit running this agent with these options, and exit.")
@click.option("--remove-unit", is_flag=True, help="Remove that unit file, and exit.")
@click.option("--unit-dir", default=None, metavar="DIR",
              help="Where --install-unit/--remove-unit write (default /etc/systemd/system).")
@click.option("--store-grace", type=int, default=600, show_default=True, metavar="SECONDS",
              help="How long a stored namespace that does not exist is waited for (made "
                   "after the agent started at boot) before it is dropped from the store.")
@click.option("--cni-socket", default="", metavar="PATH",
              help="Serve the CNI plugin's requests on this unix socket (the DaemonSet "
                   "uses /run/ebpf-tproxy/cni.sock); '' for none.")
def agent(ebpf_bpffs_path, state_dir, metrics_address, log_format, install_unit, remove_unit,
          unit_dir, store_grace, cni_socket):
    """Run the node agent: load the node program set once, apply stored configurations
    (after a reboot too), follow every registered namespace's addresses, remove namespaces
    that disappeared, reload on SIGHUP, serve metrics and health. Capture never depends on
    it: stop, restart or kill it at any time.

    \b
    Example:
      ebpf-tproxy agent                                  # in the foreground
      ebpf-tproxy agent --log-format json --metrics-address 127.0.0.1:9590
      ebpf-tproxy agent --install-unit && systemctl daemon-reload && \\
          systemctl enable --now ebpf-tproxy-agent
      curl -s 127.0.0.1:9590/metrics | grep ebpf_tproxy_decisions_total
      ebpf-tproxy agent --cni-socket /run/ebpf-tproxy/cni.sock   # serves the CNI plugin
    SIGHUP (systemctl reload) re-reads the store; SIGTERM stops it (the node program set
    goes too when no namespace is registered).
    """
    from . import agent as agent_mod, metrics, systemd
    if install_unit and remove_unit:
        fail("--install-unit and --remove-unit: choose one")
    try:
        if metrics_address:
            metrics.parse_address(metrics_address)
        if store_grace < 0:
            raise ConfigError(f"--store-grace: {store_grace} is negative; give seconds >= 0")
        if cni_socket:
            config.parse_path(cni_socket, "--cni-socket")
    except ConfigError as e:
        fail(str(e))
    if install_unit or remove_unit:
        d = unit_dir or systemd.UNIT_DIR
        if not os.path.isdir(d):
            fail(f"--unit-dir: {d} is not a directory; is systemd installed here?")
        try:
            if remove_unit:
                path = systemd.remove_unit(d)
                click.echo(f"removed {path}" if path else f"no {systemd.UNIT_NAME} in {d}")
                return
            args = ["--ebpf-bpffs-path", ebpf_bpffs_path, "--state-dir", state_dir,
                    "--metrics-address", metrics_address, "--log-format", log_format,
                    "--store-grace", str(store_grace)]
            if cni_socket:
                args += ["--cni-socket", cni_socket]
            path = systemd.install_unit(args, d, bpffs=ebpf_bpffs_path, state_dir=state_dir)
        except OSError as e:
            fail(f"cannot write in {d}: {e.strerror} (run as root)", EXIT_FAILED)
        click.echo(f"wrote {path}; start it with: systemctl daemon-reload && systemctl "
                   f"enable --now {systemd.UNIT_NAME}")
        return
    ver = kernel.check_kernel_version()
    if not ver.ok:
        fail(f"{ver.detail}: {ver.fix}")
    need_privileges()
    try:
        store.check_dir(state_dir, create=True)
    except ConfigError as e:
        fail(str(e))
    log = agent_mod.Log(log_format)
    a = agent_mod.Agent(ebpf_bpffs_path, state_dir, log, metrics_address or None,
                        store_grace=store_grace, cni_socket=cni_socket or None)
    try:
        a.start()
    except (ConfigError, agent_mod.AgentError) as e:
        fail(str(e))
    except (kernel.HostError, node.InstallError, OSError) as e:
        fail(f"the agent could not start: {e}", EXIT_FAILED)
    try:
        a.run()
    finally:
        a.close()


@main.group()
def cni():
    """The chained CNI plugin for Kubernetes nodes (type "ebpf-tproxy").

    \b
    Example:
      ebpf-tproxy cni install --cni-bin-dir /host/opt/cni/bin \\
          --cni-conf-dir /host/etc/cni/net.d
      ebpf-tproxy cni uninstall --cni-bin-dir /opt/cni/bin --cni-conf-dir /etc/cni/net.d
    The plugin asks the agent (ebpf-tproxy agent --cni-socket ...) to register each
    injected pod's network namespace; see README "Kubernetes".
    """


CNI_DIR_OPTIONS = [
    click.option("--cni-bin-dir", default="/opt/cni/bin", show_default=True,
                 help="Where the runtime finds CNI plugins."),
    click.option("--cni-conf-dir", default="/etc/cni/net.d", show_default=True,
                 help="Where the runtime reads network configurations."),
]


@cni.command("install")
@with_options(CNI_DIR_OPTIONS)
@click.option("--agent-socket", default="/run/ebpf-tproxy/cni.sock", show_default=True,
              help="The agent's CNI socket, as the node sees it.")
@click.option("--ebpf-bpffs-path", default="/sys/fs/bpf", show_default=True,
              help="The node's bpffs (as the agent sees it).")
@click.option("--ebpf-cgroup-path", default="",
              help="Where the node program set attaches (default: the cgroup2 root).")
@click.option("--kubeconfig", default="",
              help="For pods whose runtime passes no annotations: read them from the API.")
@click.option("--exclude-namespaces", default="kube-system", show_default=True,
              help="Kubernetes namespaces never captured (comma list).")
@click.option("--interval", type=float, default=1.0, show_default=True,
              help="Seconds between checks that the chain still holds the plugin.")
@click.option("--once", is_flag=True, help="Install and exit (no watch, no revert).")
@click.option("--ready-file", default="", help="Created once chained (a readiness probe).")
def cni_install(cni_bin_dir, cni_conf_dir, agent_socket, ebpf_bpffs_path, ebpf_cgroup_path,
                kubeconfig, exclude_namespaces, interval, once, ready_file):
    """Put the plugin into the CNI bin dir and chain it into the node's network
    configuration; keep it chained; revert both on SIGTERM (what Kuma's install-cni does).

    \b
    Example:
      KUMA_RUNTIME_KUBERNETES_SIDECAR_TRAFFIC_EXCLUDE_OUTBOUND_PORTS=22 \\
        ebpf-tproxy cni install --cni-bin-dir /host/opt/cni/bin \\
          --cni-conf-dir /host/etc/cni/net.d --ready-file /tmp/ready
    The KUMA_RUNTIME_KUBERNETES_* variables of its environment become the node's
    defaults for pods (the annotations of each pod override them).
    """
    from .cni import install as cni_inst
    try:
        for value, what in ((agent_socket, "--agent-socket"),
                            (ebpf_bpffs_path, "--ebpf-bpffs-path")):
            config.parse_path(value, what)
        if ebpf_cgroup_path:
            config.parse_path(ebpf_cgroup_path, "--ebpf-cgroup-path")
        if interval <= 0:
            raise ConfigError(f"--interval: {interval} is not a positive number of seconds")
    except ConfigError as e:
        fail(str(e))
    ours = cni_inst.entry(agent_socket, ebpf_bpffs_path, ebpf_cgroup_path, kubeconfig,
                          [n for n in exclude_namespaces.split(",") if n.strip()])
    try:
        cni_inst.run(cni_bin_dir, cni_conf_dir, ours, interval=interval, once=once,
                     say=lambda m: click.echo(f"ebpf-tproxy cni: {m}", err=True),
                     ready_file=ready_file or None)
    except cni_inst.InstallError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cni install failed: {e}", EXIT_FAILED)


@cni.command("uninstall")
@with_options(CNI_DIR_OPTIONS)
def cni_uninstall(cni_bin_dir, cni_conf_dir):
    """Remove the plugin from every network configuration of the conf dir (restoring a
    configuration it wrapped) and its binary from the bin dir.

    \b
    Example:
      ebpf-tproxy cni uninstall --cni-bin-dir /opt/cni/bin --cni-conf-dir /etc/cni/net.d
    """
    from .cni import install as cni_inst
    try:
        changed = cni_inst.revert(cni_conf_dir)
        gone = cni_inst.remove_binary(cni_bin_dir)
    except OSError as e:
        fail(f"cni uninstall failed: {e}", EXIT_FAILED)
    for path in changed:
        click.echo(f"reverted {path}")
    click.echo(f"removed {cni_bin_dir}/ebpf-tproxy" if gone else "no plugin binary to remove")


@main.command()
@click.option("--config", "--transparent-proxy-config", "config_files", multiple=True,
              metavar="FILE", help="The pod's Kuma config file (YAML or JSON), repeatable or "
              "comma list; - is stdin (Kuma's validator: --transparent-proxy-config).")
@click.option("--ip-family-mode", help="dualstack (default: IPv6 too where the pod has "
              "::1) or ipv4.")
@click.option("--validation-server-port", help="Port to listen on for the inbound check "
              "(default: the inbound port, 15006; with --config, the config's, as Kuma).")
@click.option("--timeout", default="10", show_default=True, metavar="SECONDS",
              help="Keep retrying a failed check this long (the CNI plugin may still be "
              "registering the pod).")
@click.option("--ebpf-bpffs-path", help="The node's bpffs, where mounted here, for the "
              "registration check (default /sys/fs/bpf).")
def validate(config_files, ip_family_mode, validation_server_port, timeout, ebpf_bpffs_path):
    """Check from inside a pod that its traffic is redirected (Kuma's validator).

    Run in the pod's network namespace before the application starts, as the sidecar's
    uid with no capabilities, as Kuma's kuma-validation init container runs `kumactl
    install transparent-proxy-validator`: the DP user's connection to 127.0.0.6 (::6) at a
    random port must land on a listener at the inbound port. Run as root it also checks
    that an application's connection is answered by SO_ORIGINAL_DST, and reads this
    namespace's registration from the node's bpffs when that is mounted.

    \b
    Example:
      setpriv --reuid 5678 --regid 5678 --clear-groups --inh-caps=-all \\
          --bounding-set=-all ebpf-tproxy validate --config /tmp/kuma/config.yaml
      nsenter --net=/run/netns/pod1 ebpf-tproxy validate --timeout 30
    Exits 0 when the redirect is in place; else one line naming what is missing and the
    fix, exit 1 (2 for bad input).
    """
    from . import validate as validate_mod
    try:
        seconds = float(timeout)
        if not 0 <= seconds <= 3600:
            raise ValueError
    except ValueError:
        fail(f"--timeout: {timeout!r} is not a number of seconds from 0 to 3600; give e.g. "
             "--timeout 10")
    if validation_server_port is not None:
        try:
            config.parse_port(validation_server_port, "--validation-server-port")
        except ConfigError as e:
            fail(str(e))
    # As Kuma's validator: with a config, its inbound port wins over the flag.
    if config_files:
        validation_server_port = None
    flags = {path: value for path, value in (
        ("ipFamilyMode", ip_family_mode), ("redirect.inbound.port", validation_server_port),
        ("ebpf.bpffsPath", ebpf_bpffs_path)) if value is not None}
    # Kuma's validator connects as whoever runs it: without a configured user that is the
    # sidecar's (root stays with Kuma's Kubernetes default, 5678).
    if os.geteuid() != 0 and not config_files and \
            "kumaDPUser" not in config.env_layer(os.environ):
        flags["kumaDPUser"] = str(os.geteuid())
    try:
        settings, _ = config.load(config_files, flags=flags, pod_uid=True)
    except ConfigError as e:
        fail(str(e))
    if os.geteuid() != settings.dp_uid and not validate_mod.can_switch_uid():
        fail(f"validate runs as the DP user (uid {settings.dp_uid}), as Kuma's validator "
             f"does, or as root; this is uid {os.geteuid()}: run it as the sidecar's user, "
             "or give the pod's configuration with --config")
    marks = {True: "✓", False: "✗", None: "-"}

    def echo(r):
        click.echo(f"{marks[r.ok]} {r.check}: {r.detail}")
    failed = validate_mod.run(settings, seconds, echo)
    if failed:
        click.echo(f"ebpf-tproxy validate: {failed.check}: {failed.detail}; fix: "
                   f"{validate_mod.default_fix(failed)}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo("validation passed: the redirect is in place")


@main.command()
@click.option("--keep-going", is_flag=True, help="Wait for Enter before tearing down.")
def demo(keep_going):
    """Run the built-in lab: capture an app's traffic, show it, release it.

    \b
    Example:
      ebpf-tproxy demo
    Builds network namespaces, a child cgroup and a small proxy, installs capture, makes
    requests, prints what the proxy saw and `status`, uninstalls and shows the host clean.
    """
    from .lab import demo as demo_mod
    sys.exit(demo_mod.run(pause=keep_going))


if __name__ == "__main__":
    main(prog_name="ebpf-tproxy")
