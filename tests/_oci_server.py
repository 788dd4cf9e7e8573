"""The few OCI distribution endpoints the registry client uses, served from memory by the stdlib HTTP server,
with the checks a real registry makes (the upload's digest is recomputed; a manifest's blobs must exist) and,
optionally, Docker's token authentication (401 + `WWW-Authenticate: Bearer realm=...`, a token endpoint).

The client is also run against the real registry (registry:2) in tests/e2e/test_oci_weights.py; this server
lets the unit tests see every request (method, path, Authorization) the client sends.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

TOKEN = "t0ken"


class State:
    def __init__(self, bearer: bool) -> None:
        self.bearer = bearer
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}  # (repo, tag or digest) -> (body, type)
        self.uploads: dict[str, str] = {}  # upload id -> repo
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Authorization)
        self.token_requests: list[dict[str, list[str]]] = []


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    state: State
    server_version = "registry-test/1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        url = urlsplit(self.path)
        s = self.state
        if url.path == "/token":
            s.token_requests.append(parse_qs(url.query))
            return self._send(200, json.dumps({"token": TOKEN}).encode())
        s.requests.append((self.command, self.path, self.headers.get("Authorization", "")))
        if s.bearer and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._body()
            host = self.headers["Host"]
            challenge = f'Bearer realm="http://{host}/token",service="registry-test",scope="ignored"'
            return self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge})
        m = re.fullmatch(r"/v2/(.+)/(blobs|manifests)/(uploads/)?([^/]*)", url.path)
        if not m:
            return self._send(404)
        repo, kind, upload, ref = m.groups()
        if kind == "blobs" and upload and self.command == "POST":
            self._body()
            upload_id = uuid.uuid4().hex
            s.uploads[upload_id] = repo
            return self._send(202, headers={"Location": f"/v2/{repo}/blobs/uploads/{upload_id}?_state=x"})
        if kind == "blobs" and upload and self.command == "PUT":
            data = self._body()
            digest = parse_qs(url.query)["digest"][0]
            if s.uploads.pop(ref, None) != repo or _digest(data) != digest:
                return self._send(400, b'{"errors":[{"code":"DIGEST_INVALID"}]}')
            s.blobs[digest] = data
            return self._send(201, headers={"Docker-Content-Digest": digest})
        if kind == "blobs":
            if ref not in s.blobs:
                return self._send(404)
            return self._send(200, s.blobs[ref], {"Docker-Content-Digest": ref})
        if self.command == "PUT":
            body = self._body()
            manifest = json.loads(body)
            missing = [d["digest"] for d in [manifest["config"], *manifest["layers"]] if d["digest"] not in s.blobs]
            if missing:
                return self._send(400, json.dumps({"errors": [{"code": "MANIFEST_BLOB_UNKNOWN"}]}).encode())
            digest = _digest(body)
            for key in (ref, digest):
                s.manifests[(repo, key)] = (body, self.headers["Content-Type"])
            return self._send(201, headers={"Docker-Content-Digest": digest})
        if (repo, ref) not in s.manifests:
            return self._send(404)
        body, media_type = s.manifests[(repo, ref)]
        return self._send(200, body, {"Content-Type": media_type, "Docker-Content-Digest": _digest(body)})

    do_GET = do_HEAD = do_POST = do_PUT = _handle


@contextmanager
def registry_server(bearer: bool = False):
    """(host:port, state) of a registry on 127.0.0.1, for the `with` block."""
    state = State(bearer)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
