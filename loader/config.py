"""Kuma's transparent-proxy configuration: defaults < config files < environment < flags.

The schema, key spellings and environment names are Kuma's (`kumactl install
transparent-proxy`); see docs/kuma-compatibility.md. Everything the user can get wrong is
checked here, before anything touches the kernel, and reported as one ConfigError line
naming the cause and the fix.
"""
import copy
import dataclasses
import ipaddress
import json
import os
import pwd
import re
import sys


from . import abi

ENV_PREFIX = "KUMA_TRANSPARENT_PROXY_"
DEFAULT_DP_UID = 5678
DEFAULT_DP_USER = "kuma-dp"
# bpffs refuses '.' in a pin's name, and a name is a directory there: one rule for every
# command (install, status, uninstall), checked before anything is read or written.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# Whatever is read from a file (config, resolv.conf) is capped: no unbounded read. A config
# may list up to TP_CIDRS_MAX / 2 excluded IPs (about 12 MiB of YAML).
MAX_CONFIG_BYTES = 16 << 20
MAX_RESOLV_BYTES = 64 << 10


class ConfigError(ValueError):
    """Bad input: the message is the one line the user sees (cause and fix)."""


def check_name(name, what="--name"):
    """The one registration-name rule (install, status, uninstall, the CNI plugin)."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{what}: {name!r} is not a valid registration name; use lowercase "
                          "letters, digits, '_' or '-' (at most 63, starting with a letter or "
                          "digit)")
    return name


# Kuma's schema. Each leaf: (default, kind). Kinds are parsed by PARSERS below.
SCHEMA = {
    "kumaDPUser": ("", "user"),
    "ipFamilyMode": ("dualstack", "family"),
    "redirect": {
        "inbound": {
            "enabled": (True, "bool"),
            "port": (15006, "port"),
            "includePorts": ([], "ports"),
            # The seeds' default: SSH to the host keeps working. A list replaces it.
            "excludePorts": ([22], "ports"),
            "excludePortsForIPs": ([], "cidrs"),
            "excludePortsForUIDs": ([], "strs"),
            "insertRedirectInsteadOfAppend": (False, "bool"),
        },
        "outbound": {
            "enabled": (True, "bool"),
            "port": (15001, "port"),
            "includePorts": ([], "ports"),
            "excludePorts": ([], "ports"),
            "excludePortsForIPs": ([], "cidrs"),
            "excludePortsForUIDs": ([], "uidrules"),
            "insertRedirectInsteadOfAppend": (False, "bool"),
        },
        "dns": {
            "enabled": (False, "bool"),
            "port": (15053, "port"),
            "captureAll": (False, "bool"),
            "resolvConfigPath": ("/etc/resolv.conf", "path"),
            "skipConntrackZoneSplit": (False, "bool"),
        },
        "vnet": {"networks": ([], "strs")},
    },
    "ebpf": {
        "enabled": (True, "bool"),
        "instanceIP": ("", "ip"),
        "instanceIPEnvVarName": ("", "str"),
        "bpffsPath": ("/sys/fs/bpf", "path"),
        "cgroupPath": ("", "path"),
        "tcAttachIface": ("", "str"),
        "programsSourcePath": ("", "str"),
        # ebpf-tproxy's own (not in Kuma): sockmap acceleration. "auto" (the default): on
        # where the kernel can keep namespaces apart in sock_ops (5.15+), else off; true
        # refuses a kernel without it; false is off. make bench: it wins on every workload.
        "accelerate": (None, "autobool"),
    },
    "retry": {
        "maxRetries": (4, "int"),
        "sleepBetweenRetries": ("2s", "str"),
    },
    "iptablesExecutables": ({}, "any"),
    "log": {
        "enabled": (False, "bool"),
        "level": (7, "int"),
    },
    "comments": {"disabled": (False, "bool")},
    "wait": (5, "int"),
    "waitInterval": (0, "int"),
    "dropInvalidPackets": (False, "bool"),
    "storeFirewalld": (False, "bool"),
    "cniMode": (False, "bool"),
    "dryRun": (False, "bool"),
    "verbose": (False, "bool"),
}

# Keys that only mean something to iptables (or to Kuma's old eBPF mode). Accepted so
# existing invocations and config files keep working; a non-default value gets one line
# saying what it means here.
IPTABLES_ONLY = {
    "redirect.inbound.insertRedirectInsteadOfAppend":
        "not applicable to eBPF: there is no iptables chain to insert into",
    "redirect.outbound.insertRedirectInsteadOfAppend":
        "not applicable to eBPF: there is no iptables chain to insert into",
    "redirect.dns.skipConntrackZoneSplit":
        "not applicable to eBPF: DNS capture uses no conntrack zones",
    "retry.maxRetries": "not applicable to eBPF: each hook is swapped atomically and a "
                        "failed install rolls back, so nothing is retried",
    "retry.sleepBetweenRetries": "not applicable to eBPF: nothing is retried",
    "iptablesExecutables": "not applicable to eBPF: no iptables executable is run",
    "log.enabled": "no netfilter log; 'ebpf-tproxy trace' shows each decision as it "
                   "happens, and 'ebpf-tproxy status' counts them",
    "log.level": "not applicable to eBPF (no netfilter log)",
    "comments.disabled": "not applicable to eBPF: no rules, so no rule comments",
    "wait": "not applicable to eBPF: there is no xtables lock (installs take a lock on "
            "the bpffs)",
    "waitInterval": "not applicable to eBPF: there is no xtables lock",
    "dropInvalidPackets": "not applicable to eBPF: no NAT conntrack state, so no "
                          "INVALID packets to drop",
    "cniMode": "ignored: the CNI plugin is the separate 'ebpf-tproxy' plugin (README, "
               "Kubernetes)",
    "ebpf.tcAttachIface": "ignored: no tc program is used (sk_lookup covers every "
                          "interface of the namespace)",
    "ebpf.programsSourcePath": "ignored: the programs are built in and compiled at install",
}

# Keys this version refuses: honouring them silently would leave traffic uncaptured.
NOT_YET = {
    "redirect.inbound.excludePortsForUIDs": "inbound connections come from other hosts, "
                                            "whose uids are unknown here",
    "redirect.vnet.networks": "traffic bridged from a local interface such as docker0 "
                              "(treated as outbound) is not implemented: cgroup hooks "
                              "never see forwarded traffic",
}


def _leaves(schema=SCHEMA, prefix=""):
    for key, val in schema.items():
        path = f"{prefix}{key}"
        if isinstance(val, dict):
            yield from _leaves(val, path + ".")
        else:
            yield path, val


LEAVES = dict(_leaves())


def env_name(path):
    """Kuma's environment name for a key path: ebpf.cgroupPath -> ..._EBPF_CGROUP_PATH."""
    words = []
    for part in path.split("."):
        part = part.replace("DPUser", "DpUser").replace("IPs", "Ips").replace("UIDs", "Uids")
        part = part.replace("instanceIP", "instanceIp")
        words.append(re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", part).upper())
    return ENV_PREFIX + "_".join(words)


ENV_NAMES = {env_name(p): p for p in LEAVES}


# ----------------------------------------------------------------------------- parsers

def _scalars(value, what):
    """The items of a list, or the value itself: Kuma's lists are one level of scalars, so
    a list or mapping inside one (YAML nesting thousands deep) is refused here."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, dict):
            raise ConfigError(f"{what}: a mapping where a value or list belongs; give a value, "
                              "a list or a comma string")
        if isinstance(v, (list, tuple)):
            raise ConfigError(f"{what}: a list inside a list; give one flat list of values "
                              "(or a comma string)")
    return items


def _split(value, what="value"):
    """A list given as a list, a comma string or a single value."""
    out = []
    for v in _scalars(value, what):
        if v is None:
            continue
        if isinstance(v, int) and not isinstance(v, bool):
            out.append(str(v))
        else:
            out.extend(p.strip() for p in str(v).split(",") if p.strip())
    return out


_ASCII_UINT = re.compile(r"[0-9]+")


def parse_uint(text):
    """Kuma's Go parsers (strconv.ParseUint, base 10): ASCII digits only; no sign, no '_',
    no other script's digits (which Python's int() would take). None if it is not one."""
    if isinstance(text, bool):
        return None
    if isinstance(text, int):
        return text if text >= 0 else None
    text = str(text).strip(" \t")
    return int(text) if _ASCII_UINT.fullmatch(text) else None


def parse_port(value, what):
    port = parse_uint(value)
    if port is None:
        raise ConfigError(f"{what}: {value!r} is not a port number; use 1-65535")
    if not 1 <= port <= 65535:
        raise ConfigError(f"{what}: {port} is not a valid port; use 1-65535")
    return port


def parse_port_ranges(value, what, allow_star=True):
    """'53,3000-5000' -> [(53, 53), (3000, 5000)]; '*' -> [(1, 65535)]."""
    ranges = []
    for item in _split(value, what):
        if item == "*" and allow_star:
            ranges.append((1, 65535))
            continue
        lo, sep, hi = item.partition("-")
        a = parse_port(lo, what)
        b = parse_port(hi, what) if sep else a
        if b < a:
            raise ConfigError(f"{what}: range {item!r} ends before it starts; write LOW-HIGH")
        ranges.append((a, b))
    return ranges


def parse_ports(value, what):
    ports = []
    for lo, hi in parse_port_ranges(value, what, allow_star=False):
        ports.extend(range(lo, hi + 1))
    return sorted(set(ports))


def parse_cidrs(value, what):
    nets = []
    for item in _split(value, what):
        try:
            nets.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"{what}: {item!r} is not an IP address or CIDR "
                              "(e.g. 10.0.0.1 or 192.168.0.0/24)") from None
    return nets


def parse_uid_range(text, what):
    lo, sep, hi = text.partition("-")
    a = parse_uint(lo)
    b = parse_uint(hi) if sep else a
    if a is None or b is None:
        raise ConfigError(f"{what}: {text!r} is not a uid or uid range (e.g. 1000 or "
                          "106-108)")
    if a < 0 or b < a or b > 0xFFFFFFFE:
        raise ConfigError(f"{what}: uid range {text!r} is not valid; write LOW-HIGH, "
                          "0 <= LOW <= HIGH")
    return a, b


@dataclasses.dataclass(frozen=True)
class UidRule:
    """One --exclude-outbound-ports-for-uids entry: [proto:][ports:]uids."""
    protos: int
    ports: tuple
    uid_lo: int
    uid_hi: int

    def describe(self):
        protos = {abi.TP_PROTO_TCP: "tcp", abi.TP_PROTO_UDP: "udp"}.get(self.protos, "tcp,udp")
        ports = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.ports)
        uids = f"{self.uid_lo}" if self.uid_lo == self.uid_hi else f"{self.uid_lo}-{self.uid_hi}"
        return f"{protos}:{ports}:{uids}"


def parse_uid_rule(text, what="--exclude-outbound-ports-for-uids"):
    parts = text.strip().split(":")
    if len(parts) == 1:
        proto, ports, uids = "*", "*", parts[0]
    elif len(parts) == 2:
        proto, (ports, uids) = "*", parts
    elif len(parts) == 3:
        proto, ports, uids = parts
    else:
        raise ConfigError(f"{what}: {text!r} has too many ':'; the form is "
                          "[proto:][ports:]uids, e.g. tcp:53,3000-5000:106-108")
    protos = 0
    for p in _split(proto, what) or ["*"]:
        p = p.lower()
        if p == "*":
            protos |= abi.TP_PROTO_TCP | abi.TP_PROTO_UDP
        elif p == "tcp":
            protos |= abi.TP_PROTO_TCP
        elif p == "udp":
            protos |= abi.TP_PROTO_UDP
        else:
            raise ConfigError(f"{what}: protocol {p!r} in {text!r} is not tcp, udp or *")
    ranges = parse_port_ranges(ports or "*", f"{what} {text!r}")
    if len(ranges) > abi.TP_MAX_PORT_RANGES:
        raise ConfigError(f"{what}: {text!r} has {len(ranges)} port ranges; at most "
                          f"{abi.TP_MAX_PORT_RANGES} per entry, split it into several entries")
    lo, hi = parse_uid_range(uids.strip(), f"{what} {text!r}")
    return UidRule(protos, tuple(ranges), lo, hi)


def parse_bool(value, what):
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{what}: {value!r} is not a boolean; use true or false")


def parse_autobool(value, what):
    """true/false, or "auto" (None: install decides from the kernel's features)."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        return parse_bool(value, what)
    except ConfigError:
        raise ConfigError(f"{what}: {value!r} is not a boolean; use auto, true or false") from None


def parse_leaf(kind, value, what):
    if kind == "bool":
        return parse_bool(value, what)
    if kind == "autobool":
        return parse_autobool(value, what)
    if kind == "port":
        return parse_port(value, what)
    if kind == "ports":
        return parse_ports(value, what)
    if kind == "cidrs":
        return parse_cidrs(value, what)
    if kind == "uidrules":
        return [r.describe() for r in (parse_uid_rule(t, what) for t in _split_rules(value, what))]
    if kind == "strs":
        return _split(value, what)
    if kind == "int":
        n = parse_uint(value)
        if n is None:
            raise ConfigError(f"{what}: {value!r} is not a whole number")
        return n
    if kind == "path":
        return parse_path(value, what)
    if kind == "user":
        s = "" if value is None else str(value).strip()
        if not s:
            raise ConfigError(f"{what}: empty; give the name or uid the proxy (kuma-dp) "
                              "runs as, or leave it out for the default")
        return s
    if kind == "any":
        return value
    if kind == "family":
        s = str(value).strip().lower()
        if s not in ("dualstack", "ipv4"):
            raise ConfigError(f"{what}: unknown ip family mode {value!r}; use dualstack or ipv4")
        return s
    if kind == "ip":
        s = str(value).strip()
        if s:
            try:
                ipaddress.ip_address(s)
            except ValueError:
                raise ConfigError(f"{what}: {s!r} is not an IP address") from None
        return s
    return "" if value is None else str(value)


def parse_path(value, what):
    """An absolute path, given: empty is an error, never a default (an empty cgroup path
    would mean the whole host), and '.' or '..' components are refused rather than resolved
    (x/.. is the parent)."""
    if isinstance(value, (list, tuple, dict)) or value is None:
        raise ConfigError(f"{what}: {value!r} is not a path; give an absolute path")
    s = str(value)
    if not s.strip():
        raise ConfigError(f"{what}: empty; give an absolute path, or leave it out for the "
                          "default")
    if not s.startswith("/"):
        raise ConfigError(f"{what}: {s!r} is relative; give an absolute path")
    if any(part in (".", "..") for part in s.split("/")):
        raise ConfigError(f"{what}: {s!r} has '.' or '..' in it; give the directory itself")
    return os.path.normpath(s)


def _split_rules(value, what):
    """uid rules contain commas inside an entry (ports lists), so entries are only split
    on ';' (annotation style) or given as a list; a flag gives one entry per use."""
    out = []
    for v in _scalars(value, what):
        if v is not None:
            out.extend(p.strip() for p in str(v).split(";") if p.strip())
    return out


# ------------------------------------------------------------------------ the layers

def defaults():
    return {path: copy.deepcopy(default) for path, (default, _) in LEAVES.items()}


def _flatten(doc, prefix="", where="config"):
    """A nested config document -> {path: value}; unknown keys are reported, not dropped."""
    out, unknown = {}, []
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of Kuma's keys "
                          "(e.g. 'redirect: {outbound: {port: 15001}}')")
    for key, val in doc.items():
        path = f"{prefix}{key}"
        if path in LEAVES:
            out[path] = val
        elif isinstance(val, dict) and any(p.startswith(path + ".") for p in LEAVES):
            sub, unk = _flatten(val, path + ".", where)
            out.update(sub)
            unknown.extend(unk)
        else:
            unknown.append(path)
    return out, unknown


