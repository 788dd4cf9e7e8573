"""Xinference container entry point: start `xinference-local`, register and launch the model, stay in front.

Zero clicks: the container's main process is `python -m builder.runtime.xinference_boot` (or the CLI's
`xinference-boot`). It

1. prepares authentication (below) in Xinference's own auth store,
2. starts `xinference-local --host $XINFERENCE_HOST --port $XINFERENCE_PORT` as a child,
3. waits for the unauthenticated `GET /status`,
4. registers the model folder as a custom LLM (`POST /v1/model_registrations/LLM`, spec version 2,
   `pytorch` format, or `ggufv2` with the folder's one *.gguf for the llama.cpp engine, `file://` URI, abilities generate+chat, chat template from the tokenizer's
   `tokenizer_config.json` (or `chat_template.jinja`), stop ids/strings from `generation_config.json`,
   context length from `config.json`), persisted under $XINFERENCE_HOME so it survives restarts;
   re-registering an unchanged model is a no-op, a changed one is replaced,
5. adds it to Xinference's autostart list (`POST /v1/autostart/models`), which launches it now and
   on every later start of the same $XINFERENCE_HOME (a container restart relaunches it even before
   this script re-registers it), and waits until it is listed in `/v1/models`,
6. then waits on the child: SIGTERM/SIGINT/SIGHUP/SIGQUIT are forwarded, orphans are reaped (it
   may be PID 1), and it exits with xinference's exit code (128+N when killed by signal N).
   A failed setup (bad model folder, launch error) stops xinference and exits non-zero.

Only the standard library is used here (urllib for HTTP), so builder's dependencies stay small;
Xinference itself runs from whatever environment holds `xinference-local` (`$XINFERENCE_LOCAL`,
default: found on PATH).

Authentication in Xinference 4.1.0 (read from its source: xinference/constants.py,
xinference/api/restful_api.py, xinference/api/oauth2/advanced/*):

* "Advanced" auth is ON unless the server's environment has XINFERENCE_AUTH_ADVANCED=0/false/no
  (there is no auth config file any more in 4.x). It is a SQLite store of users and API keys at
  $XINFERENCE_AUTH_DB_PATH (default $XINFERENCE_HOME/auth/auth.db). The JWT secret and the key
  encryption key come from XINFERENCE_AUTH_JWT_SECRET_KEY / XINFERENCE_AUTH_ENCRYPTION_KEY or are
  generated once and kept in $XINFERENCE_HOME/auth/{jwt_secret_key,encryption_key}.
* A fresh store has no user: the server logs a one-time setup token, and the first admin is made
  with `POST /v1/admin/setup` (token, username, password). API keys (`xf-...`) are then generated
  by the server (`POST /v1/admin/keys`), so a key chosen by the operator cannot be set over HTTP.
  Requests carry a key as `Authorization: Bearer KEY` (or `X-API-Key`); `/status` needs none.
  An API key only ever gets the scopes models:list and models:read: it can list models and chat
  (OpenAI API, `Client(url, api_key=KEY).get_model(uid).chat(...)`), but registering and
  launching (`Client.launch_model`) answer 403 "API keys can only access model query and
  inference endpoints" and need a user's JWT (`POST /token` with username/password, i.e.
  `Client(url).login(user, password)`).
* This script therefore seeds the store before the server starts, with Xinference's own code run
  by Xinference's Python (auth_store.create_auth_store, crypto.sha256_hex/aes_encrypt): an admin
  user ($XINFERENCE_ADMIN_USER, default "admin"; password $XINFERENCE_ADMIN_PASSWORD, random when
  unset) holding exactly one boot key, the key from $XINFERENCE_API_KEY (or $API_KEY), valid for
  all models. A changed key replaces the previous boot key; other users/keys are left alone.
  The same helper mints a short-lived admin JWT with the server's secret, which this script alone
  uses for its register/autostart calls (no password needs to be known). A given
  $XINFERENCE_ADMIN_PASSWORD is (re)applied on every boot, so `Client.login` works with it.
  With auth on and no key given, one is generated once and kept in
  $XINFERENCE_HOME/auth/boot_api_key (mode 0600); the log says where.
* XINFERENCE_AUTH=off (or 0/false/no/none/disabled) runs xinference with
  XINFERENCE_AUTH_ADVANCED=false: no authentication at all.

Environment (command-line flags of the same name override them; see --help):

  MODEL_PATH / XINFERENCE_MODEL_PATH   model folder (HF format, merged)       /models/model
  SERVED_MODEL_NAME / XINFERENCE_MODEL_NAME   model name = model uid          folder's name
  XINFERENCE_HOST, XINFERENCE_PORT     bind address, port                    0.0.0.0, 9997
  XINFERENCE_CONTEXT_LENGTH            context length        config.json max_position_embeddings
  XINFERENCE_ENGINE                    llama.cpp (the folder's one *.gguf) |   transformers
                                       transformers | vllm (vllm: GPU image)
  XINFERENCE_QUANTIZATION              llama.cpp engine: the GGUF's type      none
  XINFERENCE_N_GPU                     n_gpu for the launch ("auto" or a number; "auto" is
                                       the CPU on a host without GPUs)
  XINFERENCE_LAUNCH_ARGS               JSON object merged into the launch request (e.g. vLLM's
                                       {"gpu_memory_utilization": 0.9, "max_model_len": 4096})
  XINFERENCE_TRUST_REMOTE_CODE / TRUST_REMOTE_CODE   1 allows the model folder's own code
                                       (auto_map, e.g. Baichuan); default off
  XINFERENCE_API_KEY / API_KEY, XINFERENCE_AUTH, XINFERENCE_ADMIN_USER/_PASSWORD   see above
  XINFERENCE_HOME                      Xinference's state (registrations, autostart, auth)
  XINFERENCE_LOCAL                     the xinference-local executable       on PATH
  XINFERENCE_LOCAL_ARGS                extra xinference-local arguments (shell words)
  XINFERENCE_BOOT_TIMEOUT              seconds to wait for start + launch    1800
  XINFERENCE_ROLE                      local | supervisor | worker: Xinference's distributed mode
                                       (builder/runtime/xinference_cluster.py)  local

Health (for HEALTHCHECK): `python -m builder.runtime.xinference_boot --health` exits 0 only when the model
is listed in /v1/models and answers a 1-token chat completion; it reads the same environment.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PORT = 9997
DEFAULT_MODEL_PATH = "/models/model"
BOOT_KEY_NAME = "builder-boot"
BOOT_KEY_FILE = "boot_api_key"
OFF_WORDS = {"0", "false", "no", "off", "none", "disabled", "disable"}
ON_WORDS = {"1", "true", "yes", "on"}
ENGINES = {"llama.cpp": "llama.cpp", "transformers": "Transformers", "vllm": "vLLM"}


def log(msg: str) -> None:
    print(f"[xinference-boot] {msg}", file=sys.stderr, flush=True)


class BootError(RuntimeError):
    """A setup step failed; the message says which and why."""


# --------------------------------------------------------------------------- configuration


@dataclass
class BootConfig:
    model_path: Path = Path(DEFAULT_MODEL_PATH)
    model_name: str = ""
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    context_length: int | None = None
    engine: str = "transformers"
    quantization: str = "none"  # llama.cpp engine: the GGUF's type (the image's QUANT)
    n_gpu: Any = None  # None: leave Xinference's default ("auto")
    launch_args: dict = field(default_factory=dict)
    trust_remote_code: bool = False
    auth: bool = True
    api_key: str | None = None
    admin_user: str = "admin"
    admin_password: str | None = None
    home: Path | None = None
    xinference_local: str = "xinference-local"
    local_args: list[str] = field(default_factory=list)
    timeout: float = 1800.0

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def xinference_home(self) -> Path:
        return self.home or Path.home() / ".xinference"


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return value
    return None


def _flag(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    v = value.strip().lower()
    if v in ON_WORDS:
        return True
    if v in OFF_WORDS:
        return False
    raise BootError(f"expected on/off, got {value!r}")


def _n_gpu(value: str | None) -> Any:
    if value is None:
        return None
    v = value.strip().lower()
    if v == "auto":
        return "auto"
    return int(v)


def parse_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> tuple[BootConfig, argparse.Namespace]:
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(prog="xinference-boot", description=__doc__.split("\n\n")[0])
    p.add_argument("--health", action="store_true", help="Health check: exit 0 when the model is running and answers.")
    p.add_argument("--model-path", default=_first(env, "MODEL_PATH", "XINFERENCE_MODEL_PATH") or DEFAULT_MODEL_PATH)
    p.add_argument("--model-name", default=_first(env, "SERVED_MODEL_NAME", "XINFERENCE_MODEL_NAME"))
    p.add_argument("--host", default=_first(env, "XINFERENCE_HOST") or "0.0.0.0")
    p.add_argument("--port", type=int, default=int(_first(env, "XINFERENCE_PORT") or DEFAULT_PORT))
    p.add_argument("--context-length", type=int, default=_first(env, "XINFERENCE_CONTEXT_LENGTH"))
    p.add_argument("--engine", default=_first(env, "XINFERENCE_ENGINE") or "transformers")
    p.add_argument("--timeout", type=float, default=float(_first(env, "XINFERENCE_BOOT_TIMEOUT") or 1800))
    p.add_argument("--health-timeout", type=float, default=60.0, help="Seconds the --health chat may take.")
    a = p.parse_args(argv)

    engine = a.engine.strip().lower()
    if engine not in ENGINES:
        raise BootError(f"XINFERENCE_ENGINE must be one of {sorted(ENGINES)}, got {a.engine!r}")
    model_path = Path(a.model_path)
    launch_args = {}
    if _first(env, "XINFERENCE_LAUNCH_ARGS"):
        try:
            launch_args = json.loads(env["XINFERENCE_LAUNCH_ARGS"])
        except json.JSONDecodeError as e:
            raise BootError(f"XINFERENCE_LAUNCH_ARGS is not JSON: {e}") from e
        if not isinstance(launch_args, dict):
            raise BootError("XINFERENCE_LAUNCH_ARGS must be a JSON object")
    auth_word = _first(env, "XINFERENCE_AUTH")
    home = _first(env, "XINFERENCE_HOME")
    cfg = BootConfig(
        model_path=model_path,
        model_name=a.model_name or model_path.name,
        host=a.host,
        port=a.port,
        context_length=int(a.context_length) if a.context_length else None,
        engine=engine,
        quantization=_first(env, "XINFERENCE_QUANTIZATION") or "none",
        n_gpu=_n_gpu(_first(env, "XINFERENCE_N_GPU")),
        launch_args=launch_args,
        trust_remote_code=_flag(_first(env, "XINFERENCE_TRUST_REMOTE_CODE", "TRUST_REMOTE_CODE"), False),
        auth=_flag(auth_word, True),
        api_key=_first(env, "XINFERENCE_API_KEY", "API_KEY"),
        admin_user=_first(env, "XINFERENCE_ADMIN_USER") or "admin",
        admin_password=_first(env, "XINFERENCE_ADMIN_PASSWORD"),
        home=Path(home) if home else None,
        xinference_local=_first(env, "XINFERENCE_LOCAL") or "xinference-local",
        local_args=shlex.split(_first(env, "XINFERENCE_LOCAL_ARGS") or ""),
        timeout=a.timeout,
    )
    return cfg, a


# --------------------------------------------------------------------------- the model folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def chat_template(model_dir: Path) -> str | None:
    """The tokenizer's chat template: tokenizer_config.json's, else chat_template.jinja (transformers 5)."""
    tmpl = _read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default") or next(iter(named.values()), None)
    if not tmpl and (model_dir / "chat_template.jinja").is_file():
        tmpl = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if not tmpl and (model_dir / "chat_template.json").is_file():
        tmpl = _read_json(model_dir / "chat_template.json").get("chat_template")
    return tmpl or None


def _id_to_token(model_dir: Path) -> dict[int, str]:
    table: dict[int, str] = {}
    tok = _read_json(model_dir / "tokenizer.json")
    for t in tok.get("added_tokens", []):
        table[int(t["id"])] = t["content"]
    for i, t in _read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        table.setdefault(int(i), t.get("content") if isinstance(t, dict) else str(t))
    return table


def stop_tokens(model_dir: Path) -> tuple[list[int], list[str]]:
    """Stop ids from generation_config.json (else config.json) eos_token_id, and their token strings."""
    eos = _read_json(model_dir / "generation_config.json").get("eos_token_id")
    if eos is None:
        eos = _read_json(model_dir / "config.json").get("eos_token_id")
    ids = [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
    table = _id_to_token(model_dir)
    strings = [table[i] for i in ids if i in table]
    if not strings:
        eos_tok = _read_json(model_dir / "tokenizer_config.json").get("eos_token")
        if isinstance(eos_tok, dict):
            eos_tok = eos_tok.get("content")
        if eos_tok:
            strings = [eos_tok]
    return ids, strings


def context_length(model_dir: Path) -> int:
    cfg = _read_json(model_dir / "config.json")
    for key in ("max_position_embeddings", "seq_length", "max_sequence_length", "n_positions", "model_max_length"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    text_cfg = cfg.get("text_config") or {}
    if isinstance(text_cfg.get("max_position_embeddings"), int):
        return text_cfg["max_position_embeddings"]
    return 2048


def parameter_count(model_dir: Path) -> int:
    """Parameters in the folder's *.safetensors files (headers only), else estimated from a GGUF's size."""
    if not any(model_dir.glob("*.safetensors")):
        return sum(f.stat().st_size for f in model_dir.glob("*.gguf")) // 2  # about 2 bytes a weight at 16 bits
    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for d in meta["shape"]:
                    count *= d
                total += count
    return total


def size_in_billions(model_dir: Path) -> int | str:
    """Xinference's size label: an int, or "0_5" style for fractions (at least 0.1 so tiny models register)."""
    b = max(round(parameter_count(model_dir) / 1e9, 1), 0.1)
    return int(b) if b == int(b) else str(b).replace(".", "_")


