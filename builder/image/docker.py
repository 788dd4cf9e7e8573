"""The only module that runs the docker CLI (build, inspect, push, compose).

BuildKit is required (cache and secret mounts). `docker buildx build --load` is used when the
client has buildx; else `DOCKER_BUILDKIT=1 docker build` with a client older than 23.0 (which
still drives BuildKit itself). A 23+ client without buildx cannot, so it is skipped for another.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import BuilderError
from builder.image.hints import PAGE, engine_hint, with_hint

# Debian's docker.io client (20.10) still drives BuildKit itself under DOCKER_BUILDKIT=1.
FALLBACK_CLIENT = "/usr/bin/docker"


@dataclass
class BuildFailure:
    stage: str
    step: str
    tail: list[str] = field(default_factory=list)


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


@dataclass
class Docker:
    client: str
    buildx: bool

    @classmethod
    def detect(cls) -> Docker:
        candidates = [os.environ.get("DOCKER", ""), shutil.which("docker") or "", FALLBACK_CLIENT]
        seen: list[str] = []
        for client in filter(None, candidates):
            if client in seen or not shutil.which(client):
                continue
            seen.append(client)
            if _run([client, "buildx", "version"]).returncode == 0:
                return cls(client, buildx=True)
            version = _run([client, "version", "--format", "{{.Client.Version}}"]).stdout.strip()
            major = int(re.match(r"(\d+)", version).group(1)) if re.match(r"\d+", version) else 0
            if 0 < major < 23:
                return cls(client, buildx=False)
        raise BuilderError(
            "no docker client that can build with BuildKit: install the buildx plugin, or set DOCKER= to a "
            f"client older than 23.0 (tried: {', '.join(seen) or 'none found'}); see {PAGE}#buildx"
        )

    # -- engine --------------------------------------------------------------------------------

    def ping(self) -> bool:
        return _run([self.client, "info", "--format", "{{.ServerVersion}}"]).returncode == 0

    def require_engine(self) -> None:
        res = _run([self.client, "info", "--format", "{{.ServerVersion}}"])
        if res.returncode != 0:
            raise BuilderError(engine_hint(res.stderr + res.stdout))

    # -- build ---------------------------------------------------------------------------------

    def build(
        self,
        context: Path,
        dockerfile: Path,
        tag: str,
        build_args: dict[str, str],
        secrets: dict[str, Path],
        log: Path,
        target: str = "runtime",
        on_line: Callable[[str], None] | None = None,
        output: Path | None = None,
    ) -> None:
        """Build one image; streams plain progress to `log` (and `on_line`); names the failing step.
        With `output`, the target's files are exported into that folder instead (`--output type=local`,
        which a 20.10 client under DOCKER_BUILDKIT=1 has too); `tag` then only names it in messages."""
        argv = [self.client] + (["buildx", "build"] if self.buildx else ["build"])
        if output is None:
            argv += (["--load"] if self.buildx else []) + ["-t", tag]
        else:
            argv += ["--output", f"type=local,dest={output}"]
        argv += ["--progress=plain", "-f", str(dockerfile), "--target", target]
        for key, value in build_args.items():
            argv += ["--build-arg", f"{key}={value}"]
        for sid, path in secrets.items():
            argv += ["--secret", f"id={sid},src={path}"]
        argv.append(str(context))
        env = {**os.environ, "DOCKER_BUILDKIT": "1"}
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w", buffering=1) as out:  # line-buffered: the log is followed live
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            lines: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                lines.append(line.rstrip("\n"))
                if on_line:
                    on_line(line.rstrip("\n"))
            code = proc.wait()
        if code != 0:
            failure = parse_failure(lines)
            message = (
                f"building {tag} failed in stage `{failure.stage}` at step `{failure.step}`\n"
                + "\n".join(f"  | {t}" for t in failure.tail)
                + f"\nfull log: {log}"
            )
            raise BuilderError(with_hint(message, failure.tail or lines))

    # -- images --------------------------------------------------------------------------------

    def inspect(self, ref: str) -> dict:
        res = _run([self.client, "image", "inspect", ref])
        if res.returncode != 0:
            raise BuilderError(f"no local image {ref}: build it first (make image)")
        return json.loads(res.stdout)[0]

    def push(self, ref: str) -> str:
        """Push and return the manifest digest the registry reported."""
        res = _run([self.client, "push", ref])
        if res.returncode != 0:
            message = f"pushing {ref} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}"
            raise BuilderError(with_hint(message, [res.stderr, res.stdout]))
        match = re.search(r"digest: (sha256:[0-9a-f]{64})", res.stdout)
        if not match:
            raise BuilderError(f"pushing {ref}: the registry reported no digest")
        return match.group(1)

    def run(self, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        res = _run([self.client, *args], env={**os.environ, **env} if env else None)
        if check and res.returncode != 0:
            raise BuilderError(with_hint(f"`docker {' '.join(args)}` failed: {res.stderr.strip()}", [res.stderr]))
        return res

    def compose(self, args: Iterable[str], project_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
        args = list(args)
        res = _run([self.client, "compose", "--project-directory", str(project_dir), *args])
        if check and res.returncode != 0:
            message = f"`docker compose {' '.join(args)}` failed:\n{res.stderr.strip()}"
            raise BuilderError(with_hint(message, [res.stderr], _env_file(project_dir / ".env")))
        return res


def _env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose .env (none when it is missing), to name the variable of a taken port."""
    if not path.is_file():
        return {}
    pairs = (line.partition("=") for line in path.read_text().splitlines() if "=" in line and line[:1] != "#")
    return {key.strip(): value.strip() for key, _, value in pairs}


_STEP = re.compile(r"^#(\d+) \[([\w.-]+)(?: \d+/\d+)?\] (.*)$")


def parse_failure(lines: list[str]) -> BuildFailure:
    """From BuildKit's plain progress, the stage and instruction that failed, with its last output."""
    steps: dict[str, tuple[str, str]] = {}
    failed_id = None
    for line in lines:
        m = _STEP.match(line)
        if m:
            steps[m.group(1)] = (m.group(2), m.group(3))
        m = re.match(r"^#(\d+) ERROR", line)
        if m:
            failed_id = m.group(1)
    if failed_id and failed_id in steps:
        stage, step = steps[failed_id]
        tail = [line for line in lines if line.startswith(f"#{failed_id} ")][-15:]
    else:
        stage, step = "?", "?"
        tail = lines[-15:]
    return BuildFailure(stage=stage, step=step, tail=tail)
