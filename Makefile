# ebpf-tproxy. Run as root on Debian/Ubuntu: `make demo`, `make test`.
PY := .venv/bin/python

.PHONY: setup demo test test-unit test-kernel test-no-accelerate test-neighbours differential bench kernels \
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

# The kernel suite again with sockmap acceleration off for every install (Kuma-style env
# var): on by default where the kernel supports it, so make test runs it accelerated.
test-no-accelerate: setup
	KUMA_TRANSPARENT_PROXY_EBPF_ACCELERATE=false $(PY) -m pytest -ra tests/kernel

# The kernel suite with every lab test inside a node that already serves three other
# namespaces with other settings (make test does that for the behaviour modules only;
# tests marked alone need the node set to themselves and run as usual).
test-neighbours: setup
	EBPF_TPROXY_TEST_NEIGHBOURS=1 $(PY) -m pytest -ra tests/kernel

# Every combination of a few Kuma settings, iptables vs eBPF (make test runs one at a time).
differential: setup
	EBPF_TPROXY_DIFFERENTIAL=large $(PY) -m pytest -ra tests/kernel/test_differential.py

# The kernel tests under Debian's 5.10, 6.1 and 6.12 kernels, booted under qemu (TCG) with
# this host's root filesystem (tests/kernels/run.py; KERNELS=6.1 for one). Under emulation a
# test takes 25-60 s: the whole matrix, three guests side by side, takes about two hours;
# README has the last table.
kernels: setup
	@bash scripts/setup.sh kernels
	$(PY) tests/kernels/run.py; rc=$$?; $(PY) tests/kernels/readme_table.py >/dev/null; exit $$rc
	$(PY) -m pytest -ra tests/unit/test_vagrantfile.py

# What CI runs: one older kernel (5.10: the one with missing features, so the skips and
# refusals are exercised), the tests marked kernel_ci: one per hook and per fallback.
kernels-ci: setup
	@bash scripts/setup.sh kernels
	$(PY) tests/kernels/run.py --kernels $${KERNELS:-5.10} --tests tests/kernel -- \
		-m "kernel_ci and not conntrack_lab and not neighbours_lab"

# Our capture vs iptables vs no capture, side by side (not part of make test).
bench: setup
	@bash scripts/setup.sh bench
	$(PY) bench/run.py
	$(PY) bench/cpu_profile.py
	$(PY) bench/state_scaling.py
	$(PY) bench/node_scaling.py
	$(PY) bench/udp_cost.py
	$(PY) bench/trace_cost.py

clean:
	rm -rf .venv *.egg-info .pytest_cache
