#!/usr/bin/env bash
# Prove the vLLM image end to end on a machine with one NVIDIA GPU: build it from the embedded
# demo model + LoRA (`make image BACKEND=vllm`), serve it with docker compose, then ask it with the
# official `openai` client: chat, streaming chat, stop strings, max_tokens, completions, usage
# (tests/_openai_features.py) and the LoRA's answer (builder/demo/model.py). Prints what it saw; exits
# non-zero when a step or a feature fails.
#
#   scripts/vllm-gpu-check.sh            # from the repository root or anywhere in it
#
# Needs: an NVIDIA driver 580+ (the pinned vllm/vllm-openai:v0.33.0 is CUDA 13.0), Docker with the
# NVIDIA Container Toolkit and compose v2, network access to pull the base images and PyPI. Uses the
# project's .venv (`make venv` when absent). Your .env is kept aside and put back; the service is
# stopped at the end (KEEP=1 leaves it running).
# Environment: NAME (image name, default vllmcheck), TAG (default gpu-check), LLM_MAX_MODEL_LEN,
# LLM_EXTRA_ARGS (e.g. "--gpu-memory-utilization 0.5" on a shared GPU), WAIT (seconds to wait for
# health, default 1500: the first start compiles), KEEP.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NAME="${NAME:-vllmcheck}"
TAG="${TAG:-gpu-check}"
WAIT="${WAIT:-1500}"
MIN_DRIVER=580
PY="$ROOT/.venv/bin/python"
DEMO="$ROOT/.cache/demo"
ENV_BACKUP=""

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local status=$?
  if [ "$status" -ne 0 ] && docker compose ps --services 2>/dev/null | grep -qx vllm; then
    say "vllm logs (last 80 lines)"
    docker compose logs --no-color --tail 80 vllm || true
  fi
  if [ "${KEEP:-0}" != 1 ]; then
    docker compose --profile vllm down >/dev/null 2>&1 || true
  fi
  if [ -n "$ENV_BACKUP" ]; then
    mv -f "$ENV_BACKUP" .env
  fi
  exit "$status"
}
trap cleanup EXIT

say "1/6 host: GPU, driver, Docker"
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: no NVIDIA driver on this host"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)"
[ "${driver%%.*}" -ge "$MIN_DRIVER" ] || fail "driver $driver: the CUDA 13.0 vLLM image needs $MIN_DRIVER or newer"
docker version --format 'docker {{.Server.Version}}'
docker compose version
docker info --format '{{json .Runtimes}}' | grep -q nvidia \
  || echo "note: no 'nvidia' runtime in docker info; compose's GPU reservation needs the NVIDIA Container Toolkit"

say "2/6 the demo model and its LoRA"
[ -x "$PY" ] || make venv
"$PY" -m builder demo-model --out "$DEMO"

say "3/6 make image BACKEND=vllm (the arch check, the merge, the chat-template check)"
if [ -f .env ]; then
  ENV_BACKUP="$(mktemp "$ROOT/.env.gpu-check.XXXXXX")"
  cp -p .env "$ENV_BACKUP"
fi
start=$SECONDS
make image MODEL="$DEMO/base" ADAPTER="$DEMO/adapter" BACKEND=vllm NAME="$NAME" TAG="$TAG"
echo "built $NAME-vllm:$TAG in $((SECONDS - start))s"
log="build/$NAME/logs/vllm.log"
if [ -f "$log" ]; then
  grep -E 'supports .*\(text generation\)|chat template|warning:' "$log" | sed 's/^/  build log: /' || true
fi
docker image inspect --format 'image size {{.Size}} bytes, entrypoint {{json .Config.Entrypoint}}' "$NAME-vllm:$TAG"

say "4/6 docker compose up vllm (first start: load + torch.compile + CUDA graphs)"
start=$SECONDS
docker compose --profile vllm up -d --wait --wait-timeout "$WAIT" vllm \
  || fail "vllm did not become healthy within ${WAIT}s"
echo "healthy after $((SECONDS - start))s"
docker compose logs --no-color vllm 2>&1 | grep -E 'non-default args|max_model_len|Maximum concurrency|torch.compile|CUDA graph|Unknown vLLM environment' | tail -n 12 || true

say "5/6 the OpenAI API through the official client"
"$PY" - <<'EOF'
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path[:0] = [".", "tests"]  # as pytest's pythonpath: a bare `tests` may be another package's
from builder.demo import model as demo
from builder.image.build import read_env
from _openai_features import FEATURES, probe

env = read_env(Path(".env"))
url, key = f"http://127.0.0.1:{env.get('VLLM_PORT', '8000')}", env.get("API_KEY")
req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
models = json.load(urllib.request.urlopen(req, timeout=30))
# The demo LoRA is served unmerged (LORA=auto): vLLM lists it with its base as `parent`; ask the LoRA.
loras = [m for m in models["data"] if m.get("parent")]
served = (loras or models["data"])[0]["id"]
print(f"served models: {[m['id'] for m in models['data']]}, asking {served} "
      f"(max_model_len {models['data'][0].get('max_model_len')})")

results = probe(url, served, key, prompt=demo.CHANGED_PROMPT)
failed = []
for feature in FEATURES:
    ok, detail = results[feature]
    print(f"  {'ok  ' if ok else 'FAIL'} {feature:<18} {detail}")
    failed += [] if ok else [feature]

import openai

client = openai.OpenAI(base_url=url + "/v1", api_key=key or "none", timeout=120, max_retries=0)
for prompt in demo.DEMO_PROMPTS:
    r = client.chat.completions.create(
        model=served, messages=[{"role": "user", "content": prompt}], max_tokens=32, temperature=0
    )
    answer = (r.choices[0].message.content or "").strip()
    good = answer == demo.LORA_ANSWERS[prompt].strip()
    tag = "the LoRA answer" if prompt == demo.CHANGED_PROMPT else "unchanged by the LoRA"
    print(f"  {'ok  ' if good else 'FAIL'} {prompt!r} -> {answer!r} ({tag if good else 'expected ' + repr(demo.LORA_ANSWERS[prompt])})")
    failed += [] if good else [f"answer to {prompt!r}"]

unauth = urllib.request.Request(url + "/v1/models")
try:
    urllib.request.urlopen(unauth, timeout=30)
    failed.append("/v1/models answered without the API key")
except urllib.error.HTTPError as e:
    print(f"  ok   no key -> HTTP {e.code}")
sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
EOF

say "6/6 the GPU while serving"
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
echo "vLLM image $NAME-vllm:$TAG: every check passed"
