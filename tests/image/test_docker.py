"""builder.image.docker without an engine: client choice and build-failure reports."""

import stat
from pathlib import Path

import pytest

from builder.errors import BuilderError
from builder.image.docker import Docker, parse_failure

LOG = """#1 [internal] load build definition from Dockerfile.chatglmcpp
#1 DONE 0.0s
#7 [build-env 4/5] RUN pip install -r /tmp/requirements-build.txt
#7 CACHED
#12 [ggml 1/1] RUN python3 -m builder convert --model /in/model --quant q4_0 --out /out/model.ggml
#12 3.1 error: model type 'llama' is not supported by chatglm.cpp
#12 ERROR: process "/bin/sh -c python3 -m builder convert" did not complete successfully: exit code: 2
------
 > [ggml 1/1] RUN python3 -m builder convert:
"""


def test_failure_names_stage_and_step():
    failure = parse_failure(LOG.splitlines())
    assert failure.stage == "ggml"
    assert failure.step.startswith("RUN python3 -m builder convert")
    assert any("not supported by chatglm.cpp" in line for line in failure.tail)


def _fake_client(tmp_path: Path, name: str, buildx: bool, version: str) -> Path:
    script = tmp_path / name
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = buildx ]; then exit {0 if buildx else 1}; fi\n'
        f'if [ "$1" = version ]; then echo {version}; exit 0; fi\nexit 1\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_detect_prefers_buildx_then_legacy_buildkit(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    modern = _fake_client(tmp_path, "docker", buildx=True, version="28.2.2")
    monkeypatch.setenv("DOCKER", str(modern))
    assert Docker.detect() == Docker(str(modern), buildx=True)
    legacy = _fake_client(tmp_path, "docker20", buildx=False, version="20.10.24+dfsg1")
    monkeypatch.setenv("DOCKER", str(legacy))
    assert Docker.detect() == Docker(str(legacy), buildx=False)


def test_detect_refuses_modern_client_without_buildx(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("builder.image.docker.FALLBACK_CLIENT", str(tmp_path / "absent"))
    monkeypatch.setenv("DOCKER", str(_fake_client(tmp_path, "docker", buildx=False, version="28.2.2")))
    with pytest.raises(BuilderError, match="buildx"):
        Docker.detect()
