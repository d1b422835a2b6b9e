# Two commands a fresh clone needs:
#   make demo   - set up the core + onnx + server + sim extras (no TensorFlow) and walk the product path on the default
#   make test   - set up everything (torch, ONNX Runtime training, TF, server, node deps, chromium), lint, type-check, run all tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
JS_DIR := device_runtime/js

.PHONY: demo test setup setup-core setup-demo setup-browser lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24"

# torch is pinned to the local CPU wheel (any other spec downloads CUDA builds)
$(VENV)/.core: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

# what `splitexport demo` needs: ONNX Runtime training for the devices, the server, the harness's digits and
# plots (sim: scikit-learn, matplotlib), still no TensorFlow
$(VENV)/.demo: $(VENV)/.core
	$(BIN)/pip install -q -e ".[onnx,server,sim]"
	touch $@

$(VENV)/.all: $(VENV)/.core
	$(BIN)/pip install -q -e ".[all]"
	$(BIN)/pip check
	touch $@

$(JS_DIR)/node_modules/.installed: $(wildcard $(JS_DIR)/package*.json)
	@if [ -f $(JS_DIR)/package.json ]; then cd $(JS_DIR) && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; fi

# the browser tests (tests/browser/) drive Debian's chromium with puppeteer-core; apt needs root
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" != 0 ]; then echo "chromium is missing: run 'sudo apt-get install -y chromium' (or set CHROMIUM=)"; exit 1; fi
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

setup-core: $(VENV)/.core
setup-demo: $(VENV)/.demo
setup-browser: $(CHROMIUM)
setup: $(VENV)/.all $(JS_DIR)/node_modules/.installed setup-browser

demo: setup-demo
	$(BIN)/splitexport demo --out splitexport-demo

test: setup lint typecheck
	$(BIN)/python -m pytest
	@# the TF.js equivalence cases already ran under pytest (tests/device_runtime/test_tfjs_runtime.py)
	@if [ -f $(JS_DIR)/package.json ]; then cd $(JS_DIR) && SPLITEXPORT_JS_EQUIVALENCE=0 npm test; fi
	SPLITEXPORT_PYTHON=$(abspath $(BIN)/python) CHROMIUM=$(CHROMIUM) node --test tests/browser/

lint: setup
	$(BIN)/ruff check splitexport server device_runtime tests benchmarks

typecheck: setup
	$(BIN)/mypy

clean:
	rm -rf $(VENV) splitexport-demo splitexport-results $(JS_DIR)/node_modules
