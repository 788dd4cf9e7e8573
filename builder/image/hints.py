"""What to do about a failure a user can fix: read from the output of docker, BuildKit or the engine, and
said with the setting that fixes it and the troubleshooting page's section (docs/troubleshooting.md)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

PAGE = "docs/troubleshooting.md"

TLS = re.compile(
    r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|SSLCertVerificationError|"
    r"x509: certificate signed by unknown authority|self[- ]signed certificate in certificate chain|"
    r"unable to get local issuer certificate|server certificate verification failed",
    re.IGNORECASE,
)
DISK = re.compile(r"no space left on device|\[Errno 28\]|ENOSPC|disk quota exceeded", re.IGNORECASE)
PORT = re.compile(r":(\d{1,5})(?: failed)?: (?:port is already allocated|bind: address already in use)", re.IGNORECASE)
NO_ENGINE = re.compile(
    r"Cannot connect to the Docker daemon|Is the docker daemon running|error during connect|"
    r"docker\.sock: connect: no such file",
    re.IGNORECASE,
)
NO_PERMISSION = re.compile(r"permission denied while trying to connect to the Docker daemon", re.IGNORECASE)


def tls_hint() -> str:
    return (
        "a TLS certificate was not trusted inside the build: behind a TLS-intercepting proxy, hand the build "
        "the proxy's CA bundle, e.g. `make image ... CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt` (a BuildKit "
        "secret, never stored in the image; if you passed one, it lacks the proxy's root certificate); "
        f"see {PAGE}#tls"
    )


def disk_hint() -> str:
    return (
        "the disk is full: `docker system df` shows what Docker holds (images, BuildKit's cache under its data "
        "root, often /var/lib/docker); remove images you no longer need (`docker image rm`) or BuildKit's cache "
        f"(`docker builder prune`: the next build compiles again), or free space there, then retry; see {PAGE}#disk"
    )


def port_hint(port: str, env: Mapping[str, str] | None = None) -> str:
    """Which host port is taken, and the .env variable that moves the service there (when `env` says)."""
    names = [k for k, v in (env or {}).items() if k.endswith("_PORT") and v == port]
    variable = names[0] if names else "<BACKEND>_PORT"
    return (
        f"host port {port} is already in use: stop what listens there (`ss -ltnp 'sport = :{port}'` names it; "
        f"an earlier `docker compose up` stops with `make down`), or publish another one: set {variable} in .env "
        f"(or `ports:` in a SPEC file before `make image`); see {PAGE}#ports"
    )


def engine_hint(output: str) -> str:
    """Why the docker client reached no engine, and what to do."""
    if NO_PERMISSION.search(output):
        return (
            "the Docker engine refused this user: run as root, or add the user to the `docker` group "
            f"(`sudo usermod -aG docker $USER`, then log in again); see {PAGE}#engine"
        )
    return (
        "no Docker engine answers: start one (`sudo systemctl start docker`, Docker Desktop, or on Debian/Ubuntu "
        "as root `scripts/harness.sh engine-up`), or point DOCKER_HOST at yours; "
        f"`docker info` must answer; see {PAGE}#engine"
    )


def hint(lines: Iterable[str], env: Mapping[str, str] | None = None) -> str | None:
    """The first fixable cause found in docker's output (TLS, a full disk, a taken port, no engine), or None."""
    text = "\n".join(lines)
    if TLS.search(text):
        return tls_hint()
    if DISK.search(text):
        return disk_hint()
    port = PORT.search(text)
    if port:
        return port_hint(port.group(1), env)
    if NO_ENGINE.search(text) or NO_PERMISSION.search(text):
        return engine_hint(text)
    return None


def with_hint(message: str, lines: Iterable[str], env: Mapping[str, str] | None = None) -> str:
    """`message`, then `what to do: ...` when the output shows a cause a user can fix."""
    found = hint(lines, env)
    return f"{message}\nwhat to do: {found}" if found else message
