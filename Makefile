# ebpf-tproxy. Run as root on Debian/Ubuntu: `make demo`, `make test`.
PY := .venv/bin/python

.PHONY: setup demo test test-unit test-kernel test-accelerate differential bench clean

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

# Our capture vs iptables vs no capture, side by side (not part of make test).
bench: setup
	@bash scripts/setup.sh bench
	$(PY) bench/run.py
	$(PY) bench/state_scaling.py

clean:
	rm -rf .venv *.egg-info .pytest_cache
