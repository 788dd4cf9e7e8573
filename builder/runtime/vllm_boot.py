"""vLLM image: the build-time architecture check and the server's start command.

Stdlib only (plus vLLM itself), because the check runs in an early stage FROM the vLLM base that
holds nothing of ours but this file: it reads config.json and nothing else, so it refuses an
unsupported model before any heavy step of the build.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

ALTERNATIVES = (
    "Alternatives: BACKEND=xinference (transformers engine: any architecture transformers loads, "
    "remote code with TRUST_REMOTE_CODE), BACKEND=chatglmcpp (ChatGLM2/3, GLM-4 and native GLM on CPU), "
    "or a newer vLLM base image (--vllm-base)."
)


# vLLM's generic Transformers-backend entry for text generation: with trust_remote_code, vLLM can run a
# remote-code architecture it has no native implementation for through it (if that code is compatible).
# (0.33 has no `TransformersModel` any more: model_executor/models/registry.py _TRANSFORMERS_BACKEND_MODELS.)
TRANSFORMERS_FALLBACKS = ("TransformersForCausalLM",)

# vLLM's allowed --max-lora-rank values (vllm/config/lora.py MaxLoRARanks).
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Our own variables, out of vLLM's VLLM_ namespace (vLLM warns about, or with --fail-on-environ-validation
# refuses, every VLLM_* name it does not know). old name -> new name; the old ones are still read.
RENAMED_ENV = {
    "VLLM_MODEL_PATH": "LLM_MODEL_PATH",
    "VLLM_TRUST_REMOTE_CODE": "LLM_TRUST_REMOTE_CODE",
    "VLLM_EXTRA_ARGS": "LLM_EXTRA_ARGS",
}


def supported_architectures() -> set[str]:
    from vllm.model_executor.models import ModelRegistry

    return set(ModelRegistry.get_supported_archs())


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def transformers_fallback(config: dict, supported: set[str], trust_remote_code: bool) -> str | None:
    """The Transformers-backend arch vLLM would try for a remote-code model it has no native class for."""
    if not (trust_remote_code and config.get("auto_map")):
        return None
    return next((a for a in TRANSFORMERS_FALLBACKS if a in supported), None)


def resolve_architecture(config: dict, supported: set[str], trust_remote_code: bool = False) -> str | None:
    """The registry entry vLLM would run this config with: its first architecture vLLM knows (vLLM's own
    order), else the Transformers backend for trusted remote code; None when there is none."""
    archs = config.get("architectures") or []
    known = next((a for a in archs if a in supported), None)
    return known or (transformers_fallback(config, supported, trust_remote_code) if archs else None)


def check_config(
    config: dict, supported: set[str], vllm_version: str = "", trust_remote_code: bool = False
) -> str | None:
    """None when vLLM has an implementation for this config, else the message to fail the build with."""
    if resolve_architecture(config, supported, trust_remote_code):
        return None
    archs = config.get("architectures") or []
    what = ", ".join(archs) or f"model_type {config.get('model_type', '?')} (no `architectures` in config.json)"
    near = sorted(a for a in supported if archs and a.lower().startswith(archs[0][:4].lower()))[:8]
    hint = f" Similar names vLLM knows: {', '.join(near)}." if near else ""
    version = f"vLLM {vllm_version}".strip() if vllm_version else "vLLM"
    return (
        f"{version} cannot serve {what}: not among its {len(supported)} supported architectures.{hint} {ALTERNATIVES}"
    )


# --------------------------------------------------------------------------- what vLLM would do with it


@dataclass(frozen=True)
class ArchInfo:
    """What vLLM's registry says about one architecture: the fields of its `_ModelInfo`
    (`ModelRegistry.models[arch].inspect_model_cls()`) the check decides on."""

    architecture: str  # as config.json names it
    model_class: str  # the class vLLM runs it with (_ModelInfo.architecture)
    is_text_generation_model: bool
    is_pooling_model: bool
    supports_lora: bool
    is_draft_model: bool = False  # a speculative-decoding draft (MTP, EAGLE, DFlash): never served alone


def pooling_kind(arch: str) -> str:
    """What a pooling architecture computes, from vLLM's naming (its registry groups them the same way)."""
    if arch.endswith("ForSequenceClassification"):
        return "sequence classification / scores (/classify, /score, /rerank)"
    if arch.endswith("ForTokenClassification"):
        return "token classification (/pooling)"
    if "Reward" in arch:
        return "reward scores (/pooling)"
    return "embeddings (/v1/embeddings, /pooling)"


