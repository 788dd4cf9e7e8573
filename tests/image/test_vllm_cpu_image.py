"""vLLM's CPU variant (device: cpu), from the same template and boot script as the GPU image: the spec's device
switch (and the older `cuda: true`), the base, the image's env and label, the boot argv on CPU (a spare LoRA slot,
float32 on CPUs without bf16), compose and Kubernetes without a GPU. Rendered text only; tests/e2e/test_vllm_cpu.py
runs the image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from builder import backends, cli
from builder.errors import BuilderError
from builder.image import k8s
from builder.image.render import render_text
from builder.runtime import vllm_boot
from builder.spec import BuildSpec, load_spec

VLLM = backends.get("vllm")
ROOT = Path(__file__).resolve().parents[2]


def _env(dockerfile: str) -> dict[str, str]:
    from test_vllm_image import runtime_env

    return runtime_env(dockerfile)


def test_device_generalizes_cuda():
    assert BuildSpec().device == "auto" and not BuildSpec().cuda
    assert BuildSpec(cuda=True).device == "cuda"  # the older switch keeps working
    assert BuildSpec(device="cuda").cuda is True
    assert load_spec({"device": "cpu"}, resolve=False).device == "cpu"
    with pytest.raises(BuilderError, match="device"):
        load_spec({"device": "tpu"}, resolve=False)
    with pytest.raises(BuilderError, match="give one"):
        load_spec({"device": "cpu", "cuda": True}, resolve=False)


@pytest.mark.parametrize(
    "device,variants",
    [
        ("auto", {"vllm": "cuda", "chatglmcpp": "cpu", "llamacpp": "cpu", "xinference": "cpu"}),
        ("cpu", {"vllm": "cpu", "chatglmcpp": "cpu", "llamacpp": "cpu", "xinference": "cpu"}),
        ("cuda", {"vllm": "cuda", "chatglmcpp": "cuda", "llamacpp": "cuda", "xinference": "cpu"}),
    ],
)
def test_each_device_picks_each_backends_variant_and_base(device, variants):
    spec = BuildSpec(device=device)
    assert {b.name: b.device_for(spec) for b in backends.REGISTRY.values()} == variants
    texts = render_text(spec)
    for b in backends.REGISTRY.values():
        assert f'io.llm-builder.device="{variants[b.name]}"' in texts[b.dockerfile], b.name
    assert f"ARG VLLM_BASE={spec.runtime_base('vllm')}\n" in texts["Dockerfile.vllm"]
    expected = {"cpu": VLLM.cpu_base, "cuda": VLLM.base_image}[variants["vllm"]]
    assert spec.runtime_base("vllm") == expected


def test_the_cpu_base_is_upstreams_cpu_image_of_the_gpu_pin():
    """The two pins move together: the same vLLM version in vllm/vllm-openai and vllm/vllm-openai-cpu."""
    gpu_repo, gpu_tag = VLLM.base_image.split(":")
    cpu_repo, cpu_tag = VLLM.cpu_base.split(":")
    assert (gpu_repo, cpu_repo) == ("vllm/vllm-openai", "vllm/vllm-openai-cpu") and gpu_tag == cpu_tag
    assert (
        load_spec({"device": "cpu", "base_images": {"vllm_cpu": "local/vllm-cpu:latest"}}, resolve=False).runtime_base(
            "vllm"
        )
        == "local/vllm-cpu:latest"
    )
    bad = "x; rm -rf /"
    with pytest.raises(BuilderError, match="base_images.vllm_cpu"):
        load_spec({"base_images": {"vllm_cpu": bad}}, resolve=False)


def test_cpu_settings_reach_the_image_env_and_are_validated():
    spec = BuildSpec(device="cpu", vllm_cpu_kvcache_space=2, vllm_cpu_omp_threads_bind="0-3", vllm_dtype="bfloat16")
    env = _env(render_text(spec)["Dockerfile.vllm"])
    assert env["LLM_DEVICE"] == "cpu" and env["LLM_DTYPE"] == "bfloat16"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"
    gpu = _env(render_text(BuildSpec())["Dockerfile.vllm"])
    assert gpu["LLM_DEVICE"] == "cuda" and "VLLM_CPU_KVCACHE_SPACE" not in gpu
    for bad in ("0-3;x", "$(id)", "auto\n"):
        with pytest.raises(BuilderError, match="vllm_cpu_omp_threads_bind"):
            load_spec({"vllm_cpu_omp_threads_bind": bad}, resolve=False)
    with pytest.raises(BuilderError, match="vllm_cpu_kvcache_space"):
        load_spec({"vllm_cpu_kvcache_space": 0}, resolve=False)


# ---- the boot script on CPU -------------------------------------------------------------------------------


def _max_loras(env: dict[str, str]) -> str:
    argv = vllm_boot.serve_argv(env)
    return argv[argv.index("--max-loras") + 1]


def test_on_cpu_vllm_gets_a_spare_lora_slot():
    """CPU LoRA kernels index "no adapter" (-1) as the last slot: with every slot holding an adapter a base
    request in a mixed batch gets the last adapter. One slot more than the adapters stays empty."""
    two = {"LLM_LORA_MODULES": "a=/models/lora/a b=/models/lora/b", "LLM_MAX_LORAS": "2"}
    assert _max_loras(two) == "2"  # GPU: as many as there are adapters
    assert _max_loras({**two, "LLM_DEVICE": "cpu"}) == "3"
    assert _max_loras({**two, "LLM_DEVICE": "cpu", "LLM_MAX_LORAS": "1"}) == "3"  # fewer would fill every slot
    assert _max_loras({**two, "LLM_DEVICE": "cpu", "LLM_MAX_LORAS": "5"}) == "5"  # more: as asked
    assert _max_loras({"LLM_LORA_MODULES": "a=/models/lora/a", "LLM_DEVICE": "cpu"}) == "2"


def test_the_rendered_cpu_image_serves_its_adapters_with_a_spare_slot(tmp_path):
    text = render_text(BuildSpec(device="cpu"))["Dockerfile.vllm"]
    env = _env(text)
    env.update({"LLM_LORA_MODULES": "tuned=/models/lora/tuned second=/models/lora/second", "LLM_MAX_LORAS": "2"})
    assert _max_loras(env) == "3"


@pytest.mark.parametrize(
    "env,flags,expected",
    [
        ({"LLM_DEVICE": "cpu"}, {"avx2", "avx512f"}, ["--dtype", "float32"]),  # no bf16: 16-bit runs slower
        ({"LLM_DEVICE": "cpu", "LLM_DTYPE": "auto"}, {"avx512f", "avx512_bf16"}, []),  # vLLM's choice
        ({"LLM_DEVICE": "cpu"}, {"fp", "asimd", "bf16"}, []),  # Arm with bf16
        ({"LLM_DEVICE": "cpu", "LLM_DTYPE": "bfloat16"}, {"avx2"}, ["--dtype", "bfloat16"]),  # set: as given
        ({"LLM_DEVICE": "cuda"}, set(), []),
        ({"LLM_DTYPE": "float16"}, set(), ["--dtype", "float16"]),
    ],
)
def test_dtype(env, flags, expected):
    assert vllm_boot.dtype_argv(env, flags) == expected


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert vllm_boot.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert vllm_boot.cpu_flags(tmp_path / "missing") == set()


def test_serve_on_cpu_without_bf16_passes_float32(monkeypatch):
    monkeypatch.setattr(vllm_boot, "cpu_flags", lambda: {"avx2"})
    argv = vllm_boot.serve_argv({"LLM_DEVICE": "cpu", "LLM_EXTRA_ARGS": "--dtype bfloat16"})
    assert argv[argv.index("--dtype") + 1] == "float32" and argv[-2:] == ["--dtype", "bfloat16"]  # extra args win


# ---- compose, Kubernetes, make spec --------------------------------------------------------------------------


def test_compose_cpu_service_reserves_no_gpu_and_drops_everything():
    service = yaml.safe_load(render_text(BuildSpec(device="cpu"))["compose.yaml"])["services"]["vllm"]
    assert "deploy" not in service and "ipc" not in service
    assert service["shm_size"] == VLLM.cpu_shm_size and service["read_only"] is True
    assert service["cap_drop"] == ["ALL"] and "cap_add" not in service
    assert service["environment"]["VLLM_CPU_KVCACHE_SPACE"] == "${VLLM_CPU_KVCACHE_SPACE:-4}"
    assert service["environment"]["VLLM_CPU_OMP_THREADS_BIND"] == "${VLLM_CPU_OMP_THREADS_BIND:-auto}"


def _weights(tmp_path: Path, mib: int) -> Path:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with (model / "model.safetensors").open("wb") as f:
        f.truncate(mib * 2**20)
    return model


def test_k8s_cpu_variant_has_no_gpu_and_requests_model_plus_kv_cache(tmp_path):
    from test_k8s import container, docs_by_kind, validate

    spec = BuildSpec(model=str(_weights(tmp_path, 1536)), device="cpu", vllm_cpu_kvcache_space=3)
    files = k8s.render_k8s_text(spec)
    docs = docs_by_kind(files, "vllm")
    for doc in [d for kind in docs.values() for d in kind]:
        validate(doc)
    c = container(docs["Deployment"][0])
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    # 1.5 GiB of weights served float32 (x2) + 3 GiB KV cache + 2 GiB for the server
    assert c["resources"]["requests"]["memory"] == "8Gi" and c["resources"]["limits"]["memory"] == "10Gi"
    shm = [v for v in docs["Deployment"][0]["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert "vllm/hpa/hpa.yaml" in files  # a CPU workload scales out


def test_make_spec_prints_the_variant(tmp_path):
    model = _weights(tmp_path, 1)
    res = CliRunner().invoke(cli.cli, ["spec", "--model", str(model), "--backend", "vllm", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output.split("\n#")[0])["device"] == "cpu"
    assert f"# DEVICE of vllm: cpu (base {VLLM.cpu_base})" in res.output
