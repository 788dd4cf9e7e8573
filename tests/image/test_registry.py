"""The distribution-API client (builder/image/registry.py): references, digests, credentials, and its requests
against an in-memory registry (tests/_oci_server.py) that recomputes every upload's digest; the real registry
is the e2e's (tests/e2e/test_oci_weights.py)."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import pytest
from _oci_server import TOKEN, registry_server

from builder.errors import BuilderError
from builder.image import registry as oci


def test_split_ref():
    assert oci.split_ref("127.0.0.1:5000/llm-model:t1") == ("127.0.0.1:5000", "llm-model", "t1")
    assert oci.split_ref("r.example/acme/llm-model:t1-tuned") == ("r.example", "acme/llm-model", "t1-tuned")
    assert oci.split_ref("r.example:5000/acme/x") == ("r.example:5000", "acme/x", "latest")
    digest = "sha256:" + "ab" * 32
    assert oci.split_ref(f"r.example:5000/x@{digest}") == ("r.example:5000", "x", digest)
    with pytest.raises(BuilderError, match="no registry host"):
        oci.split_ref("llm-model:t1")


@pytest.mark.parametrize(
    "host, scheme",
    [("localhost:5000", "http"), ("127.0.0.1:5000", "http"), ("127.1.2.3", "http"), ("[::1]:5000", "http"),
     ("registry.example:5000", "https"), ("localhost.example.com", "https"), ("10.0.0.1:5000", "https")],
)  # fmt: skip
def test_plain_http_for_loopback_only(host, scheme):
    assert oci.Registry(host).scheme == scheme


def test_digests(tmp_path):
    data = b"x" * (oci.CHUNK + 17)  # more than one read
    path = tmp_path / "f"
    path.write_bytes(data)
    want = "sha256:" + hashlib.sha256(data).hexdigest()
    assert oci.digest_of(data) == oci.sha256_file(path) == want


def test_credentials_from_the_docker_config(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert oci._docker_credentials("r.example") is None  # no config.json
    auth = base64.b64encode(b"user:pass").decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {
        "https://r.example": {"auth": auth}, "store.example": {}}, "credsStore": "desktop"}))  # fmt: skip
    assert oci._docker_credentials("r.example") == auth
    assert oci._docker_credentials("store.example") is None  # kept in a credential store: not read
    (tmp_path / "config.json").write_text("{not json")
    assert oci._docker_credentials("r.example") is None


def test_upload_skips_blobs_the_repository_has(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4096)
    with registry_server() as (host, state):
        client = oci.Registry(host)
        desc = oci.upload(client, "llm-model", path)
        assert desc == {"digest": oci.sha256_file(path), "size": path.stat().st_size}
        assert state.blobs[desc["digest"]] == path.read_bytes()
        assert oci.upload(client, "llm-model", b"{}") == {"digest": oci.digest_of(b"{}"), "size": 2}
        sent = len(state.requests)
        assert oci.upload(client, "llm-model", path) == desc  # again: one HEAD, no upload
        assert [m for m, _, _ in state.requests[sent:]] == ["HEAD"]
        out = io.BytesIO()
        assert oci.read_blob_to(client, "llm-model", desc["digest"], out) == desc["digest"]
        assert out.getvalue() == path.read_bytes()


def test_manifest_round_trip_and_refusal():
    with registry_server() as (host, state):
        client = oci.Registry(host)
        config = oci.upload(client, "m", b"{}")
        body = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                           "config": {"mediaType": "application/x", **config}, "layers": []}).encode()  # fmt: skip
        digest = client.put_manifest("m", "t1", body)
        assert digest == oci.digest_of(body)
        assert client.manifest("m", "t1") == (json.loads(body), digest, len(body))
        assert client.manifest("m", digest)[1] == digest
        assert state.manifests[("m", "t1")][1] == oci.OCI_MANIFEST
        # a layer the registry does not have: the error names the reference and the registry's answer
        bad = json.dumps({**json.loads(body), "layers": [{"digest": "sha256:" + "0" * 64, "size": 1}]}).encode()
        with pytest.raises(BuilderError, match=r"m:t2: the registry refused the manifest \(400: .*BLOB_UNKNOWN"):
            client.put_manifest("m", "t2", bad)


def test_bearer_token_obtained_once_per_scope_with_the_docker_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    with registry_server(bearer=True) as (host, state):
        auth = base64.b64encode(b"user:pass").decode()
        (tmp_path / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
        client = oci.Registry(host)
        path = tmp_path / "blob"
        path.write_bytes(b"a file, streamed, sent again after the 401")
        desc = oci.upload(client, "acme/m", path)
        assert state.blobs[desc["digest"]] == path.read_bytes()
        assert oci.upload(client, "acme/m", b"{}")["size"] == 2
        scopes = [q["scope"][0] for q in state.token_requests]
        assert scopes == ["repository:acme/m:pull", "repository:acme/m:pull,push"]
        assert all(q["service"] == ["registry-test"] for q in state.token_requests)
        unauthorized = [r for r in state.requests if r[2] != f"Bearer {TOKEN}"]
        assert len(unauthorized) == 2  # the first request of each scope
        assert b"".join(client.blob("acme/m", desc["digest"])) == path.read_bytes()


def test_a_stale_token_is_renewed():
    with registry_server(bearer=True) as (host, state):
        client = oci.Registry(host)
        client._auth[client._scope("m", push=False)] = "Bearer expired"
        assert client.has_blob("m", "sha256:" + "0" * 64) is False  # 401, a new token, then the 404
        assert [r[2] for r in state.requests] == ["Bearer expired", f"Bearer {TOKEN}"]
