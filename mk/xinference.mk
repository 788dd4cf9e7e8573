# Xinference test environment, included from the top Makefile.
#
# xinference==4.1.0 cannot share the project venv: it pins click<8.2 and fastapi<0.137, while
# transformers 5.24 needs huggingface-hub>=1.31, which needs click>=8.4.2. So it lives in its own
# venv; tests/runtime/xinference/ runs `xinference-local` and the Xinference Python client from
# there as subprocesses and finds it through XINFERENCE_VENV (exported below for `make test`).
# torch==2.13.0 resolves to the local CPU wheel in /opt/wheels (PIP_FIND_LINKS); plain PyPI torch
# would be the multi-GB CUDA build. torchvision (pulled by timm) is removed: PyPI's build breaks
# next to the CPU torch ("operator torchvision::nms does not exist") and LLMs don't need it.
# Same pins as scripts/bases/xinference.Dockerfile.

XINFERENCE_VENV ?= $(CURDIR)/.venv-xinference
XINFERENCE_PY := $(XINFERENCE_VENV)/bin/python
XINFERENCE_PINS := torch==2.13.0 xinference==4.1.0 transformers==5.17.0 huggingface-hub==1.16.1 \
	accelerate==1.15.0 click==8.1.8 fastapi==0.136.3
export XINFERENCE_VENV

.PHONY: xinference-venv xinference-venv-clean

# Idempotent: the stamp records the pins; a change of pins (or a broken venv) rebuilds it, while an
# edit elsewhere in this file only refreshes the stamp. One shell command: an `exit 0` on a recipe
# line of its own would not stop the lines after it.
xinference-venv: $(XINFERENCE_VENV)/.pins-ok

$(XINFERENCE_VENV)/.pins-ok: mk/xinference.mk
	@if [ -x "$(XINFERENCE_PY)" ] && [ -f "$@" ] && [ "$$(cat $@)" = "$(XINFERENCE_PINS)" ]; then touch "$@"; else \
	  set -ex; \
	  python3 -m venv "$(XINFERENCE_VENV)"; \
	  "$(XINFERENCE_PY)" -m pip install -q $(XINFERENCE_PINS); \
	  "$(XINFERENCE_PY)" -m pip uninstall -y -q torchvision || true; \
	  "$(XINFERENCE_PY)" -c "import torch, xinference.client, xinference.deploy.local; print('xinference venv:', xinference.__version__, 'torch', torch.__version__)"; \
	  echo "$(XINFERENCE_PINS)" > "$@"; \
	fi

xinference-venv-clean:
	rm -rf "$(XINFERENCE_VENV)"