def max_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM allows that holds an adapter of rank `rank`; None above the largest."""
    return next((allowed for allowed in MAX_LORA_RANKS if allowed >= rank), None)


def serving_refusals(info: ArchInfo, lora_rank: int | None = None) -> list[str]:
    """Why vLLM could not serve this architecture as a chat/completions model (with LoRA adapters of up to
    `lora_rank` served unmerged, when given): [] when it can. vLLM starts a model that is a pooling model
    as one, with no generation endpoints (config/model.py `_get_default_runner_type`)."""
    name = f"{info.architecture} (vLLM class {info.model_class})"
    reasons = []
    if info.is_draft_model:
        reasons.append(
            f"{name} is a speculative-decoding draft model: vLLM runs it only beside a target model "
            "(--speculative-config), never as a served model of its own"
        )
    elif info.is_pooling_model or not info.is_text_generation_model:
        reasons.append(
            f"{name} is not a text-generation model in vLLM: it would start as a pooling model computing "
            f"{pooling_kind(info.architecture)}, with no /v1/chat/completions or /v1/completions"
        )
    if lora_rank is not None:
        if not info.supports_lora:
            reasons.append(f"{name} does not support LoRA in vLLM (--enable-lora): merge the adapter instead")
        if lora_rank < 1:
            reasons.append(f"LoRA rank {lora_rank} is not a rank: give the adapter's r (1 or more)")
        elif max_lora_rank(lora_rank) is None:
            reasons.append(
                f"LoRA rank {lora_rank} is above vLLM's largest --max-lora-rank ({MAX_LORA_RANKS[-1]}): "
                "merge the adapter instead"
            )
    return reasons


def inspect_architecture(arch: str, registry_arch: str) -> ArchInfo:
    """Ask the installed vLLM's registry (it inspects the class in a subprocess, without CUDA)."""
    from vllm.model_executor.models import ModelRegistry, registry

    info = ModelRegistry.models[registry_arch].inspect_model_cls()
    drafts = getattr(registry, "_SPECULATIVE_DECODING_MODELS", {})
    return ArchInfo(
        architecture=arch,
        model_class=info.architecture,
        is_text_generation_model=info.is_text_generation_model,
        is_pooling_model=info.is_pooling_model,
        supports_lora=info.supports_lora,
        is_draft_model=registry_arch in drafts,
    )


# --------------------------------------------------------------------------- chat template

CHAT_TEMPLATE_HELP = (
    "/v1/chat/completions will fail at the first request (/v1/completions works). Give vLLM one at run "
    "time: put a Jinja template where the container can read it and pass it through the extra-args "
    'variable, e.g. LLM_EXTRA_ARGS="--chat-template /templates/chat.jinja" (vLLM\'s --chat-template also '
    "takes the template text itself), or add chat_template.jinja to the model folder and rebuild."
)


def chat_template_source(model: Path) -> str | None:
    """Where the model folder's chat template is (what transformers and vLLM read), or None."""
    tokenizer_config = model / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            if json.loads(tokenizer_config.read_text()).get("chat_template"):
                return "tokenizer_config.json"
        except (json.JSONDecodeError, AttributeError):
            pass
    for name in ("chat_template.jinja", "chat_template.json"):
        if (model / name).is_file() and (model / name).stat().st_size > 0:
            return name
    return None


