"""The CNI protocol (SPEC.md of containernetworking/cni, spec 0.3.0 to 1.1.0), as a plugin
sees it: CNI_* environment variables and a JSON configuration on stdin in, a JSON result or
error on stdout and the exit code out. Stdlib only: the shim, which a node's runtime runs
for every pod, imports this and nothing else of the package.

Mirrors libcni's pkg/skel (which variables each verb needs, the version gates) so that a
runtime sees the same answers it gets from a Go plugin. Errors go to stdout as JSON with a
non-zero exit: libcni parses stdout (pkg/invoke/raw_exec.go); logs go to stderr.
"""
import json
import os

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
LATEST = SUPPORTED_VERSIONS[-1]

# Well-known error codes (SPEC.md "Error"; pkg/types/types.go adds 8 and 999).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
INVALID_NETNS = 8
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50          # STATUS: the plugin cannot serve ADDs now
NOT_AVAILABLE_LIMITED = 51
INTERNAL = 999
# Ours (100 and up are the plugin's own, SPEC.md).
BAD_ANNOTATION = 100        # a pod annotation (or node default) that does not parse
INSTALL_REFUSED = 101       # the node program set refused the registration
CHECK_MISMATCH = 102        # CHECK: the registration is missing or differs

# Which CNI_* variables each verb requires (pkg/skel/skel.go).
REQUIRED = {
    "ADD": ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_COMMAND", "CNI_PATH"),
    "STATUS": ("CNI_COMMAND", "CNI_PATH"),
    "VERSION": ("CNI_COMMAND",),
}
# The first spec version that has each verb.
SINCE = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}
MAX_STDIN = 4 << 20   # a conflist entry with its prevResult and every pod annotation


class CNIError(Exception):
    def __init__(self, code, msg, details=""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def result(self, version):
        out = {"cniVersion": version or LATEST, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def version_key(v):
    try:
        parts = tuple(int(x) for x in str(v).split("."))
    except ValueError:
        raise CNIError(INCOMPATIBLE_VERSION, f"cniVersion {v!r} is not a version") from None
    return parts + (0,) * (3 - len(parts))


class Request:
    """One invocation: the verb, its CNI_* variables and the parsed configuration."""

    def __init__(self, environ, stdin_bytes):
        self.command = environ.get("CNI_COMMAND", "")
        if self.command not in REQUIRED:
            raise CNIError(INVALID_ENVIRONMENT, f"unknown CNI_COMMAND {self.command!r}; "
                           f"expected one of {', '.join(REQUIRED)}")
        missing = [v for v in REQUIRED[self.command] if not environ.get(v)]
        if missing:
            raise CNIError(INVALID_ENVIRONMENT,
                           f"required env variables [{','.join(missing)}] missing")
        self.container_id = environ.get("CNI_CONTAINERID", "")
        self.netns = environ.get("CNI_NETNS", "")
        self.ifname = environ.get("CNI_IFNAME", "")
        self.args = parse_args(environ.get("CNI_ARGS", ""))
        self.conf = {}
        self.version = LATEST
        if self.command == "VERSION":
            return   # stdin may be anything: only its cniVersion is read, if it parses
        if len(stdin_bytes) > MAX_STDIN:
            raise CNIError(DECODING_FAILURE, f"network configuration larger than "
                           f"{MAX_STDIN >> 20} MiB")
        try:
            conf = json.loads(stdin_bytes or b"null")
        except ValueError as e:
            raise CNIError(DECODING_FAILURE, f"network configuration is not JSON: {e}") \
                from None
        if not isinstance(conf, dict):
            raise CNIError(DECODING_FAILURE, "network configuration must be a JSON object")
        self.conf = conf
        self.version = str(conf.get("cniVersion") or "0.1.0")
        if not conf.get("name"):
            raise CNIError(INVALID_CONFIG, "missing network name (\"name\")")
        if self.version not in SUPPORTED_VERSIONS:
            raise CNIError(INCOMPATIBLE_VERSION,
                           f"cniVersion {self.version} is not supported; this plugin "
                           f"supports {', '.join(SUPPORTED_VERSIONS)}")
        since = SINCE.get(self.command)
        if since and version_key(self.version) < version_key(since):
            raise CNIError(INCOMPATIBLE_VERSION, f"{self.command} needs cniVersion {since} "
                           f"or later; the configuration says {self.version}")

    @property
    def network(self):
        return self.conf.get("name", "")

    @property
    def runtime_config(self):
        rc = self.conf.get("runtimeConfig")
        return rc if isinstance(rc, dict) else {}

    def added_result(self):
        """ADD's output: prevResult unchanged (a chained plugin that adds no interface),
        in the request's version."""
        prev = self.conf.get("prevResult")
        out = dict(prev) if isinstance(prev, dict) else {}
        out["cniVersion"] = self.version
        return out


def parse_args(text):
    """CNI_ARGS: "K=V;K2=V2" (each pair split on its first '=')."""
    out = {}
    for pair in filter(None, text.split(";")):
        k, sep, v = pair.partition("=")
        if not sep:
            raise CNIError(INVALID_ENVIRONMENT, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        out[k] = v
    return out


def version_result(stdin_bytes):
    """VERSION's answer (its stdin is optional and may not even parse)."""
    version = LATEST
    try:
        v = json.loads(stdin_bytes or b"{}").get("cniVersion")
        if v in SUPPORTED_VERSIONS:
            version = v
    except (ValueError, AttributeError):
        pass
    return {"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}


def serve(environ, stdin_bytes, handlers):
    """Run one invocation: (exit code, stdout bytes). handlers: {verb: fn(Request) -> dict
    to print or None}."""
    if environ.get("CNI_COMMAND") == "VERSION":
        return 0, dump(version_result(stdin_bytes))
    version = version_result(stdin_bytes)["cniVersion"]   # errors answer in the request's
    try:
        req = Request(environ, stdin_bytes)
        version = req.version
        out = handlers[req.command](req)
        return 0, dump(out) if out is not None else b""
    except CNIError as e:
        return 1, dump(e.result(version))


def dump(obj):
    return (json.dumps(obj) + "\n").encode()


def netns_is_own(path):
    """Whether path is the calling process's own network namespace (skel refuses ADD there:
    a chained plugin pointed at the host would capture the host)."""
    try:
        a, b = os.stat(path), os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
