# Local stand-in for xprobe/xinference:v4.1.0 (nothing can be pulled here): Xinference 4.1.0 with
# the transformers engine on CPU torch 2.13.0, in a venv on PATH, so the runtime template's final
# stage (builder's boot script + the merged HF model folder) can be built and run against it.
#
# Build context: scripts/bases/. It must hold wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
# (copied from the host's /opt/wheels; git-ignored): PyPI's torch==2.13.0 is the multi-GB CUDA build.
# No torchvision: timm (an xinference dependency) pulls PyPI's torchvision, whose CUDA build fails
# next to the CPU torch ("operator torchvision::nms does not exist") as soon as transformers
# imports it; LLMs on the transformers engine do not need it, so it is removed.
FROM local/python:bookworm

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONUNBUFFERED=1 \
    XINFERENCE_HOME=/opt/xinference-home

RUN python3 -m venv /opt/venv

# Same pins as mk/xinference.mk's test venv (xinference 4.1.0 needs click<8.2, which rules out the
# huggingface-hub >= 1.31 that transformers 5.24 wants, so transformers 5.17.0 it is).
RUN --mount=type=secret,id=ca \
    --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=wheels,target=/wheels \
    PIP_CERT=/run/secrets/ca pip install --find-links /wheels \
      torch==2.13.0 \
      xinference==4.1.0 \
      transformers==5.17.0 \
      huggingface-hub==1.16.1 \
      accelerate==1.15.0 \
      click==8.1.8 \
      fastapi==0.136.3 \
 && pip uninstall -y torchvision \
 && python -c "import torch, transformers, xinference; print('torch', torch.__version__, 'transformers', transformers.__version__, 'xinference', xinference.__version__)" \
 && mkdir -p /opt/xinference-home

EXPOSE 9997
CMD ["xinference-local", "--host", "0.0.0.0", "--port", "9997"]
