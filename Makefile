# One command per job. Variables (all optional; unset ones fall back to SPEC's YAML, then defaults):
#   MODEL=<folder|hub id>  ADAPTER=<lora folder | run folder | name=path,...>  LORA=auto|merge|serve
#   BACKEND=auto|<comma list of backends>  DEVICE=auto|cpu|cuda (auto: vLLM on CUDA, the others on CPU)
#   QUANT=<type> (default: GGUF q4_k_m, GGML q8_0)  TAG=latest  REGISTRY=<host[:port]/ns>  NAME=llm  SPEC=<build.yaml>
#   CA_BUNDLE=<pem>  WHEELHOUSE=<dir of wheels>
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BUILDER := $(VENV)/bin/python -m builder
PYTEST := $(VENV)/bin/python -m pytest
HARNESS := scripts/harness.sh

# Make variables reach the builder as environment variables BUILDER_<NAME>, which its CLI reads as
# the matching flag (builder/cli.py). A value is never pasted into a shell command line, and
# $(value ...) hands it over unexpanded: spaces, quotes, `;`, `$(...)` and backticks arrive as
# typed, and the spec then accepts or refuses them.
SPEC_VARS := SPEC MODEL ADAPTER LORA BACKEND QUANT DEVICE TAG REGISTRY NAME CA_BUNDLE WHEELHOUSE \
	QUALITY QUALITY_MIN_TOP1 EVAL QUANTS CALIBRATION
$(foreach v,$(SPEC_VARS),$(eval export BUILDER_$(v) := $$(value $(v))))
# ...and the variables themselves stay out of recipe environments, where Make would expand them.
unexport $(SPEC_VARS)

.PHONY: help venv test-setup test test-quality quality e2e spec image push up down smoke demo demo-vllm-cpu render k8s cluster-up cluster-down lint fmt clean wheelhouse llamacpp docs

include mk/xinference.mk mk/xllamacpp.mk mk/vllm.mk

help: ## list targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([^:]+):.*## (.*)/  make \1\t\2/' | sort

# The bare venv (python and pip, seconds) on its own: the llama.cpp compile needs only that, so it
# need not wait for the install below.
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# chatglm-cpp (test extras) compiles from its sdist: only its extension (builder/runtime/chatglmcpp/
# extension-only.cmake; setup.py splits CMAKE_ARGS at spaces, so not from a checkout whose path has one).
CHATGLM_CMAKE_ARGS := $(if $(word 2,$(CURDIR)),,-DCMAKE_PROJECT_INCLUDE=$(CURDIR)/builder/runtime/chatglmcpp/extension-only.cmake)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	# torch pinned first: a bare `torch` would pull a multi-GB CUDA build.
	CMAKE_POLICY_VERSION_MINIMUM=3.5 CMAKE_ARGS='$(CHATGLM_CMAKE_ARGS)' \
	  $(VENV)/bin/pip install --disable-pip-version-check -q torch==2.13.0 -e '.[test]'
	touch $@

venv: $(VENV)/.installed ## create .venv with the project and its test extras

# What `make demo` needs on the host: the build extra (torch, transformers, peft: it trains the demo
# model there). Not the test extras: chatglm-cpp's sdist compile alone is minutes, and the images
# compile their own. Nothing to do where the full venv is installed and current.
$(VENV)/.installed-build: pyproject.toml | $(VENV)/bin/python
	if [ $(VENV)/.installed -nt pyproject.toml ]; then touch $@; else \
	  $(VENV)/bin/pip install --disable-pip-version-check -q torch==2.13.0 -e '.[build]' && touch $@; fi

# What `make test` needs, as three independent chains run side by side: the project venv (its
# chatglm-cpp sdist compiles), the Xinference venv then xllamacpp (downloads), and the llama.cpp
# compile (needs only the bare venv). Each step is idempotent, so a second run is seconds.
# SETUP_JOBS=1 runs them one after another.
SETUP_JOBS ?= 3
test-setup: venv xinference-venv llamacpp xllamacpp

# The tests run in TEST_JOBS processes (pytest-xdist), each taking a whole test file at a time, so a
# file's module fixtures (a trained model, a booted server) are made once. Most tests wait on a server
# or a tool for part of their time: on 2 cores 2 processes take 5 minutes where one takes 8.
# Files go out in collection order (--no-loadscope-reorder), which tests/conftest.py makes slow files first.
# TEST_JOBS=0 runs them in this process; more suit a bigger machine.
TEST_JOBS ?= 2

