"""ebpf-tproxy: Kuma-compatible transparent proxy redirect with eBPF cgroup hooks."""

__version__ = "0.1.0"