def _kuma_loader():
    """safe_load, minus aliases of lists and mappings: a few lines of them expand to
    billions of values (the "billion laughs"); Kuma's keys never need them. Scalar aliases
    (*port) stay: they cannot grow. Built on first use: PyYAML's import is a tenth of an
    install that reads no config file (issue 13's budget)."""
    import yaml

    class KumaLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                node = self.anchors.get(event.anchor)
                if node is not None and not isinstance(node, yaml.ScalarNode):
                    raise ConfigError(f"{self._where}: alias *{event.anchor} (line "
                                      f"{event.start_mark.line + 1}) repeats a list or "
                                      "mapping; write the values out instead")
            return super().compose_node(parent, index)
    return yaml, KumaLoader


def read_bounded(path, limit, what, fix):
    """The bytes of a regular file, at most limit of them (no FIFO, device or /dev/zero)."""
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"{what}: cannot read it ({why}); {fix}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):   # before fdopen, which refuses a directory
        os.close(fd)
        raise ConfigError(f"{what}: not a regular file; {fix}")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{what}: larger than {limit // 1024} KiB; {fix}")
    return data


def _parse_document(text, where):
    if text.lstrip().startswith("{"):
        # JSON (what tools write): parsed as such, fifty times faster than YAML's pure
        # Python loader on a long list; anything json refuses goes on to YAML.
        try:
            return json.loads(text)
        except ValueError:
            pass
    yaml, kuma_loader = _kuma_loader()
    loader = kuma_loader(text)
    loader._where = where
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}: does not parse as YAML or JSON{at}; fix the syntax") from None
    finally:
        loader.dispose()


