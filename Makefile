# Two commands on a fresh machine: `make test` and `make app`.
# Installs into the active virtual environment, or into ./.venv when none is active.
SHELL := /bin/bash
ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := .venv/bin/python
endif
STAMP := $(dir $(PY)).installed-dev

.PHONY: test app setup clean

$(PY):
	python3 -m venv .venv

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

app: $(STAMP)
	$(PY) -m streamlit run workbench/app.py

clean:
	rm -rf .venv .pytest_cache