def check_chat_template(model: Path) -> tuple[bool, str]:
    """(has one, the line for the build log). Runs in the build stage, without vLLM: vLLM's own fallback
    templates (a few multimodal model types) are not consulted, so those get the warning too."""
    source = chat_template_source(model)
    if source:
        return True, f"chat template: {source}"
    return (
        False,
        f"warning: the model has no chat template (tokenizer_config.json, chat_template.jinja). {CHAT_TEMPLATE_HELP}",
    )


def load_config(source: str, local: Path, model_id: str, revision: str) -> dict:
    if source == "local":
        return json.loads((local / "config.json").read_text())
    if source == "huggingface":
        from huggingface_hub import hf_hub_download

        token_file = Path("/run/secrets/hub_token")
        token = token_file.read_text().strip() if token_file.is_file() else None
        return json.loads(
            Path(hf_hub_download(model_id, "config.json", revision=revision or "main", token=token or None)).read_text()
        )
    if source == "modelscope":
        try:
            from modelscope.hub.file_download import model_file_download
        except ImportError:  # not in the vLLM image: ModelScope's plain file API
            import urllib.parse
            import urllib.request

            query = urllib.parse.urlencode({"Revision": revision or "master", "FilePath": "config.json"})
            with urllib.request.urlopen(
                f"https://modelscope.cn/api/v1/models/{model_id}/repo?{query}", timeout=60
            ) as r:
                return json.loads(r.read())
        return json.loads(Path(model_file_download(model_id, "config.json", revision=revision or "master")).read_text())
    raise SystemExit(f"unknown model source {source!r}")


