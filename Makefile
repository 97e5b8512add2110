# Two commands on a fresh machine: `make test` and `make app`.
# Installs into the active virtual environment, or into ./.venv when none is active.
SHELL := /bin/bash
ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := .venv/bin/python
endif
STAMP := $(dir $(PY)).installed-dev
APP_STAMP := $(dir $(PY)).installed-app
PORT ?= 8501

.PHONY: test app setup browser clean

$(PY):
	python3 -m venv .venv

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP) $(APP_STAMP)

$(APP_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e .
	touch $(APP_STAMP)

setup: $(STAMP)

# The browser test drives Debian's chromium; install it when we can (root on Debian), else it is skipped.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ; } || \
	  echo "note: chromium not installed; the browser test will be skipped"

test: $(STAMP) browser
	$(PY) -m pytest -q -n 2 --dist loadgroup

app: $(APP_STAMP)
	$(PY) -m streamlit run workbench/app.py --server.port $(PORT)

clean:
	rm -rf .venv .pytest_cache test-artifacts
