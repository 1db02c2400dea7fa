# One-command set-up: every target refreshes .venv from the repo's own files when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

# torch==2.13.0 first: the CPU build these machines serve locally. Any other torch pin may
# pull a multi-GB CUDA build. torch stays an optional extra of the package (`llm`).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[llm,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/python -m experiments.demo

bench: $(STAMP)
	$(BIN)/python -m experiments.benchmarks.all

lint: $(STAMP)
	$(BIN)/ruff check jaxsense sae experiments tests

clean:
	rm -rf $(VENV) results .pytest_cache
