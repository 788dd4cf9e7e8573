# Local stand-in for vllm/vllm-openai:v0.33.0 (nothing can be pulled here): the real, pinned
# vllm==0.33.0 from PyPI with the CUDA torch it requires, pip-installed into the system Python
# like the real image, so `python3` imports vllm and `vllm` is on PATH (/usr/local/bin).
#
# Built only on request (~9 GB): HARNESS_BASES=vllm scripts/harness.sh bases (make e2e-vllm).
# Without a GPU the server cannot start (and parts of the CLI fail), but importing vLLM and
# reading its model registry works on CPU, which is all the build-time architecture check
# (stage arch-check of Dockerfile.vllm) needs; the runtime stage sets its own ENTRYPOINT.
FROM local/python:bookworm

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONUNBUFFERED=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

# The system interpreter allows pip (EXTERNALLY-MANAGED removed in local/python:bookworm);
# pip installs into /usr/local, as in the real image's system Python.
RUN --mount=type=secret,id=ca \
    --mount=type=cache,target=/root/.cache/pip \
    PIP_CERT=/run/secrets/ca python3 -m pip install --progress-bar off vllm==0.33.0

# Fail the base build early if the registry the architecture check relies on does not work on CPU.
RUN python3 -c "import vllm; from vllm.model_executor.models import ModelRegistry; archs = ModelRegistry.get_supported_archs(); print('vllm', vllm.__version__, len(archs), 'architectures')" \
 && command -v vllm

EXPOSE 8000
ENTRYPOINT ["vllm", "serve"]