def gguf_file(model_dir: Path) -> Path:
    """The one *.gguf file of a folder (the llama.cpp engine's model)."""
    found = sorted(model_dir.glob("*.gguf"))
    if len(found) != 1:
        raise BootError(f"the llama.cpp engine needs exactly one .gguf file in {model_dir}, found {len(found)}")
    return found[0]


def _weights_spec(cfg: BootConfig) -> dict:
    """model_specs[0]: the merged folder (pytorch format), or its GGUF (ggufv2, llama.cpp engine)."""
    d = cfg.model_path
    spec = {
        "model_format": "pytorch",
        "model_size_in_billions": size_in_billions(d),
        "quantization": "none",
        "model_id": None,
        "model_uri": f"file://{d.resolve()}",
    }
    if cfg.engine == "llama.cpp":
        # Xinference links the folder into its cache and opens <folder>/<model_file_name_template>.
        spec.update(model_format="ggufv2", quantization=cfg.quantization, model_file_name_template=gguf_file(d).name)
    return spec


def model_spec(cfg: BootConfig) -> dict:
    """The custom-LLM registration (Xinference LLM family spec version 2) for cfg.model_path."""
    d = cfg.model_path
    if not (d / "config.json").is_file():
        raise BootError(f"{d} is not a Hugging Face model folder (no config.json)")
    ids, strings = stop_tokens(d)
    template = chat_template(d)
    abilities = ["generate", "chat"] if template else ["generate"]
    if not template:
        log(f"{d} has no chat template: registering with the generate ability only")
    arch = _read_json(d / "config.json").get("architectures") or None
    return {
        "version": 2,
        "context_length": cfg.context_length or context_length(d),
        "model_name": cfg.model_name,
        "model_lang": ["en", "zh"],
        "model_ability": abilities,
        "model_description": f"{cfg.model_name}, served from {d} by builder",
        "model_family": cfg.model_name,
        "model_specs": [_weights_spec(cfg)],
        "chat_template": template,
        "stop_token_ids": ids,
        "stop": strings,
        "architectures": arch,
    }


