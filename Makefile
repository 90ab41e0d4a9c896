# Two commands a new user needs: `make demo` and `make test`.
# Python 3.11-3.13 are supported. PYTHON defaults to the first of python3, python3.13,
# python3.12, python3.11 (then pyenv's) that is one of them; `make test PYTHON=...` overrides.
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11 \
	$$HOME/.pyenv/versions/3.13*/bin/python $$HOME/.pyenv/versions/3.12*/bin/python \
	$$HOME/.pyenv/versions/3.11*/bin/python; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' \
	2>/dev/null && { echo $$p; break; }; done)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean check-python

check-python:
	@test -n "$(PYTHON)" || { echo "alpa_lite needs Python 3.11, 3.12 or 3.13: none was found" \
		"(python3 is $$(python3 --version 2>&1)). Install one, or pass PYTHON=/path/to/python3.12."; exit 1; }

$(STAMP): pyproject.toml | check-python
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=8" $(PY) examples/quickstart.py

test: $(STAMP)
	@$(PY) -c 'import sys, jax, pulp; print(f"Python {sys.version.split()[0]}, jax {jax.__version__}, PuLP {pulp.__version__}")'
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf .venv .venv-* build *.egg-info .pytest_cache