def read_config_file(name, stdin=None):
    """Parse one --config source ('-' = stdin), YAML or JSON (JSON is YAML)."""
    fix = "give a Kuma config file (YAML or JSON, UTF-8)"
    if name == "-":
        where = "config from stdin"
        src = stdin or sys.stdin
        raw = getattr(src, "buffer", src).read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES // 1024} KiB; {fix}")
    else:
        where = f"config file {name}"
        raw = read_bounded(name, MAX_CONFIG_BYTES, where, "check the path")
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 (byte {e.start}); save it as UTF-8") from None
    return parse_document(text, where)


def parse_document(text, where):
    """One Kuma config document (YAML or JSON) -> ({path: raw value}, unknown keys)."""
    if "\x00" in text:
        raise ConfigError(f"{where}: contains a NUL byte; give a Kuma config document")
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        doc = _parse_document(text, where)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deep to be a Kuma config; fix it") from None
    return _flatten(doc or {}, where=where)


def env_layer(environ):
    out = {}
    for name, value in environ.items():
        if name in ENV_NAMES:
            out[ENV_NAMES[name]] = value
    return out


@dataclasses.dataclass
class Layers:
    """The raw values of each layer, before validation."""
    files: list = dataclasses.field(default_factory=list)   # [(name, {path: value})]
    env: dict = dataclasses.field(default_factory=dict)
    flags: dict = dataclasses.field(default_factory=dict)
    warnings: list = dataclasses.field(default_factory=list)


