#!/usr/bin/env bash
# make setup: everything `make demo` and `make test` need, installed only when missing.
# Debian packages (or Fedora's, with dnf), BCC's kernel headers, and .venv (from /usr/bin/python3 with
# --system-site-packages so that the distribution's bcc imports). Quiet when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }

# No headers package for the running kernel: BCC gets another version's headers (it only
# needs them to compile; our programs use UAPI structures, so version skew is harmless).
link_headers() {   # <build dir> <source dir>
  mkdir -p "/lib/modules/$rel"
  ln -sfn "$1" "/lib/modules/$rel/build"
  ln -sfn "$2" "/lib/modules/$rel/source"
  say "warning: no headers package for kernel $rel; linked $(basename "$1") for BCC"
}

rel=$(uname -r)
if ! command -v apt-get >/dev/null && command -v dnf >/dev/null; then
  # Fedora (the Vagrant lab's fedora VM): the same tools under Fedora's names; the
  # kernel-devel package of the running kernel gives BCC its headers.
  PKGS=(bcc python3-bcc bpftool libbpf iptables-nft iproute util-linux haproxy curl bind-utils
        make containernetworking-plugins podman runc catatonit)
  missing=()
  for p in "${PKGS[@]}"; do rpm -q "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || { say "missing packages: ${missing[*]}; run make setup as root"; exit 1; }
    say "installing ${missing[*]}"
    dnf install -y -q "${missing[@]}" >/dev/null
  fi
  if [ ! -e "/lib/modules/$rel/build/Makefile" ]; then
    [ "$(id -u)" -eq 0 ] || { say "missing package: kernel-devel-$rel; run make setup as root"; exit 1; }
    # A box older than its repositories runs a kernel whose kernel-devel is gone from
    # them: then the newest kernel-devel, linked.
    if ! dnf install -y -q "kernel-devel-$rel" >/dev/null 2>&1; then
      dnf install -y -q kernel-devel >/dev/null
      dir=$( (ls -d /usr/src/kernels/* 2>/dev/null || true) | sort -V | tail -n 1)
      [ -n "$dir" ] || { say "no kernel headers under /usr/src/kernels; install kernel-devel-$rel"; exit 1; }
      link_headers "$dir" "$dir"
    fi
  fi
else
# Debian 12 names; Ubuntu 22.04 (the Vagrant lab) has libbpf0, and bpftool in linux-tools.
has_pkg() { apt-cache show "$1" >/dev/null 2>&1; }
# The names are chosen from the package lists, which a fresh box (the Vagrant lab) may not
# have yet: fetch them first then. (Switch only when the other name is known and ours is
# not: without lists, e.g. offline and not root, the Debian names stand.)
if [ "$(id -u)" -eq 0 ] && ! has_pkg python3-bpfcc; then
  apt-get update -qq >/dev/null 2>&1 || true
fi
LIBBPF=libbpf1
if ! has_pkg libbpf1 && has_pkg libbpf0; then LIBBPF=libbpf0; fi
BPFTOOL=(bpftool)
if ! has_pkg bpftool && has_pkg linux-tools-common; then
  BPFTOOL=(linux-tools-common "linux-tools-$rel")
fi
# prometheus: the agent's test scrapes it with a real one; systemd: systemd-analyze verify;
# containernetworking-plugins: the reference bridge and host-local the CNI tests chain with;
# podman (4.x: CNI backend) with runc (crun refuses hybrid cgroup hosts) and catatonit (the
# pod's pause image is built from it locally): the end-to-end test's container runtime.
PKGS=(python3-bpfcc python3-venv "${BPFTOOL[@]}" "$LIBBPF" iptables iproute2 util-linux haproxy
      curl bind9-dnsutils prometheus systemd containernetworking-plugins podman runc catatonit)
# make bench also needs a load generator, an HTTP server, a chart library and perf (the
# CPU profile, bench/cpu_profile.py).
if [ "${1:-}" = "bench" ]; then
  PKGS+=(wrk nginx-light linux-perf)
fi
# make kernels also validates the Vagrantfile (tests/unit/test_vagrantfile.py); qemu and
# virtme-ng are installed by tests/kernels/run.py itself.
if [ "${1:-}" = "kernels" ]; then
  PKGS+=(vagrant)
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# BCC compiles against /lib/modules/$(uname -r)/{build,source}.
hdr_pkg=""
if [ ! -e "/lib/modules/$rel/build/Makefile" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    if apt-cache show "linux-headers-$rel" >/dev/null 2>&1; then
      hdr_pkg="linux-headers-$rel"
    else
      hdr_pkg="linux-headers-amd64"
      [ "$(dpkg --print-architecture)" = "arm64" ] && hdr_pkg="linux-headers-arm64"
    fi
    dpkg-query -W -f='${Status}' "$hdr_pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$hdr_pkg")
  fi
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    say "missing packages: ${missing[*]}; run make setup as root"; exit 1
  fi
  say "installing ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -e "/lib/modules/$rel/build/Makefile" ] && [ -n "$hdr_pkg" ]; then
  if [ "$hdr_pkg" = "linux-headers-$rel" ]; then
    : # the package put them in place
  else
    # No headers for this exact kernel: use the distribution's default ones.
    arch_dir=$( (ls -d /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-arm64 2>/dev/null || true) | sort -V | tail -n 1)
    common_dir=$( (ls -d /usr/src/linux-headers-*-common 2>/dev/null || true) | sort -V | tail -n 1)
    if [ -z "$arch_dir" ] || [ -z "$common_dir" ]; then
      say "no kernel headers found under /usr/src; install linux-headers-$rel"; exit 1
    fi
    link_headers "$arch_dir" "$common_dir"
  fi
fi

fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  say "creating .venv (system site packages, for bcc)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
if [ "${1:-}" = "bench" ] && ! .venv/bin/python -c 'import matplotlib' 2>/dev/null; then
  say "installing matplotlib into .venv (bench chart)"
  .venv/bin/pip install -q --disable-pip-version-check 'matplotlib>=3.6'
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing ebpf-tproxy into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
# The package's bytecode, as `pip install .` leaves it: the CLI then starts without compiling
# its modules, also where PYTHONDONTWRITEBYTECODE keeps Python from caching them (a warm
# install is ~0.22 s instead of ~0.26 s). Only changed modules are compiled again.
.venv/bin/python -m compileall -q loader >/dev/null
