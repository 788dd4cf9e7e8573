"""builder.runtime.xinference.auth: the API key, the server's environment, and seed_auth.py run for real.

The seed tests run seed_auth.py as the boot does (auth.seed_auth: the venv's Python found from
xinference-local's shebang, the server's environment) against a fresh XINFERENCE_HOME, then read the
store back with Xinference's own code: the admin, its password, the boot key (hashed and encrypted as
the server expects), and the admin JWT, verified with the server's secret. No server is started;
test_xinference_process.py logs in and chats with a real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from builder.runtime.xinference import auth, config, process

REPO = Path(__file__).resolve().parents[3]
XINFERENCE_VENV = Path(os.environ.get("XINFERENCE_VENV") or REPO / ".venv-xinference")
XINFERENCE_LOCAL = XINFERENCE_VENV / "bin" / "xinference-local"
XINFERENCE_PY = XINFERENCE_VENV / "bin" / "python"

needs_xinference = pytest.mark.skipif(
    not XINFERENCE_LOCAL.exists(),
    reason=f"no Xinference venv at {XINFERENCE_VENV} (run `make xinference-venv` or set XINFERENCE_VENV)",
)


def test_xinference_env_auth_and_secrets(tmp_path):
    base = {
        "API_KEY": "k",
        "XINFERENCE_API_KEY": "k",
        "XINFERENCE_ADMIN_PASSWORD": "p",
        "PATH": "/bin",
        "XINFERENCE_TRUST_REMOTE_CODE": "1",
    }
    cfg, _ = config.parse_args([], {**base, "XINFERENCE_HOME": str(tmp_path), "XINFERENCE_TRUST_REMOTE_CODE": "0"})
    env = process.xinference_env(cfg, base)
    assert env["XINFERENCE_AUTH_ADVANCED"] == "true" and env["XINFERENCE_HOME"] == str(tmp_path)
    assert env["XINFERENCE_TRUST_REMOTE_CODE"] == "0"  # default off, whatever leaked in
    assert not {"API_KEY", "XINFERENCE_API_KEY", "XINFERENCE_ADMIN_PASSWORD"} & env.keys()
    assert env["HF_HUB_OFFLINE"] == "1" and env["PATH"] == "/bin"
    for word in ("off", "0", "false", "disabled"):
        cfg, _ = config.parse_args([], {"XINFERENCE_AUTH": word})
        assert process.xinference_env(cfg, {})["XINFERENCE_AUTH_ADVANCED"] == "false"
        assert auth.resolve_api_key(cfg, create=True) is None
    with pytest.raises(config.BootError):
        config.parse_args([], {"XINFERENCE_AUTH": "maybe"})
    # API_KEY (compose's project-wide key) is honoured when XINFERENCE_API_KEY is unset.
    cfg, _ = config.parse_args([], {"API_KEY": "from-compose"})
    assert auth.resolve_api_key(cfg, create=False) == "from-compose"


def test_generated_key_is_kept(tmp_path):
    cfg, _ = config.parse_args([], {"XINFERENCE_HOME": str(tmp_path)})
    assert auth.resolve_api_key(cfg, create=False) is None
    key = auth.resolve_api_key(cfg, create=True)
    path = tmp_path / "auth" / auth.BOOT_KEY_FILE
    assert key.startswith("xf-") and path.read_text().strip() == key
    assert path.stat().st_mode & 0o777 == 0o600
    assert auth.resolve_api_key(cfg, create=True) == key  # stable across restarts


def test_auth_off_seeds_nothing(tmp_path):
    cfg, _ = config.parse_args([], {"XINFERENCE_AUTH": "off", "XINFERENCE_HOME": str(tmp_path)})
    assert auth.boot_admin_token(cfg, process.xinference_env(cfg, {})) is None
    assert not (tmp_path / "auth").exists()


def test_seeding_without_xinference_says_so(tmp_path):
    """A Python without Xinference (here: the project's) fails the seed with its error, not silently."""
    local = tmp_path / "xinference-local"
    local.write_text(f"#!{sys.executable}\n")
    local.chmod(0o755)
    cfg, _ = config.parse_args([], {"XINFERENCE_HOME": str(tmp_path), "XINFERENCE_LOCAL": str(local)})
    assert auth.xinference_python(str(local)) == sys.executable
    with pytest.raises(config.BootError, match="seeding Xinference auth .* failed(.|\n)*ModuleNotFoundError"):
        auth.seed_auth(cfg, process.xinference_env(cfg, {"PATH": os.environ["PATH"]}), "sk-x")


@needs_xinference
def test_xinference_python_is_the_venvs():
    assert Path(auth.xinference_python(str(XINFERENCE_LOCAL))).parent == XINFERENCE_VENV / "bin"


# --------------------------------------------------------------------------- seed_auth.py in Xinference's Python

# Reads the store as the server would (its own modules), with the server's environment.
READ_STORE = textwrap.dedent(
    """
    import base64, json, sys
    from xinference.constants import XINFERENCE_AUTH_DB_PATH, get_auth_encryption_key, get_auth_jwt_secret_key
    from xinference.api.oauth2.advanced.auth_service import AdvancedAuthService
    from xinference.api.oauth2.advanced.auth_store import create_auth_store
    from xinference.api.oauth2.advanced.crypto import aes_decrypt, derive_encryption_key, verify_password
    user, password, token, extra_key = sys.argv[1:5]
    store = create_auth_store(XINFERENCE_AUTH_DB_PATH)
    if extra_key:  # a key someone else made: the boot must leave it alone
        uid = store.get_user_by_username(user)["id"]
        store.create_api_key(user_id=uid, key_hash="0" * 64, key_prefix="xf-othe", name=extra_key,
                             key_encrypted="", model_permissions=[])
    enc = derive_encryption_key(get_auth_encryption_key())
    service = AdvancedAuthService(XINFERENCE_AUTH_DB_PATH, get_auth_jwt_secret_key(), get_auth_encryption_key())
    admin = store.get_user_by_username(user)
    keys = [
        {"name": k["name"], "user_id": k["user_id"], "prefix": k["key_prefix"],
         "key": aes_decrypt(base64.b64decode(k["key_encrypted"]), enc) if k["key_encrypted"] else None,
         "models": [p["permission_type"] for p in k["model_permissions"]]}
        for k in store.list_api_keys()
    ]
    claims = service.verify_access_token(token)
    print(json.dumps({
        "users": [u["username"] for u in store.list_users()],
        "admin_id": admin["id"],
        "password_ok": verify_password(password, admin["password_hash"]),
        "admin_permissions": admin["permissions"],
        "keys": keys,
        "token": claims and {"sub": claims["sub"], "scopes": claims["scopes"]},
    }))
    """
)


def _read_store(env: dict, user: str, password: str, token: str, extra_key: str = "") -> dict:
    r = subprocess.run(
        [str(XINFERENCE_PY), "-c", READ_STORE, user, password, token, extra_key],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_xinference
@pytest.mark.slow
def test_seed_auth_installs_the_admin_and_exactly_one_boot_key(tmp_path):
    home = tmp_path / "home"
    env = {"PATH": os.environ["PATH"], "XINFERENCE_HOME": str(home), "XINFERENCE_LOCAL": str(XINFERENCE_LOCAL)}

    def seed(key: str, password: str | None) -> tuple[dict, dict]:
        cfg, _ = config.parse_args([], {**env, "XINFERENCE_API_KEY": key, "XINFERENCE_ADMIN_PASSWORD": password or ""})
        child_env = process.xinference_env(cfg, env)  # what boot() hands the seed and the server
        return auth.seed_auth(cfg, child_env, auth.resolve_api_key(cfg, create=True)), child_env

    # A fresh home: the admin is created (the store's first user) with the boot key, for all models.
    out, child_env = seed("sk-first-0123456789", "pw-1")
    assert (out["created_user"], out["created_key"]) == (True, True)
    assert out["db"] == str(home / "auth" / "auth.db") and Path(out["db"]).is_file()
    store = _read_store(child_env, "admin", "pw-1", out["token"], extra_key="someone-else")
    assert store["users"] == ["admin"] and store["password_ok"] and out["user_id"] == store["admin_id"]
    (boot_key,) = [k for k in store["keys"] if k["name"].startswith(auth.BOOT_KEY_NAME)]
    assert boot_key["key"] == "sk-first-0123456789" and boot_key["user_id"] == store["admin_id"]
    assert boot_key["prefix"] == "sk-firs" and boot_key["models"] == ["all"]
    # The JWT the boot registers and launches with: signed with the server's secret, the admin's scopes.
    assert store["token"] == {"sub": "admin", "scopes": store["admin_permissions"]}

    # The same key again (a restart): nothing to create; the given password is applied again.
    out, _ = seed("sk-first-0123456789", "pw-2")
    assert (out["created_user"], out["created_key"]) == (False, False)
    assert _read_store(child_env, "admin", "pw-2", out["token"])["password_ok"]

    # A changed key replaces the boot key only; no password given leaves the admin's as it was.
    out, _ = seed("sk-second-0123456789", None)
    assert (out["created_user"], out["created_key"]) == (False, True)
    store = _read_store(child_env, "admin", "pw-2", out["token"])
    assert store["password_ok"] and store["token"]["sub"] == "admin"
    assert sorted(k["key"] or k["name"] for k in store["keys"]) == ["sk-second-0123456789", "someone-else"]