def merge(layers):
    """defaults < files (in order) < env < flags, each value parsed for its key."""
    values = defaults()
    sources = [(f"config {n}", vals) for n, vals in layers.files]
    sources += [("environment", layers.env), ("flags", layers.flags)]
    for where, vals in sources:
        for path, raw in vals.items():
            kind = LEAVES[path][1]
            label = _label(path, where)
            if _has_nul(raw):
                raise ConfigError(f"{label}: contains a NUL byte; remove it")
            values[path] = parse_leaf(kind, raw, label)
    return values


def _has_nul(value):
    items = value if isinstance(value, (list, tuple)) else [value]
    return any(isinstance(v, str) and "\x00" in v for v in items)


def _label(path, where):
    if where == "environment":
        return env_name(path)
    if where == "flags":
        return FLAG_FOR.get(path, path)
    return f"{path} ({where})"


# Kuma's flag for each key (for messages).
FLAG_FOR = {
    "kumaDPUser": "--kuma-dp-user",
    "ipFamilyMode": "--ip-family-mode",
    "redirect.inbound.enabled": "--redirect-inbound",
    "redirect.inbound.port": "--redirect-inbound-port",
    "redirect.inbound.includePorts": "redirect.inbound.includePorts",
    "redirect.inbound.excludePorts": "--exclude-inbound-ports",
    "redirect.inbound.excludePortsForIPs": "--exclude-inbound-ips",
    "redirect.outbound.port": "--redirect-outbound-port",
    "redirect.outbound.excludePorts": "--exclude-outbound-ports",
    "redirect.outbound.excludePortsForIPs": "--exclude-outbound-ips",
    "redirect.outbound.excludePortsForUIDs": "--exclude-outbound-ports-for-uids",
    "redirect.dns.enabled": "--redirect-dns",
    "redirect.dns.captureAll": "--redirect-all-dns-traffic",
    "redirect.dns.port": "--redirect-dns-port",
    "redirect.vnet.networks": "--vnet",
    "ebpf.enabled": "--ebpf-enabled",
    "ebpf.instanceIP": "--ebpf-instance-ip",
    "ebpf.bpffsPath": "--ebpf-bpffs-path",
    "ebpf.cgroupPath": "--ebpf-cgroup-path",
    "ebpf.tcAttachIface": "--ebpf-tc-attach-iface",
    "ebpf.programsSourcePath": "--ebpf-programs-source-path",
    "ebpf.accelerate": "--ebpf-accelerate",
    "dryRun": "--dry-run",
    "verbose": "--verbose",
    "storeFirewalld": "--store-firewalld",
    "redirect.inbound.insertRedirectInsteadOfAppend": "--redirect-inbound-insert-instead-of-append",
    "redirect.outbound.insertRedirectInsteadOfAppend":
        "--redirect-outbound-insert-instead-of-append",
    "redirect.dns.skipConntrackZoneSplit": "--skip-dns-conntrack-zone-split",
    "retry.maxRetries": "--max-retries",
    "retry.sleepBetweenRetries": "--sleep-between-retries",
    "iptablesExecutables": "--iptables-executables",
    "log.enabled": "--iptables-logs",
    "comments.disabled": "--disable-comments",
    "wait": "--wait",
    "waitInterval": "--wait-interval",
    "dropInvalidPackets": "--drop-invalid-packets",
}


