# xllamacpp for the Xinference tests, included from the top Makefile.
#
# Xinference's llama.cpp engine imports xllamacpp (a prebuilt CPU wheel). It goes into its own folder,
# which the tests put on the Xinference processes' PYTHONPATH, so the Xinference venv stays as pinned.
# Same version as builder/backends/xinference.py XLLAMACPP_VERSION (tests/test_backends.py checks).
XLLAMACPP_VERSION := 2026.10.11549
XLLAMACPP_DIR ?= $(CURDIR)/.cache/xllamacpp-$(XLLAMACPP_VERSION)
export XLLAMACPP_DIR

.PHONY: xllamacpp
xllamacpp: $(XLLAMACPP_DIR)/.ok

$(XLLAMACPP_DIR)/.ok: mk/xllamacpp.mk | xinference-venv
	rm -rf "$(XLLAMACPP_DIR).tmp"
	"$(XINFERENCE_PY)" -m pip install -q --disable-pip-version-check --no-deps --target "$(XLLAMACPP_DIR).tmp" xllamacpp==$(XLLAMACPP_VERSION)
	rm -rf "$(XLLAMACPP_DIR)" && mv "$(XLLAMACPP_DIR).tmp" "$(XLLAMACPP_DIR)"
	touch "$@"
