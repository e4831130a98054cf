# Set-up and everyday commands. `make test` and `make demo` work on a fresh machine:
# they create .venv from the pinned CPU lock file first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qmath-installed
PYTEST_ARGS ?=

.PHONY: setup test test-unit test-distributed lint format demo bench clean

$(STAMP): requirements/cpu-lock.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), f"need Python >= 3.11, got {sys.version}"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 in the lock is the CPU build; an unpinned torch would pull CUDA wheels.
	$(PY) -m pip install --quiet -r requirements/cpu-lock.txt
	$(PY) -m pip install --quiet --no-deps -e .
	# bubblewrap gives the code sandbox (qmath exec) its strong isolation; never fatal.
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && (apt-get install -y -q --no-install-recommends bubblewrap || (apt-get update -q && apt-get install -y -q --no-install-recommends bubblewrap)); } || echo "warning: bubblewrap (bwrap) is not installed and could not be installed here: the code sandbox falls back to weak isolation (rlimits); install it with 'apt-get install bubblewrap'"
	touch $(STAMP)

setup: $(STAMP)

test: setup lint
	$(PY) -m pytest tests -ra --durations=15 $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit -ra $(PYTEST_ARGS)

test-distributed: setup
	$(PY) -m pytest tests/distributed -ra $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: setup
	$(VENV)/bin/qmath demo --out demo_out

bench: setup
	$(PY) bench/convert_memory.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