# ------------------------------------------------------------------- resolved settings

@dataclasses.dataclass(frozen=True)
class Settings:
    """A validated configuration, ready to be written to the maps."""
    name: str
    dp_uid: int
    dp_user: str
    ipv6: bool
    outbound_enabled: bool
    outbound_port: int
    inbound_port: int
    outbound_include_ports: tuple
    outbound_exclude_ports: tuple
    outbound_exclude_ips: tuple
    uid_rules: tuple
    inbound_enabled: bool
    inbound_include_ports: tuple
    inbound_exclude_ports: tuple
    inbound_exclude_ips: tuple
    dns_enabled: bool
    dns_capture_all: bool
    dns_port: int
    resolv_conf: str
    instance_ip4: str
    instance_ip6: str
    cgroup_path: str
    bpffs_path: str
    dry_run: bool
    accelerate: object   # None: auto (install resolves it to True/False), or True/False
    verbose: bool
    store: bool = False  # storeFirewalld: kept in the agent's store (loader/store.py)

    def kuma_view(self):
        """The configuration in Kuma's camelCase terms (status, dry-run, meta); port lists
        as Kuma's comma strings with ranges, so a range of thousands stays short."""
        return {
            "kumaDPUser": self.dp_user,
            "ipFamilyMode": "dualstack" if self.ipv6 else "ipv4",
            "redirect": {"outbound": {
                "enabled": self.outbound_enabled,
                "port": self.outbound_port,
                "includePorts": compact_ports(self.outbound_include_ports),
                "excludePorts": compact_ports(self.outbound_exclude_ports),
                "excludePortsForIPs": list(self.outbound_exclude_ips),
                "excludePortsForUIDs": [r.describe() for r in self.uid_rules],
            }, "inbound": {
                "enabled": self.inbound_enabled,
                "port": self.inbound_port,
                "includePorts": compact_ports(self.inbound_include_ports),
                "excludePorts": compact_ports(self.inbound_exclude_ports),
                "excludePortsForIPs": list(self.inbound_exclude_ips),
            }, "dns": {
                "enabled": self.dns_enabled,
                "captureAll": self.dns_capture_all,
                "port": self.dns_port,
                "resolvConfigPath": self.resolv_conf,
            }},
            "ebpf": {"instanceIP": ",".join(x for x in (self.instance_ip4, self.instance_ip6) if x),
                     "bpffsPath": self.bpffs_path, "cgroupPath": self.cgroup_path,
                     "accelerate": "auto" if self.accelerate is None else self.accelerate},
            "storeFirewalld": self.store,
        }


