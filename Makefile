# Two commands do everything on a fresh machine:
#   make demo   set up, then prepare data, train, translate, score and draw attention
#   make test   set up, then run the test suite (tests/test_docs.py builds the docs with --strict)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo docs bench bench-serve bench-data chromium clean

setup: $(STAMP) chromium

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,serve,docs]'
	# tcmalloc/jemalloc from Debian's packages into .venv (no root needed): aiayn runs under them
	$(PY) -m aiayn.allocator install
	touch $(STAMP)

# The explorer's browser test drives Debian's chromium (never a downloaded browser). Installed
# here once when missing and possible (root with apt, as on CI); otherwise that test skips and
# says why.
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make: installing Debian's chromium for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else \
	  echo "make: chromium is missing and cannot be installed here (needs root and apt-get): the browser test will skip"; \
	fi

test: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

# DEMO_ARGS: training overrides, e.g. make demo DEMO_ARGS="train.max_minutes=30"
DEMO_ARGS ?=

demo: $(STAMP)
	$(PY) -m aiayn demo $(DEMO_ARGS)

# The documentation site: docs/ and mkdocs.yml -> site/ (offline; not committed)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/run.py
	$(MAKE) bench-serve
	$(MAKE) bench-data

# aiayn serve under load: 500 requests from 16 clients on loopback -> benchmarks/SERVE.md
bench-serve: $(STAMP)
	$(PY) benchmarks/serve.py

# the data stage at 100k-3M pairs (prepare, train start-up, translate/evaluate of 100k lines):
# time and peak memory -> benchmarks/DATA.md (about 15 minutes; needs Multi30k in ../shared/data)
bench-data: $(STAMP)
	$(PY) benchmarks/data_scale.py

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache
