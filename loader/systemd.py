"""systemd integration for the agent: readiness (sd_notify, for Type=notify) and the unit
file, installed by `ebpf-tproxy agent --install-unit`. No libsystemd: the notify protocol
is one datagram on $NOTIFY_SOCKET."""
import os
import shlex
import socket
import sys
from importlib import resources

UNIT_NAME = "ebpf-tproxy-agent.service"
UNIT_DIR = "/etc/systemd/system"


def notify(state):
    """Send state ("READY=1", "STATUS=...", "STOPPING=1") to systemd if it is listening.
    Returns whether it was sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]   # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(addr)
            s.sendall(state.encode())
        except OSError:
            return False
    return True


def template():
    return resources.files("loader.data").joinpath(UNIT_NAME).read_text()


def command_line():
    """How this ebpf-tproxy is started again: its console script, or python -m."""
    exe = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if exe and os.path.basename(exe) == "ebpf-tproxy" and os.access(exe, os.X_OK):
        return [exe]
    return [sys.executable, "-m", "loader.cli"]


def _escaped(word):
    """A word of ExecStart: quoted, with systemd's specifier (%) and variable ($) signs
    doubled so that they reach the agent as written."""
    return shlex.quote(word).replace("%", "%%").replace("$", "$$")


def render(agent_args, bpffs="/sys/fs/bpf", state_dir="/var/lib/ebpf-tproxy"):
    """The unit file with ExecStart running this ebpf-tproxy's agent with agent_args, and
    the bpffs and state directory it writes in named where the sandbox needs them."""
    exec_start = " ".join(_escaped(a) for a in command_line() + ["agent", *agent_args])
    return (template().replace("@EXEC_START@", exec_start)
            .replace("@BPFFS@", _escaped(bpffs)).replace("@STATE_DIR@", _escaped(state_dir)))


def install_unit(agent_args, unit_dir=UNIT_DIR, bpffs="/sys/fs/bpf",
                 state_dir="/var/lib/ebpf-tproxy"):
    """Write the unit (atomically); returns its path."""
    path = os.path.join(unit_dir, UNIT_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(render(agent_args, bpffs, state_dir))
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)
    return path


def remove_unit(unit_dir=UNIT_DIR):
    path = os.path.join(unit_dir, UNIT_NAME)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    return path