def compact_ports(ports):
    """[22, 80, 81, 82] -> "22,80-82" (Kuma accepts this form back)."""
    out, ports = [], sorted(ports)
    i = 0
    while i < len(ports):
        j = i
        while j + 1 < len(ports) and ports[j + 1] == ports[j] + 1:
            j += 1
        out.append(str(ports[i]) if i == j else f"{ports[i]}-{ports[j]}")
        i = j + 1
    return ",".join(out)


def resolve_dp_user(value, pod_uid=False):
    """Kuma: a name or a uid that exists; default uid 5678, else user kuma-dp.
    pod_uid: the user may live in a pod's image, not in this host's user database (the CNI
    plugin, and a configuration this tool wrote): a uid is then taken as it is, and with
    none given it is Kuma's Kubernetes default, 5678."""
    if pod_uid and not value:
        return DEFAULT_DP_UID, str(DEFAULT_DP_UID)
    if pod_uid and value and parse_uint(str(value).strip()) is not None:
        uid = parse_uint(str(value).strip())
        if uid >= 2**32 - 1:
            raise ConfigError(f"--kuma-dp-user: {value!r} is not a valid uid")
        return uid, str(uid)
    if value:
        v = str(value).strip()
        uid = parse_uint(v)
        try:
            if uid is not None:
                return uid, pwd.getpwuid(uid).pw_name
            ent = pwd.getpwnam(v)
            return ent.pw_uid, ent.pw_name
        except (KeyError, OverflowError, ValueError):
            raise ConfigError(f"--kuma-dp-user: no user {v!r} on this host; give the name "
                              "or uid the proxy (kuma-dp) runs as") from None
    try:
        return DEFAULT_DP_UID, pwd.getpwuid(DEFAULT_DP_UID).pw_name
    except KeyError:
        pass
    try:
        return pwd.getpwnam(DEFAULT_DP_USER).pw_uid, DEFAULT_DP_USER
    except KeyError:
        raise ConfigError(f"--kuma-dp-user: neither uid {DEFAULT_DP_UID} nor user "
                          f"{DEFAULT_DP_USER!r} exists; pass --kuma-dp-user with the user "
                          "the proxy runs as") from None


