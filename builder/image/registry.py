"""A client of the OCI distribution API (stdlib urllib): blobs and manifests, for what `docker push` cannot send
(model artifacts: files as raw layers, a config of their own media type).

Plain HTTP for loopback registries (localhost, 127.x, [::1]: what Docker allows without TLS), HTTPS elsewhere.
Credentials: the `auths` entries of the Docker client's config.json (`docker login` without a credential
store); a registry that answers 401 gets them as Basic auth, or through its Bearer token endpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from builder.errors import BuilderError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_ACCEPT = ", ".join(
    [OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json", "application/vnd.oci.image.index.v1+json"]
)
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def split_ref(ref: str) -> tuple[str, str, str]:
    """ "host[:port]/path/repo:tag" (or @digest) -> (host, repository, tag or digest)."""
    host, _, rest = ref.partition("/")
    if not rest:
        raise BuilderError(f"{ref}: no registry host in the reference")
    if "@" in rest:
        repo, _, reference = rest.partition("@")
    else:
        repo, _, reference = rest.rpartition(":") if ":" in rest else (rest, "", "latest")
    return host, repo, reference


def _loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    return name == "localhost" or name.startswith("127.") or name == "[::1]"


def _docker_credentials(host: str) -> str | None:
    """The base64 user:password `docker login` stored for `host` (None: none, or kept in a credential store)."""
    config = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json"
    try:
        auths = json.loads(config.read_text()).get("auths", {})
    except (OSError, ValueError):
        return None
    for key in (host, f"https://{host}", f"http://{host}"):
        if isinstance(auths.get(key), dict) and auths[key].get("auth"):
            return auths[key]["auth"]
    return None


@dataclass
class Registry:
    host: str
    scheme: str = ""
    _auth: dict[str, str] = field(default_factory=dict)  # scope -> Authorization header value

    def __post_init__(self) -> None:
        self.scheme = self.scheme or ("http" if _loopback(self.host) else "https")

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _request(self, method: str, url: str, scope: str, data=None, headers: dict | None = None):
        """urlopen with the scope's credentials; on 401 obtains them once (Basic or Bearer) and retries."""
        for attempt in (0, 1):
            hdrs = dict(headers or {})
            if scope in self._auth:
                hdrs["Authorization"] = self._auth[scope]
            req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
            try:
                return urllib.request.urlopen(req, timeout=600)
            except urllib.error.HTTPError as e:
                if e.code != 401 or attempt or not self._login(e.headers.get("WWW-Authenticate", ""), scope):
                    raise
                if hasattr(data, "seek"):
                    data.seek(0)
        raise AssertionError("unreachable")

    def _login(self, challenge: str, scope: str) -> bool:
        creds = _docker_credentials(self.host)
        if challenge.lower().startswith("basic") and creds:
            self._auth[scope] = f"Basic {creds}"
            return True
        if not challenge.lower().startswith("bearer"):
            return False
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        query = urllib.parse.urlencode({"service": params.get("service", ""), "scope": scope})
        req = urllib.request.Request(f"{params['realm']}?{query}")
        if creds:
            req.add_header("Authorization", f"Basic {creds}")
        with urllib.request.urlopen(req, timeout=60) as res:
            body = json.loads(res.read())
        self._auth[scope] = f"Bearer {body.get('token') or body.get('access_token')}"
        return True

    def _url(self, repo: str, path: str) -> str:
        return f"{self.scheme}://{self.host}/v2/{repo}/{path}"

    @staticmethod
    def _scope(repo: str, push: bool = True) -> str:
        return f"repository:{repo}:{'pull,push' if push else 'pull'}"

    # -- blobs ------------------------------------------------------------------------------------------------

    def has_blob(self, repo: str, digest: str) -> bool:
        try:
            with self._request("HEAD", self._url(repo, f"blobs/{digest}"), self._scope(repo, push=False)):
                return True
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            raise BuilderError(f"{self.host}/{repo}: HEAD blob {digest} answered {e.code}") from None

    def put_blob(self, repo: str, digest: str, size: int, source: bytes | Path) -> bool:
        """Upload one blob unless the repository has it (True: bytes were sent). One monolithic PUT, streamed
        from the file for a Path."""
        if self.has_blob(repo, digest):
            return False
        scope = self._scope(repo)
        with self._request("POST", self._url(repo, "blobs/uploads/"), scope, data=b"") as res:
            location = res.headers["Location"]
        location = urllib.parse.urljoin(self._url(repo, ""), location)
        url = f"{location}{'&' if '?' in location else '?'}digest={urllib.parse.quote(digest)}"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if isinstance(source, Path):
            with source.open("rb") as f, self._request("PUT", url, scope, data=f, headers=headers):
                pass
        else:
            with self._request("PUT", url, scope, data=source, headers=headers):
                pass
        return True

    def blob(self, repo: str, digest: str) -> Iterator[bytes]:
        """A blob's bytes, in chunks."""
        with self._request("GET", self._url(repo, f"blobs/{digest}"), self._scope(repo, push=False)) as res:
            yield from iter(lambda: res.read(CHUNK), b"")

    # -- manifests --------------------------------------------------------------------------------------------

    def put_manifest(self, repo: str, reference: str, body: bytes, media_type: str = OCI_MANIFEST) -> str:
        """PUT a manifest under a tag; returns its digest, checked against the one the registry reports."""
        digest = digest_of(body)
        url = self._url(repo, f"manifests/{reference}")
        try:
            with self._request("PUT", url, self._scope(repo), data=body, headers={"Content-Type": media_type}) as res:
                served = res.headers.get("Docker-Content-Digest", digest)
        except urllib.error.HTTPError as e:
            raise BuilderError(f"{self.host}/{repo}:{reference}: the registry refused the manifest ({e.code}: "
                               f"{e.read()[:300].decode(errors='replace')})") from None  # fmt: skip
        if served != digest:
            raise BuilderError(f"{self.host}/{repo}:{reference}: sent {digest} but the registry stored {served}")
        return digest

    def manifest(self, repo: str, reference: str) -> tuple[dict, str, int]:
        """(manifest, its digest, its size in bytes) as the registry serves it."""
        url = self._url(repo, f"manifests/{reference}")
        with self._request("GET", url, self._scope(repo, push=False), headers={"Accept": _ACCEPT}) as res:
            body = res.read()
        return json.loads(body), digest_of(body), len(body)


def upload(registry: Registry, repo: str, source: bytes | Path) -> dict:
    """Put one blob (bytes, or a file streamed from disk); returns its descriptor {digest, size}."""
    if isinstance(source, Path):
        digest, size = sha256_file(source), source.stat().st_size
    else:
        digest, size = digest_of(source), len(source)
    registry.put_blob(repo, digest, size, source)
    return {"digest": digest, "size": size}


def read_blob_to(registry: Registry, repo: str, digest: str, out: BinaryIO) -> str:
    """Copy a blob into `out`; returns the sha256 of what arrived."""
    h = hashlib.sha256()
    for chunk in registry.blob(repo, digest):
        h.update(chunk)
        out.write(chunk)
    return f"sha256:{h.hexdigest()}"
