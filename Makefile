# Two commands do everything on a fresh machine:
#   make demo   set up, then prepare data, train, translate, score and draw attention
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# tcmalloc/jemalloc from Debian's packages into .venv (no root needed): aiayn runs under them
	$(PY) -m aiayn.allocator install
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# DEMO_ARGS: training overrides, e.g. make demo DEMO_ARGS="train.max_minutes=30"
DEMO_ARGS ?=

demo: $(STAMP)
	$(PY) -m aiayn demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