def notes_for(values):
    """One line for each iptables-only setting that is not at its default."""
    return [f"{FLAG_FOR.get(path, path)}: {why}" for path, why in IPTABLES_ONLY.items()
            if values[path] != LEAVES[path][0]]


def settings_from(values, name="default", environ=None, pod_uid=False):
    """Validate merged values into Settings. Host facts (cgroup2, bpffs, instance IP) are
    checked later by the install step; this only needs the user database (not even that
    with pod_uid: see resolve_dp_user)."""
    check_name(name)
    for path, why in NOT_YET.items():
        if values[path] != LEAVES[path][0]:
            raise ConfigError(f"{FLAG_FOR.get(path, path)}: {why}; remove it (see "
                              "docs/kuma-compatibility.md)")
    if not values["ebpf.enabled"]:
        raise ConfigError("--ebpf-enabled=false: this tool only does the eBPF mode; use "
                          "kumactl install transparent-proxy for iptables")
    dp_uid, dp_user = resolve_dp_user(values["kumaDPUser"], pod_uid)
    rules = tuple(parse_uid_rule(t) for t in values["redirect.outbound.excludePortsForUIDs"])
    if len(rules) > abi.TP_MAX_UID_RULES:
        raise ConfigError(f"--exclude-outbound-ports-for-uids: {len(rules)} entries; at most "
                          f"{abi.TP_MAX_UID_RULES} are supported, merge uid ranges")
    n_ips = len(values["redirect.outbound.excludePortsForIPs"]) + \
        len(values["redirect.inbound.excludePortsForIPs"])
    if n_ips > abi.TP_CIDRS_MAX // 2:
        raise ConfigError(f"--exclude-outbound-ips and --exclude-inbound-ips: {n_ips} "
                          f"entries; at most {abi.TP_CIDRS_MAX // 2} per namespace (the node's "
                          f"tp_cidrs holds {abi.TP_CIDRS_MAX}, and an update needs room for "
                          "the old and the new configuration): use wider CIDRs")
    ports = {"--redirect-outbound-port": values["redirect.outbound.port"],
             "--redirect-inbound-port": values["redirect.inbound.port"],
             "--redirect-dns-port": values["redirect.dns.port"]}
    seen = {}
    for flag, port in ports.items():
        if port in seen:
            raise ConfigError(f"{seen[port]} and {flag} are both {port}; each redirect needs "
                              "its own listener")
        seen[port] = flag
    ip4 = ip6 = ""
    instance_ip = values["ebpf.instanceIP"]
    var = values["ebpf.instanceIPEnvVarName"]
    if var and not instance_ip:
        # Kuma: the instance IP may come from an environment variable (INSTANCE_IP in pods)
        instance_ip = (os.environ if environ is None else environ).get(var, "")
        if not instance_ip:
            raise ConfigError(f"ebpf.instanceIPEnvVarName: ${var} is not set; set it to the "
                              "instance's IP or give --ebpf-instance-ip")
        parse_leaf("ip", instance_ip, f"${var}")
    if instance_ip:
        ip = ipaddress.ip_address(instance_ip)
        ip4, ip6 = (str(ip), "") if ip.version == 4 else ("", str(ip))
    return Settings(
        name=name,
        dp_uid=dp_uid,
        dp_user=dp_user,
        ipv6=values["ipFamilyMode"] == "dualstack",
        outbound_enabled=values["redirect.outbound.enabled"],
        outbound_port=values["redirect.outbound.port"],
        inbound_port=values["redirect.inbound.port"],
        outbound_include_ports=tuple(values["redirect.outbound.includePorts"]),
        outbound_exclude_ports=tuple(values["redirect.outbound.excludePorts"]),
        outbound_exclude_ips=tuple(values["redirect.outbound.excludePortsForIPs"]),
        uid_rules=rules,
        inbound_enabled=values["redirect.inbound.enabled"],
        inbound_include_ports=tuple(values["redirect.inbound.includePorts"]),
        inbound_exclude_ports=tuple(values["redirect.inbound.excludePorts"]),
        inbound_exclude_ips=tuple(values["redirect.inbound.excludePortsForIPs"]),
        dns_enabled=values["redirect.dns.enabled"] or values["redirect.dns.captureAll"],
        dns_capture_all=values["redirect.dns.captureAll"],
        dns_port=values["redirect.dns.port"],
        resolv_conf=values["redirect.dns.resolvConfigPath"],
        instance_ip4=ip4,
        instance_ip6=ip6,
        cgroup_path=values["ebpf.cgroupPath"],
        bpffs_path=values["ebpf.bpffsPath"],
        accelerate=values["ebpf.accelerate"],
        dry_run=values["dryRun"],
        verbose=values["verbose"],
        store=values["storeFirewalld"],
    )


