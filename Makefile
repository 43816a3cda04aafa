# ebpf-tproxy. Run as root on Debian/Ubuntu: `make demo`, `make test`.
PY := .venv/bin/python

.PHONY: setup demo test test-unit test-kernel clean

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

clean:
	rm -rf .venv *.egg-info .pytest_cache
