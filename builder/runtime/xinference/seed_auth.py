"""Seed Xinference's auth store: the boot admin holding exactly one boot API key; print a short-lived admin JWT.

Not imported by the boot: auth.seed_auth runs this file's text with Xinference's own Python (the one
that runs xinference-local) and the server's environment, before the server starts. It reads a JSON
request on stdin, {"user", "password", "password_given", "key", "name"}, and prints one JSON line,
{"db", "user_id", "created_user", "created_key", "token"}. It uses Xinference's own code
(auth_store.create_auth_store, crypto.sha256_hex / aes_encrypt), so the store is what the server expects:

- the admin user is made if missing (the first user of a fresh store); a given password
  (password_given) is applied on every boot, so `Client.login` works with it;
- the key is installed unless the store has it; a previous key whose name starts with `name` (an
  older boot key) is deleted first; other users' and other keys are left alone;
- the JWT is minted with the server's secret: API keys may only list models and chat, while
  registering and launching need a user's JWT.
"""

from __future__ import annotations

import base64
import json
import sys

from xinference.api.oauth2.advanced.auth_service import INITIAL_ADMIN_PERMISSIONS, AdvancedAuthService
from xinference.api.oauth2.advanced.auth_store import create_auth_store
from xinference.api.oauth2.advanced.crypto import aes_encrypt, derive_encryption_key, get_password_hash, sha256_hex
from xinference.constants import XINFERENCE_AUTH_DB_PATH, get_auth_encryption_key, get_auth_jwt_secret_key


def ensure_admin(store, username: str, password: str, password_given: bool) -> tuple[int, bool]:
    """(the user's id, whether it was created); an existing user gets `password` when it was given."""
    user = store.get_user_by_username(username)
    if user is not None:
        if password_given:  # the operator's password wins on every boot
            store.update_user(user["id"], password_hash=get_password_hash(password))
        return user["id"], False
    password_hash = get_password_hash(password)
    user_id = None
    if store.user_count() == 0:
        user_id = store.create_first_user(username, password_hash, permissions=INITIAL_ADMIN_PERMISSIONS)
    if user_id is None:
        user_id = store.create_user(username, password_hash, permissions=INITIAL_ADMIN_PERMISSIONS)
    return user_id, True


def ensure_boot_key(store, user_id: int, key: str, name: str, encryption_key: bytes) -> bool:
    """Install `key` for `user_id` (all models) in place of an older boot key; False when it is there already."""
    if store.get_api_key_by_hash(sha256_hex(key)) is not None:
        return False
    for old in store.list_api_keys():
        if str(old.get("name", "")).startswith(name):
            store.delete_api_key(old["id"])
    store.create_api_key(
        user_id=user_id,
        key_hash=sha256_hex(key),
        key_prefix=key[:7],
        name=name + "-" + sha256_hex(key)[:8],
        key_encrypted=base64.b64encode(aes_encrypt(key, encryption_key)).decode(),
        model_permissions=[{"permission_type": "all", "permission_value": None}],
    )
    return True


def admin_token(store, user_id: int) -> str:
    """A short-lived access token for the user, signed with the server's own JWT secret."""
    service = AdvancedAuthService(XINFERENCE_AUTH_DB_PATH, get_auth_jwt_secret_key(), get_auth_encryption_key())
    user = store.get_user_by_id(user_id)
    return service.create_access_token(user_id, user["username"], user["permissions"], user.get("token_version", 0))


def main() -> None:
    request = json.load(sys.stdin)
    get_auth_jwt_secret_key()  # generate + persist now, like the server would
    encryption_key = derive_encryption_key(get_auth_encryption_key())
    store = create_auth_store(XINFERENCE_AUTH_DB_PATH)
    user_id, created_user = ensure_admin(store, request["user"], request["password"], request["password_given"])
    created_key = ensure_boot_key(store, user_id, request["key"], request["name"], encryption_key)
    result = {
        "db": XINFERENCE_AUTH_DB_PATH,
        "user_id": user_id,
        "created_user": created_user,
        "created_key": created_key,
        "token": admin_token(store, user_id),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
