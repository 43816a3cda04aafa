# ebpf-tproxy. Run as root on Debian/Ubuntu: `make demo`, `make test`.
PY := .venv/bin/python

.PHONY: setup demo test test-unit test-kernel test-accelerate differential bench kernels \
	kernels-ci clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m loader.cli demo

test: setup
	$(PY) -m pytest -ra tests

test-unit: setup
	$(PY) -m pytest -ra tests/unit

test-kernel: setup
	$(PY) -m pytest -ra tests/kernel

# The kernel suite again with --ebpf-accelerate on for every install (Kuma-style env var).
test-accelerate: setup
	KUMA_TRANSPARENT_PROXY_EBPF_ACCELERATE=true $(PY) -m pytest -ra tests/kernel

# Every combination of a few Kuma settings, iptables vs eBPF (make test runs one at a time).
differential: setup
	EBPF_TPROXY_DIFFERENTIAL=large $(PY) -m pytest -ra tests/kernel/test_differential.py

# The kernel tests under Debian's 5.10, 6.1 and 6.12 kernels, booted under qemu (TCG) with
# this host's root filesystem (tests/kernels/run.py; KERNELS=6.1 for one). Under emulation a
# test takes ~25 s, so the whole matrix takes hours; README has the last table.
kernels: setup
	@bash scripts/setup.sh kernels
	$(PY) tests/kernels/run.py; rc=$$?; $(PY) tests/kernels/readme_table.py >/dev/null; exit $$rc
	$(PY) -m pytest -ra tests/unit/test_vagrantfile.py

# What CI runs: one older kernel (5.10: the one with missing features, so the skips and
# refusals are exercised), a test per hook and per fallback.
KERNEL_CI_TESTS := tests/kernel/test_cli.py::test_check_passes_here_and_probes_every_hook \
	tests/kernel/test_outbound_rules.py::test_default_redirects_to_outbound_port_with_original_destination \
	tests/kernel/test_outbound_rules.py::test_sockets_in_another_netns_are_not_touched \
	tests/kernel/test_e2e_proxy.py::test_haproxy_debian_package_learns_original_destination \
	tests/kernel/test_inbound.py::test_connections_from_another_host_land_on_the_inbound_listener \
	tests/kernel/test_dns.py::test_glibc_and_python_resolvers_get_the_mesh_answer \
	tests/kernel/test_dns.py::test_udp_sockets_connected_and_not \
	tests/kernel/test_accelerate.py \
	tests/kernel/test_lifecycle.py::test_capture_survives_the_loader_and_uninstall_leaves_nothing \
	tests/kernel/test_bad_input.py::test_kernel_below_5_7_is_refused_with_a_fake_uname
kernels-ci: setup
	@bash scripts/setup.sh kernels
	$(PY) tests/kernels/run.py --kernels $${KERNELS:-5.10} --tests "$(KERNEL_CI_TESTS)"

# Our capture vs iptables vs no capture, side by side (not part of make test).
bench: setup
	@bash scripts/setup.sh bench
	$(PY) bench/run.py
	$(PY) bench/state_scaling.py

clean:
	rm -rf .venv *.egg-info .pytest_cache
