# The two commands a new user runs: `make demo` and `make test`.
# Both do all the set-up first: system packages, .venv, the project and its dev deps.

# The venv's interpreter: Debian's python3.11, built with profile-guided and
# link-time optimisation and libpython linked in. A plain source build (pyenv's,
# say: a shared libpython, neither optimisation) measured 15% more of lb's own CPU
# per request (README, "The interpreter"). `make setup PYTHON=...` for another;
# an existing .venv is kept whatever it was made from (`rm -rf .venv` to change).
PYTHON ?= /usr/bin/python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The hot path (proxycore/compiled.py) is compiled with mypyc when any proxy source changes.
HOT_STAMP := build/.hot-stamp
HOT_SOURCES := $(wildcard lb/*.py dbproxy/*.py proxycore/*.py) scripts/compile_hot.py

.PHONY: demo test lint format setup system-deps down clean pure compose-up compose-down

# The compose file's profile for `make compose-up`: python (lb + dbproxy) or classic.
PROFILE ?= python

setup: system-deps $(STAMP) $(HOT_STAMP)

system-deps:
	@bash scripts/system-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	@touch $@

$(HOT_STAMP): $(STAMP) $(HOT_SOURCES)
	$(PY) scripts/compile_hot.py
	@mkdir -p build && touch $@

# Run the hot path from its sources: drop the compiled modules (`make setup` builds them again).
pure:
	rm -f lb/*.so dbproxy/*.so proxycore/*.so proxycore/_hot_sources.txt $(HOT_STAMP)

demo: setup
	$(PY) -m stack down
	$(PY) -m stack up --proxies python
	$(PY) -m stack demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

down: setup
	$(PY) -m stack down

# docker-compose-balance.yml for real: Docker where there is one, else podman with
# local stand-in images (stack/standins.py; the first run builds them, a few minutes).
compose-up: setup
	$(PY) -m stack.containers up --profile $(PROFILE)

compose-down: setup
	$(PY) -m stack.containers down

clean: down
	rm -rf .stack
