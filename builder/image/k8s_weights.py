"""`builder k8s --weights image-volume`: the weights as images the kubelet mounts, beside the baked bases.

For each backend that serves mounted weights (llama.cpp, vLLM, chatglm.cpp), `image-volume/<backend>/` is a kustomize base whose
Deployment runs the engine image (no weights) with the weights image mounted read-only at /models
(`volumes[].image`, Kubernetes image volumes; subPath `models`, the folder the weights image holds) and each
adapter served unmerged mounted at /adapters/NAME from its own image, every image by the digest `make push`
recorded (else by tag). With adapters, llama-server runs as the baked image does, a router over one base:
its preset comes from a ConfigMap; vLLM gets its served name and `--lora-modules` (/adapters/NAME/NAME, the
adapter's folder) through the engine image's variables. A new fine-tune rolls out by changing one image reference;
nodes keep the engine and the base cached.

`kserve/` holds a KServe ServingRuntime (the engine) and an InferenceService whose storageUri is the weights
image: `oci+native://`, which KServe mounts as an image volume (subPath `models`) at /mnt/models. The classic
modelcar (`oci://` in KServe's default modelcar mode) runs the image as a sidecar with `sh`, which a FROM
scratch weights image does not have.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from builder import backends
from builder.errors import BuilderError
from builder.image import push
from builder.image.k8s import Workload, labels, workload
from builder.model.gguf.router import BASE_GGUF, LORA_DIR, base_name, models_max, router_preset
from builder.selection import select_backends, served_adapters
from builder.spec import BuildSpec, read_model_config

ADAPTERS = "/adapters"  # where each adapter image is mounted, /adapters/NAME
PRESET_DIR = "/etc/llama-server"  # the router preset's ConfigMap
KSERVE_MODELS = "/mnt/models"  # where KServe mounts the storageUri
WEIGHTS_SUBPATH = BASE_GGUF.split("/")[1]  # "models": the weights image's one folder
HF_MODEL = "/models/model"  # a Hugging Face folder's weights image (vLLM's): the model folder
HF_ADAPTER_ENV = ("LLM_LORA_MODULES", "LLM_MAX_LORAS", "LLM_MAX_LORA_RANK")
GGML_SUFFIX = "-ggml"  # the weights_suffix of a GGML file's weights image (chatglm.cpp's): /models/model.ggml
GGML_MODEL = ("GGML_MODEL", "model.ggml")  # the engine's variable naming that file, and its name under /models


# the ServingRuntime's model format per weights format (KServe's names for its llama.cpp and Hugging Face runtimes;
# `ggml` for a GGML file, which KServe has no runtime of its own for)
MODEL_FORMATS = {
    "gguf": {"format": "gguf", "format_version": "3", "format_title": "GGUF"},
    "ggml": {"format": "ggml", "format_version": "1", "format_title": "GGML file ({title}: model.ggml)"},
    "hf": {"format": "huggingface", "format_version": "1", "format_title": "Hugging Face folder (model/)"},
}


def weights_format(spec: BuildSpec, b: backends.Backend) -> str:
    """What `b`'s weights image holds: "gguf" (/models/model.gguf), "ggml" (chatglm.cpp's /models/model.ggml) or
    "hf" (vLLM's Hugging Face folder /models/model)."""
    if b.serves_gguf(spec):
        return "gguf"
    return "ggml" if b.weights_suffix == GGML_SUFFIX else "hf"


def _pin(ref: str, recorded: str) -> str:
    """`ref`, pinned by the digest `make push` recorded when it was pushed as exactly that reference."""
    return recorded if recorded.startswith(ref + "@sha256:") and len(recorded) == len(ref) + 72 else ref


def adapter_path(name: str, gguf: bool = True) -> str:
    """Where adapter NAME's image volume puts it: its GGUF LoRA, or (vLLM) its folder."""
    return f"{ADAPTERS}/{name}/{name}" + (".gguf" if gguf else "")


def mounted_adapters(spec: BuildSpec, backend: str) -> list[str]:
    """The adapters `make image` builds an image for (those `backend` serves unmerged), by served name: decided
    as the build decides with a local MODEL; otherwise every adapter the spec names unless LORA=merge."""
    if not backends.get(backend).serves_adapters:
        return []
    config = read_model_config(spec) if spec.model else None
    if config is not None:
        return list(select_backends(spec, config).served_by(backend))
    return [] if spec.lora_mode == "merge" else list(served_adapters(spec))


def image_volume_workload(spec: BuildSpec, b: backends.Backend, pushed: dict[str, str]) -> tuple[Workload, str]:
    """(the Deployment's workload, the router preset or "" without adapters)."""
    base = workload(spec, b, pushed)
    all_labels, selector = labels(spec, f"{b.name}-image-volume", "server")
    weights = _pin(spec.weights_image(b.name), pushed.get(push.weights_key(b.name), ""))
    mounts = [_image_volume("weights", weights, "/models", WEIGHTS_SUBPATH)]
    names = mounted_adapters(spec, b.name)
    for i, name in enumerate(names):
        ref = _pin(spec.lora_image(name, b.name), pushed.get(push.lora_key(b.name, name), ""))
        mounts.append(_image_volume(f"lora-{i}", ref, f"{ADAPTERS}/{name}", LORA_DIR.lstrip("/")))
    served = spec.served_model_name or "model"
    form = weights_format(spec, b)
    if form == "ggml":  # merged weights only: the served name is the one setting per model
        preset, env = "", [{"name": "SERVED_MODEL_NAME", "value": served}]
    elif form == "hf":
        preset, env = "", hf_env(spec, b, served, names)
    elif names:
        preset = router_preset(served, names, lora={n: adapter_path(n) for n in names})
        mounts.append({"name": "preset", "mountPath": PRESET_DIR, "readOnly": True,
                       "source": {"configMap": {"name": f"{spec.name}-{b.name}-preset"}}})  # fmt: skip
        env = [{"name": "LLAMA_ARG_MODEL", "value": ""}, {"name": "LLAMA_ARG_ALIAS", "value": ""},
               {"name": "LLAMA_ARG_MODELS_PRESET", "value": f"{PRESET_DIR}/preset.ini"},
               {"name": "LLAMA_ARG_MODELS_MAX", "value": str(models_max(names))},
               {"name": "LLAMA_ARG_OFFLINE", "value": "1"}]  # fmt: skip
    else:
        preset, env = "", [{"name": "LLAMA_ARG_ALIAS", "value": served}]
    engine = _pin(spec.engine_image(b.name), pushed.get(f"{b.name}-engine", ""))
    w = dataclasses.replace(
        base,
        name=f"{spec.name}-{b.name}-image-volume",
        image=engine,
        labels=all_labels,
        selector=selector,
        env=[*base.env, *env],
        volumes=[*base.volumes, *mounts],
    )
    return w, preset


def hf_env(spec: BuildSpec, b: backends.Backend, served: str, names: list[str]) -> list[dict]:
    """The engine's run-time settings for a Hugging Face folder (vLLM's engine image): what its baked image bakes
    per model, the adapters from their image volumes."""
    modules = " ".join(f"{n}={adapter_path(n, gguf=False)}" for n in names)
    rank = ""
    if names:  # the adapters' rank from their adapter_config.json, when the folders are here (else vLLM's default)
        try:
            paths = {n: p for n, p in served_adapters(spec).items() if n in names}
            rank = b.adapter_build_args(spec, paths).get("MAX_LORA_RANK", "")
        except (BuilderError, OSError, ValueError):
            rank = ""
    return [{"name": "SERVED_MODEL_NAME", "value": served},
            {"name": "LLM_TRUST_REMOTE_CODE", "value": "1" if spec.trust_remote_code else "0"},
            {"name": "LLM_LORA_MODULES", "value": modules},
            {"name": "LLM_MAX_LORAS", "value": str(len(names)) if names else ""},
            {"name": "LLM_MAX_LORA_RANK", "value": rank}]  # fmt: skip


def _image_volume(name: str, ref: str, mount: str, sub_path: str) -> dict:
    source = {"image": {"reference": ref, "pullPolicy": "IfNotPresent"}}
    return {"name": name, "mountPath": mount, "subPath": sub_path, "readOnly": True, "source": source}


def kserve_values(spec: BuildSpec, b: backends.Backend, w: Workload, pushed: dict[str, str]) -> dict[str, Any]:
    """The ServingRuntime's container and the InferenceService's storageUri (the base weights, served under the
    base's name; adapters stay with the image-volume Deployment)."""
    weights = _pin(spec.weights_image(b.name), pushed.get(push.weights_key(b.name), ""))
    served = base_name(spec.served_model_name or "model", mounted_adapters(spec, b.name))
    form = weights_format(spec, b)
    if form == "gguf":
        env = [e for e in w.env if not e["name"].startswith("LLAMA_ARG_MODEL") and e["name"] != "LLAMA_ARG_ALIAS"]
        env += [{"name": "LLAMA_ARG_MODEL", "value": f"{KSERVE_MODELS}/{BASE_GGUF.rsplit('/', 1)[1]}"},
                {"name": "LLAMA_ARG_ALIAS", "value": served}]  # fmt: skip
    elif form == "ggml":  # the GGML file /models/model.ggml, at /mnt/models/model.ggml
        env = [e for e in w.env if e["name"] not in (GGML_MODEL[0], "SERVED_MODEL_NAME")]
        env += [{"name": GGML_MODEL[0], "value": f"{KSERVE_MODELS}/{GGML_MODEL[1]}"},
                {"name": "SERVED_MODEL_NAME", "value": served}]  # fmt: skip
    else:  # the Hugging Face folder /models/model of the weights image, at /mnt/models/model; no adapters
        env = [e for e in w.env if e["name"] not in HF_ADAPTER_ENV and e["name"] != "SERVED_MODEL_NAME"]
        env += [{"name": "LLM_MODEL_PATH", "value": f"{KSERVE_MODELS}/{HF_MODEL.rsplit('/', 1)[1]}"},
                {"name": "SERVED_MODEL_NAME", "value": served}]  # fmt: skip
    return {
        "runtime": f"{spec.name}-{b.name}",
        "isvc": f"{spec.name}-{b.name}",
        "image": w.image,
        "env": [e for e in env if e["name"] not in ("LLAMA_ARG_MODELS_PRESET", "LLAMA_ARG_OFFLINE")],
        "storage_uri": f"oci+native://{weights}",
        **{k: v.format(title=b.title) for k, v in MODEL_FORMATS[form].items()},
        "labels": {k: v for k, v in w.labels.items() if k != "app.kubernetes.io/name"},
    }


def render(spec: BuildSpec, names: list[str], pushed: dict[str, str], put) -> list[tuple[str, str]]:
    """Render the image-volume bases and the KServe pair through `put(path, template, **values)` (k8s.py's);
    returns the README rows (folder, what)."""
    rows = []
    for name in names:
        b = backends.get(name)
        if not b.mounted_weights:
            continue
        w, preset = image_volume_workload(spec, b, pushed)
        folder = f"image-volume/{b.name}"
        files = ["deployment.yaml", "service.yaml", "pdb.yaml", *(["preset.yaml"] if preset else [])]
        put(f"{folder}/kustomization.yaml", "kustomization.yaml.j2", w=w, resources=files)
        put(f"{folder}/deployment.yaml", "deployment.yaml.j2", w=w)
        put(f"{folder}/service.yaml", "service.yaml.j2", w=w)
        put(f"{folder}/pdb.yaml", "pdb.yaml.j2", w=w)
        if preset:
            put(f"{folder}/preset.yaml", "preset.yaml.j2", w=w, preset=preset, config=f"{spec.name}-{b.name}-preset")
        rows.append((f"{folder}/", f"{b.title} engine `{w.image}`, weights `{_weights_ref(w)}` (image volumes)"))
        values = kserve_values(spec, b, w, pushed)
        put(f"kserve/{b.name}/kustomization.yaml", "kustomization.yaml.j2", w=w,
            resources=["servingruntime.yaml", "inferenceservice.yaml"])  # fmt: skip
        put(f"kserve/{b.name}/servingruntime.yaml", "kserve-runtime.yaml.j2", w=w, k=values)
        put(f"kserve/{b.name}/inferenceservice.yaml", "kserve-isvc.yaml.j2", w=w, k=values)
        rows.append((f"kserve/{b.name}/", f"KServe ServingRuntime + InferenceService: `{values['storage_uri']}`"))
    return rows


def _weights_ref(w: Workload) -> str:
    return next(v["source"]["image"]["reference"] for v in w.volumes if v["name"] == "weights")