def prune_view(view, prefix=""):
    """A kuma_view without the empty values that mean "the default" (an empty path, IP or
    user is refused when read back): a document settings_from_document reads."""
    out = {}
    for k, v in view.items():
        path = prefix + k
        if isinstance(v, dict):
            out[k] = prune_view(v, path + ".")
        elif not (v == "" and LEAVES.get(path, (None, ""))[1] in ("path", "ip", "user")):
            out[k] = v
    return out


def document_of(settings):
    """The configuration as a Kuma config document that settings_from_document reads back
    to the same Settings."""
    return prune_view(settings.kuma_view())


def digest_of(settings):
    """A digest of what the configuration captures (whether it is stored aside): install
    records it, so the agent tells a stored configuration already in force without reading
    back a description that shortens long lists."""
    import hashlib
    doc = document_of(settings)
    doc.pop("storeFirewalld", None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def settings_from_document(doc, name, where):
    """Settings from one parsed Kuma config document alone (the agent's stored ones): Kuma's
    defaults below it, no environment, no flags; an unknown key is an error here, since
    only this tool wrote it."""
    vals, unknown = _flatten(doc, where=where)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; write it again with "
                          "'ebpf-tproxy install --store'")
    # pod_uid: a uid written here was checked when it was installed (a pod's proxy uid
    # need not exist in this host's user database).
    return settings_from(merge(Layers(files=[(where, vals)])), name=name, environ={},
                         pod_uid=True)


def load(config_sources=(), environ=None, flags=None, name="default", stdin=None,
         pod_uid=False):
    """All layers -> (Settings, warnings). config_sources: --config values (each may be a
    comma list). pod_uid: see resolve_dp_user (kuma-init in a pod)."""
    environ = os.environ if environ is None else environ
    layers = Layers(env=env_layer(environ), flags=dict(flags or {}))
    for src in config_sources:
        for part in _split(src):
            vals, unknown = read_config_file(part, stdin=stdin)
            layers.files.append((part, vals))
            layers.warnings += [f"config {part}: unknown key {k!r} ignored (Kuma ignores it "
                                "too; check the spelling)" for k in unknown]
    values = merge(layers)
    return settings_from(values, name=name, environ=environ, pod_uid=pod_uid), \
        layers.warnings + notes_for(values)


def dump_json(obj):
    return json.dumps(obj, indent=2, sort_keys=True)


def read_nameservers(path):
    """resolv.conf's nameservers, by family: ({"4": [...], "6": [...]}, warnings)."""
    raw = read_bounded(path, MAX_RESOLV_BYTES, f"redirect.dns.resolvConfigPath: {path}",
                       "fix the path or use --redirect-all-dns-traffic")
    lines = raw.decode(errors="replace").splitlines()
    servers = {4: [], 6: []}
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ip = ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            servers[ip.version].append(str(ip))
    return servers
