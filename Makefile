# One entry point for set-up, tests and the demo. The venv is created on first use;
# torch is pinned to the CPU wheel this machine carries (any other spec pulls a CUDA build).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL  ?=

.PHONY: test demo bench bench-quick torture clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# Two workers (the CI machine's two cores) that steal tests from each other so the long
# reliability file does not run alone at the end. TEST_JOBS=0 runs in one process.
TEST_JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist worksteal)

demo: $(STAMP)
	$(PY) scripts/demo.py $(if $(MODEL),--model $(MODEL))

BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

torture: $(STAMP)
	MSTORE_TORTURE_KILLS=$${MSTORE_TORTURE_KILLS:-60} $(PY) -m pytest -q -s \
		tests/test_reliability.py -k "campaign or failpoint or power_loss or race"

clean-venv:
	rm -rf $(VENV)