def renamed_env(env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(environment, warnings): our variables under their LLM_* names, the old VLLM_* names removed so
    vLLM never sees them. An old name set still counts when its new name is unset or empty."""
    out, warnings = dict(env), []
    for old, new in RENAMED_ENV.items():
        if old not in out:
            continue
        value = out.pop(old)
        if out.get(new, "") == "":
            out[new] = value
            warnings.append(f"warning: {old} is renamed {new} (vLLM reserves VLLM_*): using its value; set {new}")
        else:
            warnings.append(f"warning: {old} is renamed {new} (vLLM reserves VLLM_*): ignored, {new} is set")
    return out, warnings


def lora_modules(env: dict[str, str]) -> list[tuple[str, str]]:
    """$LLM_LORA_MODULES: the adapters served unmerged, `NAME=PATH` words (the image's /models/lora/NAME)."""
    modules = []
    for word in shlex.split(env.get("LLM_LORA_MODULES", "")):
        name, sep, path = word.partition("=")
        if not (name and sep and path):
            raise SystemExit(f"LLM_LORA_MODULES: {word!r} is not NAME=PATH (e.g. support=/models/lora/support)")
        modules.append((name, path))
    return modules


def base_name(served_name: str, adapters: list[str]) -> str:
    """The name the base is served under: the served name, unless an adapter is served under it (one ADAPTER:
    the fine-tune is the model), then `<served name>-base` (vLLM answers a request for the base's name with
    the base, so an adapter of the same name could never be reached). llama.cpp's router does the same."""
    return f"{served_name}-base" if served_name in adapters else served_name


def lora_argv(env: dict[str, str], modules: list[tuple[str, str]]) -> list[str]:
    """--enable-lora and its settings: every adapter loaded at start, as many in one batch as there are
    ($LLM_MAX_LORAS), the smallest allowed --max-lora-rank that holds $LLM_MAX_LORA_RANK.

    On CPU vLLM gets at least one slot more than there are adapters: its CPU LoRA kernels look up "no
    adapter" (index -1) as the *last* slot, so with every slot taken a base-model request batched with
    adapter requests is served with the last adapter applied. A spare slot stays empty (zero weights)."""
    argv = ["--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path in modules)]
    max_loras = env.get("LLM_MAX_LORAS", "").strip() or str(len(modules))
    if on_cpu(env) and max_loras.isdigit() and int(max_loras) <= len(modules):
        max_loras = str(len(modules) + 1)
    argv += ["--max-loras", max_loras]
    rank = env.get("LLM_MAX_LORA_RANK", "").strip()
    if rank:
        allowed = max_lora_rank(int(rank)) if rank.isdigit() else None
        argv += ["--max-lora-rank", str(allowed or rank)]  # above 512: vLLM's own error says so
    return argv


def on_cpu(env: dict[str, str]) -> bool:
    """The image is vLLM's CPU variant ($LLM_DEVICE, set by the image)."""
    return env.get("LLM_DEVICE", "").strip().lower() == "cpu"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`), empty when unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def dtype_argv(env: dict[str, str], flags: set[str] | None = None) -> list[str]:
    """--dtype from $LLM_DTYPE; `auto` (or unset) is vLLM's own choice, except on CPU: without avx512_bf16
    (x86) or bf16 (Arm), 16-bit weights are converted on every matmul and run slower than float32."""
    dtype = env.get("LLM_DTYPE", "").strip().lower() or "auto"
    if dtype != "auto":
        return ["--dtype", dtype]
    if on_cpu(env):
        flags = cpu_flags() if flags is None else flags
        if not flags & {"avx512_bf16", "bf16"}:
            return ["--dtype", "float32"]
    return []


# The middleware that refuses a request over the work limits (builder/runtime/vllm_limits.py).
LIMITS_MIDDLEWARE = "builder.runtime.vllm_limits.RequestLimits"


def model_max_new_tokens(model: str) -> int | None:
    """The model's own default output length (generation_config.json max_new_tokens), if it has one."""
    try:
        value = json.loads((Path(model) / "generation_config.json").read_text()).get("max_new_tokens")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def limits_argv(env: dict[str, str], model: str) -> list[str]:
    """The bound on one request's work: the middleware (it reads $LLM_MAX_N, $LLM_MAX_TOKENS,
    $LLM_MAX_BODY_BYTES, $LLM_MAX_LOGPROBS itself, checked here first so a bad value stops the start with
    its name), vLLM's --max-logprobs ($LLM_MAX_LOGPROBS, default 20, vLLM's own), $LLM_MAX_NUM_SEQS when
    set (else vLLM's default for the device), and $LLM_MAX_TOKENS as the default output length of a
    request that gives none (a smaller max_new_tokens of the model's generation_config.json stays)."""
    from builder.runtime.vllm_limits import Limits

    try:
        limits = Limits.from_env(env)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    argv = ["--middleware", LIMITS_MIDDLEWARE, "--max-logprobs", str(limits.max_logprobs)]
    seqs = env.get("LLM_MAX_NUM_SEQS", "").strip()
    if seqs and not (seqs.isascii() and seqs.isdigit() and int(seqs) > 0):
        raise SystemExit(f"error: LLM_MAX_NUM_SEQS={seqs!r}: give a whole number of sequences vLLM runs at once")
    if seqs:
        argv += ["--max-num-seqs", seqs]
    if limits.max_tokens:
        default = min(limits.max_tokens, model_max_new_tokens(model) or limits.max_tokens)
        argv += ["--override-generation-config", json.dumps({"max_new_tokens": default})]
    return argv


def serve_argv(env: dict[str, str]) -> list[str]:
    """`vllm serve` with the served name, port, context length, the work limits, remote-code switch, the
    LoRA adapters ($LLM_LORA_MODULES) and $LLM_EXTRA_ARGS (last, so a flag there wins: vLLM's parser keeps
    the last value). Expects renamed_env's output."""
    modules = lora_modules(env)
    model = env.get("LLM_MODEL_PATH") or "/models/model"
    argv = [
        "vllm",
        "serve",
        model,
        "--served-model-name",
        base_name(env.get("SERVED_MODEL_NAME", "model"), [name for name, _ in modules]),
        "--host",
        "0.0.0.0",
        "--port",
        env.get("PORT", "8000"),
    ]
    # Unset: auto, the largest context whose KV cache fits (vLLM's own default sizes for the model's
    # full context and fails to start when that does not fit). Empty: vLLM's default.
    max_model_len = env.get("LLM_MAX_MODEL_LEN", "auto").strip()
    if max_model_len:
        argv += ["--max-model-len", max_model_len]
    argv += limits_argv(env, model)
    if truthy(env.get("LLM_TRUST_REMOTE_CODE")):
        argv.append("--trust-remote-code")
    argv += dtype_argv(env)
    if modules:
        argv += lora_argv(env, modules)
    # The API key reaches vLLM as $VLLM_API_KEY (compose hands it API_KEY), never on the command line.
    return argv + shlex.split(env.get("LLM_EXTRA_ARGS", ""))


def serve_env(env: dict[str, str]) -> dict[str, str]:
    """The server's environment: $API_KEY (what the other images read) becomes $VLLM_API_KEY if unset."""
    out = dict(env)
    if not out.get("VLLM_API_KEY") and out.get("API_KEY"):
        out["VLLM_API_KEY"] = out["API_KEY"]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm_boot")
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="refuse architectures vLLM cannot serve as a chat/completions model")
    check.add_argument("--source", default="local")
    check.add_argument("--local", type=Path, default=Path("/ctx/model"))
    check.add_argument("--model-id", default="")
    check.add_argument("--revision", default="")
    check.add_argument("--trust-remote-code", default="0")
    check.add_argument(
        "--lora-rank",
        type=lambda v: int(v) if v.strip() else None,
        default=None,
        help="largest rank of the LoRA adapters to serve unmerged (empty: none, they are merged)",
    )
    template = sub.add_parser("chat-template", help="warn when the model folder has no chat template")
    template.add_argument("model", type=Path)
    serve = sub.add_parser("serve", help="exec vllm serve")
    serve.add_argument("--print", action="store_true", help="print the command (shell-quoted) instead of running it")
    return parser.parse_args(argv)


def serve(print_only: bool) -> int:
    env, warnings = renamed_env(dict(os.environ))
    for line in warnings:
        print(line, file=sys.stderr)
    env = serve_env(env)
    cmd = serve_argv(env)
    if print_only:
        print(shlex.join(cmd))
        return 0
    os.execvpe(cmd[0], cmd, env)


def check(args: argparse.Namespace) -> int:
    """The build-time check: an architecture vLLM has, that generates text (and takes LoRA, when asked)."""
    config = load_config(args.source, args.local, args.model_id, args.revision)
    import vllm

    supported = supported_architectures()
    trust = truthy(args.trust_remote_code)
    error = check_config(config, supported, vllm.__version__, trust)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    archs = config.get("architectures", [])
    registry_arch = resolve_architecture(config, supported, trust)
    arch = registry_arch if registry_arch in archs else archs[0]
    lora_rank = args.lora_rank
    try:
        info = inspect_architecture(arch, registry_arch)
    except Exception as e:  # vLLM could not import the class here (its subprocess failed): name check only
        print(
            f"warning: vLLM {vllm.__version__} could not inspect {registry_arch} ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}); the text-generation and LoRA "
            "checks were skipped",
            file=sys.stderr,
        )
        return 0
    reasons = serving_refusals(info, lora_rank)
    if reasons:
        print(f"error: vLLM {vllm.__version__} cannot serve {arch}: {'; '.join(reasons)}.", file=sys.stderr)
        print(ALTERNATIVES, file=sys.stderr)
        return 1
    if registry_arch not in archs:
        print(
            f"warning: vLLM {vllm.__version__} has no native {', '.join(archs)}; with trust_remote_code it will try "
            f"its Transformers backend ({registry_arch}), which needs the remote code to support it",
            file=sys.stderr,
        )
    else:
        print(f"vLLM {vllm.__version__} supports {arch} (text generation)")
    if lora_rank is not None:
        print(f"LoRA: supported; serve with --enable-lora --max-lora-rank {max_lora_rank(lora_rank)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cmd == "serve":
        return serve(args.print)
    if args.cmd == "chat-template":
        ok, line = check_chat_template(args.model)
        print(line, file=sys.stdout if ok else sys.stderr)
        return 0  # a warning, never a failure: /v1/completions serves without one
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