test: ## unit and integration tests (no Docker)
	$(MAKE) --no-print-directory -j$(SETUP_JOBS) --output-sync=line test-setup
	$(PYTEST) -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

# The real-model quality measurements (SmolLM2-135M from PyPI + a LoRA trained in the test, four GGUF
# types, an importance matrix): minutes, so `make test` leaves them out (pytest marker `quality`).
test-quality: venv llamacpp ## the slow real-model quality tests (pytest -m quality)
	$(PYTEST) -q -m quality

# llama-server, llama-quantize and the quality tools (llama-perplexity, llama-imatrix) for the host tests,
# compiled once from the pinned llama.cpp source (builder/model/gguf/llamacpp.py) into .cache/llama.cpp/;
# rebuilt only when the pin or flags change.
llamacpp: | $(VENV)/bin/python ## build llama.cpp's server, quantizer and quality tools for this machine (cached under .cache/llama.cpp)
	$(VENV)/bin/python -m builder.model.gguf.llamacpp host

wheelhouse: ## .cache/wheelhouse: the CPU torch wheel this machine kind ships, for image builds
	mkdir -p .cache/wheelhouse && for w in /opt/wheels/*.whl; do [ -e "$$w" ] || continue; \
	  [ -e ".cache/wheelhouse/$${w##*/}" ] || ln "$$w" .cache/wheelhouse/ 2>/dev/null || cp "$$w" .cache/wheelhouse/; done

e2e: venv wheelhouse ## Docker end-to-end tests (starts a Docker engine and a local registry when none runs)
	$(HARNESS) engine-up
	$(HARNESS) registry-up
	$(PYTEST) -q -m e2e tests/e2e; status=$$?; $(HARNESS) registry-down; $(HARNESS) engine-down; exit $$status

render: venv ## re-render the committed files: Dockerfiles, compose files, k8s/
	$(BUILDER) render --out .
	$(BUILDER) k8s --out k8s

k8s: venv ## Kubernetes manifests into k8s/ (kustomize bases; images by digest after make push)
	$(BUILDER) k8s --out k8s

spec: venv ## print the resolved build spec (YAML, usable as SPEC=) and the backends it would build
	$(BUILDER) spec

image: venv ## build images: make image MODEL=... [ADAPTER=...] [BACKEND=...] [QUANT=...]
	$(BUILDER) build

quality: venv llamacpp ## compare GGUF types: make quality MODEL=... [ADAPTER=...] [QUANTS=q8_0,q4_k_m] [EVAL=...] [CALIBRATION=...]
	$(BUILDER) quality

push: venv ## push built images: make push REGISTRY=host:port
	$(BUILDER) push

up: ## start what `make image` built (docker compose reads .env)
	docker compose up -d --wait

down: ## stop it
	docker compose down

cluster-up: ## Xinference's distributed mode on this host: a supervisor and 2 workers, the model on both
	docker compose -f compose.xinference-cluster.yaml up -d --wait

cluster-down: ## stop it
	docker compose -f compose.xinference-cluster.yaml down

smoke: venv ## OpenAI API checks against every service that is up
	$(BUILDER) smoke-up

demo: $(VENV)/.installed-build wheelhouse ## build the embedded demo model, serve it, ask it the LoRA's question
	$(BUILDER) demo

demo-vllm-cpu: $(VENV)/.installed-build ## the demo's LoRAs served unmerged by vLLM on CPU (builds a 4 GB base first)
	$(BUILDER) demo-vllm-cpu

lint: venv ## ruff (format + lint), hadolint the Dockerfiles, generated docs fresh, the docs site in strict mode (compose.yaml: make test)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint Dockerfile.*
	$(VENV)/bin/python -m builder.reference --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

# The reference pages (docs/reference/, README's backend table) are generated from the code, then the
# site is built into site/ (open site/index.html).
docs: venv ## regenerate docs/reference/ from the code and build the docs site into site/
	$(VENV)/bin/python -m builder.reference
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

fmt: venv ## ruff: format the tree and apply safe fixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean: ## remove build outputs (not .venv)
	rm -rf build .pytest_cache site