def launch_request(cfg: BootConfig, spec: dict) -> dict:
    """The launch payload stored as the autostart entry (so a restart launches the same thing)."""
    launch = {
        "model_uid": cfg.model_name,
        "model_name": cfg.model_name,
        "model_type": "LLM",
        "model_engine": ENGINES[cfg.engine],
        "model_format": spec["model_specs"][0]["model_format"],
        "model_size_in_billions": spec["model_specs"][0]["model_size_in_billions"],
        "quantization": spec["model_specs"][0]["quantization"],
    }
    if cfg.n_gpu is not None:
        launch["n_gpu"] = cfg.n_gpu
    if cfg.trust_remote_code:
        launch["trust_remote_code"] = True
    launch.update(cfg.launch_args)
    return launch


# --------------------------------------------------------------------------- environment and auth


def key_file(cfg: BootConfig) -> Path:
    return cfg.xinference_home / "auth" / BOOT_KEY_FILE


def resolve_api_key(cfg: BootConfig, create: bool) -> str | None:
    """The key clients use: the configured one, else the generated one kept in XINFERENCE_HOME."""
    if not cfg.auth:
        return None
    if cfg.api_key:
        return cfg.api_key
    path = key_file(cfg)
    if path.is_file():
        return path.read_text().strip() or None
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "xf-" + secrets.token_urlsafe(36)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    log(f"auth is on and no XINFERENCE_API_KEY was given: generated one, kept in {path}")
    return key


