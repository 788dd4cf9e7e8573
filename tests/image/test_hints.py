"""Failures a user can fix say what to do: a TLS error inside a build names CA_BUNDLE= and the troubleshooting
page, a full disk, a taken port and a missing engine each their fix. Driven through builder.image.docker with
stand-in docker clients that print what the real ones print, and exit as they do."""

from __future__ import annotations

import errno
import re
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.errors import BuilderError
from builder.image import hints
from builder.image.docker import Docker

ROOT = Path(__file__).resolve().parents[2]

PIP_TLS = (
    "#14 4.213 WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after "
    "connection broken by 'SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
    "verify failed: self-signed certificate in certificate chain (_ssl.c:1000)'))': /simple/torch/"
)
BUILD_LOG = f"""#1 [internal] load build definition from Dockerfile.llamacpp
#1 DONE 0.0s
#14 [build-env 3/5] RUN --mount=type=cache,target=/root/.cache/pip pip install -r /tmp/requirements-build.txt
{PIP_TLS}
#14 9.871 ERROR: Could not find a version that satisfies the requirement torch==2.13.0 (from versions: none)
#14 ERROR: process "/bin/sh -c pip install -r /tmp/requirements-build.txt" did not complete successfully: exit code: 1
"""
DISK_LOG = """#9 [gguf 1/1] RUN python3 -m builder convert --format gguf --model /in/model --quant q4_k_m --out /w/models/model.gguf
#9 41.20 OSError: [Errno 28] No space left on device
#9 ERROR: process "/bin/sh -c python3 -m builder convert" did not complete successfully: exit code: 1
"""
PORT_TAKEN = (
    "Error response from daemon: driver failed programming external connectivity on endpoint llm-llamacpp-1 "
    "(5f0c): Bind for 127.0.0.1:8002 failed: port is already allocated"
)
PORT_BOUND = (
    "Error response from daemon: failed to set up container networking: driver failed programming external "
    "connectivity on endpoint llm-chatglmcpp-1: failed to bind host port for 127.0.0.1:8001:172.18.0.2:8001/tcp: "
    "listen tcp4 127.0.0.1:8001: bind: address already in use"
)
NO_DAEMON = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?"
NO_RIGHTS = (
    "permission denied while trying to connect to the Docker daemon socket at unix:///var/run/docker.sock: "
    'Get "http://%2Fvar%2Frun%2Fdocker.sock/v1.24/info": dial unix /var/run/docker.sock: connect: permission denied'
)


def _client(tmp_path: Path, stdout: str = "", stderr: str = "", code: int = 1) -> Docker:
    """A docker client that prints `stdout` and `stderr` (as the real one's output) and exits `code`."""
    (tmp_path / "out.txt").write_text(stdout)
    (tmp_path / "err.txt").write_text(stderr)
    script = tmp_path / "docker"
    script.write_text(f'#!/bin/sh\ncat "{tmp_path}/out.txt"\ncat "{tmp_path}/err.txt" >&2\nexit {code}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return Docker(str(script), buildx=True)


def _build(docker: Docker, tmp_path: Path) -> str:
    with pytest.raises(BuilderError) as err:
        docker.build(tmp_path, tmp_path / "Dockerfile", "llm-llamacpp:latest", {}, {}, tmp_path / "build.log")
    return str(err.value)


def test_a_tls_failure_in_a_build_names_ca_bundle_and_the_page(tmp_path):
    message = _build(_client(tmp_path, stdout=BUILD_LOG), tmp_path)
    assert "failed in stage `build-env`" in message  # the report is kept, the hint comes after it
    assert "what to do:" in message and "CA_BUNDLE=" in message and "docs/troubleshooting.md#tls" in message


def test_a_full_disk_in_a_build_says_what_holds_the_space(tmp_path):
    message = _build(_client(tmp_path, stdout=DISK_LOG), tmp_path)
    assert "the disk is full" in message and "docker system df" in message and "#disk" in message
    assert "CA_BUNDLE" not in message


def test_an_unrelated_build_failure_gets_no_hint(tmp_path):
    log = BUILD_LOG.replace(PIP_TLS, "#14 3.1 error: model type 'llama' is not supported")
    assert "what to do" not in _build(_client(tmp_path, stdout=log), tmp_path)


@pytest.mark.parametrize(
    ("stderr", "port", "variable"), [(PORT_TAKEN, "8002", "LLAMACPP_PORT"), (PORT_BOUND, "8001", "CHATGLMCPP_PORT")]
)
def test_a_taken_port_on_compose_up_names_it_and_its_env_variable(tmp_path, stderr, port, variable):
    (tmp_path / ".env").write_text("# written by builder build\nCHATGLMCPP_PORT=8001\nLLAMACPP_PORT=8002\n")
    with pytest.raises(BuilderError) as err:
        _client(tmp_path, stderr=stderr).compose(["up", "-d", "--wait"], tmp_path)
    message = str(err.value)
    assert f"host port {port} is already in use" in message and f"set {variable} in .env" in message
    assert "make down" in message and "docs/troubleshooting.md#ports" in message


def test_a_taken_port_without_env_names_the_pattern():
    assert "set <BACKEND>_PORT in .env" in hints.hint([PORT_TAKEN])


@pytest.mark.parametrize(("stderr", "fix"), [(NO_DAEMON, "start one"), (NO_RIGHTS, "docker` group")])
def test_no_engine_says_how_to_get_one(tmp_path, stderr, fix):
    with pytest.raises(BuilderError, match=re.escape(fix)) as err:
        _client(tmp_path, stderr=stderr).require_engine()
    assert "docs/troubleshooting.md#engine" in str(err.value)


def test_a_full_disk_outside_docker_says_what_to_do(monkeypatch):
    """An ENOSPC raised by a host command (merge, convert) is answered like a BuilderError, with the fix."""
    from builder import cli

    def full(**_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builder.model.merge.merge_model", full)
    result = CliRunner().invoke(cli.cli, ["merge", "--adapter", "x", "--base", "y", "--out", "z"])
    assert result.exit_code == 2, result.output
    assert "No space left on device" in result.output and "docker system df" in result.output


def test_every_hint_points_at_a_section_of_the_troubleshooting_page():
    page = (ROOT / hints.PAGE).read_text()
    anchors = set(re.findall(r"\{ #([a-z-]+) \}", page))
    texts = [
        hints.tls_hint(),
        hints.disk_hint(),
        hints.port_hint("1"),
        hints.engine_hint(""),
        hints.engine_hint(NO_RIGHTS),
    ]
    for text in texts:
        (anchor,) = re.findall(rf"{re.escape(hints.PAGE)}#([a-z-]+)", text)
        assert anchor in anchors, (anchor, text)
