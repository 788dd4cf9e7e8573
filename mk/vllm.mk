# vLLM end-to-end tests, included from the top Makefile.
#
# The local stand-in for vllm/vllm-openai:v0.33.0 (scripts/bases/vllm.Dockerfile: the real
# vllm==0.33.0 with its CUDA torch, ~9 GB) is built only here, not by `make e2e`: HARNESS_BASES=vllm
# limits `harness.sh bases` (and the local_bases fixture) to local/python:bookworm + local/vllm.
# Without a GPU the server never starts; the tests build the vLLM image (demo model passes the
# build-time architecture check; an architecture vLLM 0.33 dropped is refused before any heavy
# step) and check the image. The base stays cached; `scripts/harness.sh prune` does not remove it
# (docker image rm local/vllm:latest does).

.PHONY: e2e-vllm

e2e-vllm: venv wheelhouse ## vLLM image end-to-end tests (builds the ~9 GB local vLLM base on first run)
	$(HARNESS) engine-up
	HARNESS_BASES=vllm $(HARNESS) bases
	HARNESS_BASES=vllm $(PYTEST) -q -rs -m e2e tests/e2e/test_vllm.py; status=$$?; $(HARNESS) engine-down; exit $$status
