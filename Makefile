# `make demo` and `make test` each create .venv on first use and install the pinned `ci` set (pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qsparse-installed

.PHONY: demo test test-all test-extended test-gpu bench-kernels clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[ci]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# pytest exits 5 when it collects nothing; make treats that as failure, as it should.
# `make test` (what CI runs) must stay under 15 minutes on 2 cores: it runs in TEST_WORKERS pytest-xdist processes
# (most tests are single-threaded compiles: 2 workers on 2 cores took 708 s where one took 975 s) and skips the tests
# marked `extended`, exhaustive variants of scenarios it still covers with a representative case, and whole
# benchmarks' CPU smoke runs; `make test-extended` runs only those, `make test-all` every test. TEST_WORKERS=0 runs
# in one process (a debugger, -x).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not extended" tests

test-extended: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m extended tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) qs-dump .pytest_cache
