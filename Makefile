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

.PHONY: test app setup browser clean bench bench-full peers

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

# Numba does not check bounds: once more, the kernel tests with NUMBA_BOUNDSCHECK=1 (an out-of-range index raises
# IndexError instead of reading garbage). Its own compile cache, so bounds-checked builds never reach the normal
# one; about 80 s cold on two cores, 15 s once that cache is warm. (cpu_q8's block dots are LLVM loads the check
# cannot see: its tests run here for the Numba indexing around them; the blocks a row holds bound those loads.)
BOUNDSCHECK_CACHE ?= $(or $(TMPDIR),/tmp)/moe-workbench-numba-boundscheck

test: $(STAMP) browser
	$(PY) -m pytest -q -n 2 --dist loadgroup
	NUMBA_BOUNDSCHECK=1 NUMBA_CACHE_DIR=$(BOUNDSCHECK_CACHE) $(PY) -m pytest -q -p no:cacheprovider tests/engine/test_kernels.py \
	  tests/engine/test_cpu_q8.py -k "not cli"

app: $(APP_STAMP)
	$(PY) -m streamlit run workbench/app.py --server.address 127.0.0.1 --server.port $(PORT)

clean:
	rm -rf .venv .pytest_cache test-artifacts

# Benchmarks are commands, not tests. They write the tables of README.md and docs/PERFORMANCE.md.
BENCH_DIR ?= $(or $(TMPDIR),/tmp)/moe-workbench-bench
THREADS ?= 2
BENCH = $(PY) -m traces bench --threads $(THREADS) --peer llama.cpp

# llama-cpp-python builds llama.cpp from source (several minutes on two cores).
peers: $(STAMP)
	@$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install -e '.[peers]'

bench: $(STAMP) peers
	@mkdir -p $(BENCH_DIR)
	@test -f $(BENCH_DIR)/bench-4l.gguf || $(PY) -m traces synth --shape qwen3-30b-a3b --layers 4 -o $(BENCH_DIR)/bench-4l.gguf
	$(BENCH) $(BENCH_DIR)/bench-4l.gguf --prompt-tokens 128 --gen-tokens 32 --profile --section cpu --update README.md --update docs/PERFORMANCE.md
	$(BENCH) $(BENCH_DIR)/bench-4l.gguf --prompt-tokens 128 --gen-tokens 32 --profile --no-compile-times --backend cpu-q8 --section cpu-q8 --update docs/PERFORMANCE.md
	$(BENCH) workbench/models/stdlib-coder-q8_0.gguf --prompt-tokens 128 --gen-tokens 64 --section embedded --update docs/PERFORMANCE.md

# The 48-layer file is about 20 GB; it is written once under BENCH_DIR and never committed. One run each: it is
# disk-bound here, and a repeat would measure a warmer page cache.
bench-full: $(STAMP) peers
	@mkdir -p $(BENCH_DIR)
	@test -f $(BENCH_DIR)/full-48l.gguf || $(PY) -m traces synth --shape qwen3-30b-a3b --layers 48 -o $(BENCH_DIR)/full-48l.gguf
	$(BENCH) $(BENCH_DIR)/full-48l.gguf --prompt-tokens 32 --gen-tokens 8 --repeats 1 --no-compile-times --section full48 --update docs/PERFORMANCE.md