def xinference_env(cfg: BootConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment xinference-local runs with."""
    env = dict(os.environ if base is None else base)
    env["XINFERENCE_AUTH_ADVANCED"] = "true" if cfg.auth else "false"
    env["XINFERENCE_TRUST_REMOTE_CODE"] = "1" if cfg.trust_remote_code else "0"
    if cfg.home:
        env["XINFERENCE_HOME"] = str(cfg.home)
    # Local file:// models only: skip the hub reachability probe and never reach for a hub.
    env.setdefault("XINFERENCE_MODEL_SRC", "huggingface")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    for name in ("XINFERENCE_API_KEY", "API_KEY", "XINFERENCE_ADMIN_PASSWORD"):
        env.pop(name, None)  # the server does not need them; keep them out of model processes
    return env


def xinference_python(executable: str) -> str:
    """The Python that runs `executable` (a console script's shebang), for Xinference-side helpers."""
    path = shutil.which(executable) or executable
    try:
        with open(path, "rb") as fh:
            first = fh.readline().decode(errors="replace").strip()
    except OSError as e:
        raise BootError(f"cannot find {executable!r} (set XINFERENCE_LOCAL): {e}") from e
    if first.startswith("#!"):
        words = shlex.split(first[2:])
        if words and os.path.basename(words[0]) == "env":
            words = words[1:]
        if words and "python" in os.path.basename(words[0]):
            return shutil.which(words[0]) or words[0]
    return sys.executable


# Runs in Xinference's Python with the server's environment; reads a JSON request on stdin.
_SEED_AUTH = r"""
import base64, json, sys
req = json.load(sys.stdin)
from xinference.constants import XINFERENCE_AUTH_DB_PATH, get_auth_encryption_key, get_auth_jwt_secret_key
from xinference.api.oauth2.advanced.auth_service import INITIAL_ADMIN_PERMISSIONS
from xinference.api.oauth2.advanced.auth_store import create_auth_store
from xinference.api.oauth2.advanced.crypto import aes_encrypt, derive_encryption_key, get_password_hash, sha256_hex
get_auth_jwt_secret_key()  # generate + persist now, like the server would
enc = derive_encryption_key(get_auth_encryption_key())
db = create_auth_store(XINFERENCE_AUTH_DB_PATH)
user = db.get_user_by_username(req["user"])
if user is None:
    pw_hash = get_password_hash(req["password"])
    uid = db.create_first_user(req["user"], pw_hash, permissions=INITIAL_ADMIN_PERMISSIONS) if db.user_count() == 0 else None
    if uid is None:
        uid = db.create_user(req["user"], pw_hash, permissions=INITIAL_ADMIN_PERMISSIONS)
    created_user = True
else:
    uid, created_user = user["id"], False
    if req["password_given"]:  # the operator's password wins on every boot
        db.update_user(uid, password_hash=get_password_hash(req["password"]))
key, name = req["key"], req["name"]
created_key = False
if db.get_api_key_by_hash(sha256_hex(key)) is None:
    for k in db.list_api_keys():
        if str(k.get("name", "")).startswith(name):
            db.delete_api_key(k["id"])
    db.create_api_key(
        user_id=uid, key_hash=sha256_hex(key), key_prefix=key[:7], name=name + "-" + sha256_hex(key)[:8],
        key_encrypted=base64.b64encode(aes_encrypt(key, enc)).decode(),
        model_permissions=[{"permission_type": "all", "permission_value": None}],
    )
    created_key = True
# API keys may only query and chat (models:list/read); registering and launching need a user's
# JWT. Mint a short-lived one for this boot with the server's own secret.
from xinference.api.oauth2.advanced.auth_service import AdvancedAuthService
svc = AdvancedAuthService(XINFERENCE_AUTH_DB_PATH, get_auth_jwt_secret_key(), get_auth_encryption_key())
u = db.get_user_by_id(uid)
token = svc.create_access_token(uid, u["username"], u["permissions"], u.get("token_version", 0))
print(json.dumps({"db": XINFERENCE_AUTH_DB_PATH, "user_id": uid, "created_user": created_user,
                  "created_key": created_key, "token": token}))
"""


def seed_auth(cfg: BootConfig, env: Mapping[str, str], key: str) -> dict:
    """Make sure Xinference's auth store has the boot admin and exactly our boot key."""
    req = {
        "user": cfg.admin_user,
        "password": cfg.admin_password or secrets.token_urlsafe(24),
        "password_given": bool(cfg.admin_password),
        "key": key,
        "name": BOOT_KEY_NAME,
    }
    py = xinference_python(cfg.xinference_local)
    r = subprocess.run(
        [py, "-c", _SEED_AUTH], input=json.dumps(req), env=dict(env), capture_output=True, text=True, timeout=300
    )
    if r.returncode != 0:
        raise BootError(f"seeding Xinference auth with {py} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    log(
        f"auth: store {out['db']}, user {cfg.admin_user!r} {'created' if out['created_user'] else 'kept'}, "
        f"API key {'installed' if out['created_key'] else 'already present'}"
    )
    return out


# --------------------------------------------------------------------------- HTTP


class Api:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0):
        self.base = base_url.rstrip("/")
        self.key = api_key
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def ok(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        status, data = self.call(method, path, body, timeout)
        if status != 200:
            raise BootError(f"{method} {path} -> {status}: {str(data)[:2000]}")
        return data


def wait_status(api: Api, proc: subprocess.Popen | None, deadline: float) -> None:
    while True:
        if proc is not None and proc.poll() is not None:
            raise BootError(f"xinference-local exited with {proc.returncode} before answering /status")
        try:
            if api.call("GET", "/status", timeout=5)[0] == 200:
                return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise BootError(f"{api.base}/status did not answer in time")
        time.sleep(0.5)


_SPEC_KEYS = (
    "context_length",
    "model_ability",
    "model_family",
    "chat_template",
    "stop_token_ids",
    "stop",
    "architectures",
)


def _same_registration(existing: Any, spec: dict) -> bool:
    if not isinstance(existing, dict):
        return False
    if any(existing.get(k) != spec.get(k) for k in _SPEC_KEYS):
        return False
    mine, theirs = spec["model_specs"][0], (existing.get("model_specs") or [{}])[0]
    return all(
        str(theirs.get(k)) == str(mine.get(k))
        for k in ("model_format", "model_uri", "model_size_in_billions", "quantization")
    )


def register(api: Api, spec: dict) -> str:
    """Register (persisted). Returns "registered", "unchanged" or "replaced"."""
    name = spec["model_name"]
    status, existing = api.call("GET", f"/v1/model_registrations/LLM/{name}")
    outcome = "registered"
    if status == 200 and existing:
        if _same_registration(existing, spec):
            return "unchanged"
        log(f"registration {name!r} differs from the model folder: replacing it")
        api.call("DELETE", f"/v1/models/{name}")  # a running copy of the old spec, if any
        api.ok("DELETE", f"/v1/model_registrations/LLM/{name}")
        outcome = "replaced"
    status, data = api.call("POST", "/v1/model_registrations/LLM", {"model": json.dumps(spec), "persist": True})
    if status != 200:
        if "already registered" in str(data):  # a concurrent boot won the race: fine
            return "unchanged"
        raise BootError(f"registering {name!r} failed ({status}): {str(data)[:2000]}")
    return outcome


def running_models(api: Api) -> dict[str, dict]:
    data = api.ok("GET", "/v1/models")
    items = data.get("data", []) if isinstance(data, dict) else data
    return {m.get("id"): m for m in items if isinstance(m, dict)}


def autostart_state(api: Api, uid: str) -> dict:
    status, data = api.call("GET", "/v1/autostart/models")
    if status == 200 and isinstance(data, dict):
        for entry in data.get("models", []):
            if entry.get("launch", {}).get("model_uid") == uid:
                return entry.get("state") or {}
    return {}


def ensure_launched(api: Api, cfg: BootConfig, launch: dict, proc: subprocess.Popen | None, deadline: float) -> float:
    """Upsert the autostart entry (Xinference launches it) and wait until it runs; returns seconds taken."""
    t0 = time.monotonic()
    uid = launch["model_uid"]
    api.ok(
        "POST",
        "/v1/autostart/models",
        {"enabled": True, "max_retries": 3, "retry_interval_seconds": 10, "launch": launch},
    )
    while True:
        if proc is not None and proc.poll() is not None:
            raise BootError(f"xinference-local exited with {proc.returncode} while launching {uid!r}")
        if uid in running_models(api):
            return time.monotonic() - t0
        state = autostart_state(api, uid)
        if state.get("status") == "error" and state.get("message") == "Autostart retry limit reached.":
            raise BootError(f"launching {uid!r} failed: {state.get('last_error')}")
        if time.monotonic() > deadline:
            raise BootError(f"{uid!r} was not running after {cfg.timeout:.0f}s; last autostart state: {state}")
        time.sleep(1.0)


# --------------------------------------------------------------------------- health


def health(cfg: BootConfig, chat_timeout: float = 60.0) -> int:
    """0 when the model is listed as running and answers a 1-token chat completion."""
    api = Api(cfg.url, resolve_api_key(cfg, create=False), timeout=10)
    try:
        models = running_models(api)
        if cfg.model_name not in models:
            print(f"unhealthy: {cfg.model_name!r} not running (running: {sorted(models)})")
            return 1
        body = {
            "model": cfg.model_name,
            "messages": [{"role": "user", "content": "ping"}],
            "max_tokens": 1,
            "temperature": 0,
        }
        status, data = api.call("POST", "/v1/chat/completions", body, timeout=chat_timeout)
        if status != 200 or not (isinstance(data, dict) and data.get("choices")):
            print(f"unhealthy: chat -> {status}: {str(data)[:500]}")
            return 1
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy"
        print(f"unhealthy: {e}")
        return 1
    print(f"healthy: {cfg.model_name} at {cfg.url}")
    return 0


# --------------------------------------------------------------------------- the foreground process


def _exit_code(code: int) -> int:
    """A child's exit code as a shell reports it: killed by signal N (code -N) -> 128 + N."""
    return 128 - code if code < 0 else code


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def forward_signals(proc: subprocess.Popen, handler: Callable[[int], None] | None = None) -> None:
    """Hand SIGTERM/SIGINT/SIGHUP/SIGQUIT to the child (or to `handler`, which decides how)."""

    def forward(signum, _frame):
        if handler is not None:
            handler(signum)
        elif proc.poll() is None:
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)


def stop_child(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_foreground(proc: subprocess.Popen, name: str) -> int:
    """Wait for the child, reaping any orphan re-parented to us (we may be PID 1); its exit code."""
    if proc.returncode is not None:
        return _exit_code(proc.returncode)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # already reaped (a signal handler's proc.poll())
            return _exit_code(proc.returncode) if proc.returncode is not None else 0
        if pid == proc.pid:
            code = _exit_code(os.waitstatus_to_exitcode(status))
            proc.returncode = code
            log(f"{name} exited with {code}")
            return code


def boot(cfg: BootConfig, env: Mapping[str, str] | None = None) -> int:
    """Run xinference-local with the model registered and launched; return xinference's exit code."""
    t_start = time.monotonic()
    spec = model_spec(cfg)  # fail before starting anything when the folder is wrong
    launch = launch_request(cfg, spec)
    child_env = xinference_env(cfg, env)
    key = resolve_api_key(cfg, create=True)
    admin_token = None
    if cfg.auth:
        admin_token = seed_auth(cfg, child_env, key)["token"]
    else:
        log("auth is off (XINFERENCE_AUTH): the API is open to anyone who can reach the port")

    cmd = [cfg.xinference_local, "--host", cfg.host, "--port", str(cfg.port), *cfg.local_args]
    log("starting: " + shlex.join(cmd))
    proc = subprocess.Popen(cmd, env=child_env)

    forward_signals(proc)

    api = Api(cfg.url, admin_token)  # register + autostart: admin scopes (a user's JWT)
    deadline = time.monotonic() + cfg.timeout
    try:
        wait_status(api, proc, deadline)
        log(f"xinference is up after {time.monotonic() - t_start:.1f}s")
        outcome = register(api, spec)
        log(
            f"model {cfg.model_name!r} {outcome} ({spec['model_specs'][0]['model_uri']}, context {spec['context_length']})"
        )
        took = ensure_launched(api, cfg, launch, proc, deadline)
        log(
            f"model {cfg.model_name!r} running on {launch['model_engine']} after {took:.1f}s "
            f"({time.monotonic() - t_start:.1f}s since start); serving {cfg.url}/v1"
        )
    except (BootError, OSError, urllib.error.URLError) as e:
        if proc.poll() is not None:
            log(f"xinference-local exited with {proc.returncode}")
            return _exit_code(proc.returncode)
        log(f"setup failed: {e}")
        stop_child(proc)
        return 1
    return wait_foreground(proc, "xinference-local")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    try:
        cfg, args = parse_args(argv, env)
        if (_first(os.environ if env is None else env, "XINFERENCE_ROLE") or "local").strip().lower() != "local":
            from builder.runtime import xinference_cluster  # distributed mode: supervisor or worker

            return xinference_cluster.main(cfg, args, env)
        if args.health:
            return health(cfg, args.health_timeout)
        return boot(cfg, env)
    except BootError as e:
        log(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
