"""The quality step's wiring on the host: which images `make image` measures, the real `builder build`
driving a stand-in docker client (it records its argv and exports a report for `--target quality`),
build/NAME/quality.json, the label, the threshold; and (slow) `builder quality` on a tiny real model."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from builder.errors import BuilderError
from builder.image import quality
from builder.image.build import build
from builder.image.docker import Docker
from builder.model.quality.report import QualityEntry, read_report
from builder.spec import BuildSpec

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
GLM = {"architectures": ["GlmForCausalLM"], "model_type": "glm"}


def _model(tmp_path: Path, config: dict, weight_bytes: int = 1000) -> Path:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    with (d / "model.safetensors").open("wb") as f:
        f.truncate(weight_bytes)  # sparse: a "5 GB" model costs no disk
    return d


def _entry(quant: str = "q4_k_m", top1: float = 0.851, kl: float = 0.0705) -> dict:
    return dict(
        backend="llama.cpp", quant=quant, artifact="model.gguf", size_bytes=105_000_000, kl_mean=kl, kl_p99=0.451,
        kl_max=3.2, top1_agreement=top1, ppl=10.5, ppl_base=9.8, ppl_ratio=1.077, kl_chunks=8, eval_same=5,
        eval_total=6, eval_expected_found=None, decode_tokens_per_s=60.3, reference="reference-f16.gguf",
        reference_size_bytes=271_000_000, reference_decode_tokens_per_s=32.2, reference_expected_found=None,
        tool_version="llama.cpp 0c1e570", text="built-in sample", wall_s=12.0, peak_rss_mb=263.0,
        reference_wall_s=14.0, reference_peak_rss_mb=445.0, threads=2,
    )  # fmt: skip


def test_plan_measures_gguf_images_of_small_local_models(tmp_path):
    small = str(_model(tmp_path, LLAMA))
    both = ["llamacpp", "xinference", "vllm"]
    assert quality.plan(BuildSpec(model=small), both).backends == ["llamacpp", "xinference"]
    assert quality.plan(BuildSpec(model=small, quality="off"), both).backends == []
    assert quality.plan(BuildSpec(model=small), ["vllm"]).backends == []
    assert quality.plan(BuildSpec(model=small, xinference_engine="transformers"), both).backends == ["llamacpp"]
    hub = quality.plan(BuildSpec(model="org/model"), ["llamacpp"])
    assert hub.backends == [] and "QUALITY=on" in hub.reason
    assert quality.plan(BuildSpec(model="org/model", quality="on"), ["llamacpp"]).backends == ["llamacpp"]


def test_plan_skips_large_models_unless_asked(tmp_path):
    big = str(_model(tmp_path, LLAMA, weight_bytes=5_000_000_000))
    skipped = quality.plan(BuildSpec(model=big), ["llamacpp"])
    assert skipped.backends == [] and "5.0 GB" in skipped.reason and "QUALITY=on" in skipped.reason
    assert quality.plan(BuildSpec(model=big, quality="on"), ["llamacpp"]).backends == ["llamacpp"]
    assert quality.plan(BuildSpec(model=big, quality_min_top1=0.8), ["llamacpp"]).backends == ["llamacpp"]


def test_label_and_cost_line():
    entries = [QualityEntry(**{**_entry(), "backend": "llamacpp"})]
    assert quality.label(entries, "llamacpp") == "q4_k_m: KL 0.0705, top-1 0.851, eval 5/6 (vs reference-f16.gguf)"
    assert quality.label(entries, "xinference") == ""
    line = quality.cost_line(entries, 61.0)
    assert line.startswith("quality step: 61 s in all (reference 14 s, 1 artifact(s); measuring 26 s)")
    assert "peak RSS 445 MB, 2 threads" in line


def test_parse_quants():
    assert quality.parse_quants(" q8_0, Q4_K_M ") == ["q8_0", "q4_k_m"]
    for bad in ("", "q9_9", "f16"):
        with pytest.raises(BuilderError, match="QUANTS="):
            quality.parse_quants(bad)


# -- `builder build` with a stand-in docker client ------------------------------------------------------

FAKE_DOCKER = """#!{python}
import json, os, sys
argv = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(argv) + "\\n")
if argv[:1] == ["info"]:
    print("20.10.24")
elif argv[:2] == ["image", "inspect"]:
    print(json.dumps([{{"Id": "sha256:" + "ab" * 32, "Size": 123000000}}]))
elif argv[:1] == ["build"] and "--output" in argv:
    dest = argv[argv.index("--output") + 1].split("dest=", 1)[1]
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "quality.json"), "w") as f:
        f.write(os.environ["FAKE_QUALITY_REPORT"])
"""


@pytest.fixture
def fake_docker(tmp_path, monkeypatch):
    log = tmp_path / "docker-argv.jsonl"
    script = tmp_path / "docker"
    script.write_text(FAKE_DOCKER.format(python=sys.executable, log=str(log)))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("FAKE_QUALITY_REPORT", json.dumps([_entry()]))

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return Docker(str(script), buildx=False), calls


def _builds(calls) -> list[list[str]]:
    return [c for c in calls() if c[:1] == ["build"]]


def _arg(argv: list[str], key: str) -> str | None:
    """The value of one --build-arg KEY=VALUE in a recorded docker argv."""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--build-arg" and value.startswith(f"{key}="):
            return value.split("=", 1)[1]
    return None


def test_build_measures_first_writes_the_report_and_labels_the_image(tmp_path, fake_docker, capsys):
    docker, calls = fake_docker
    spec = BuildSpec(model=str(_model(tmp_path, LLAMA)), backends="llamacpp", name="qtest")
    build(spec, workdir=tmp_path / "build", env_file=tmp_path / ".env", docker=docker)
    quality_build, image_build, *mounted = _builds(calls)
    assert quality_build[quality_build.index("--target") + 1] == "quality"
    assert (
        quality_build[quality_build.index("--output") + 1]
        == f"type=local,dest={tmp_path / 'build/qtest/quality/llamacpp'}"
    )
    assert "-t" not in quality_build and _arg(quality_build, "QUANT") == "q4_k_m"
    assert image_build[image_build.index("--target") + 1] == "runtime"
    # after the runtime, its engine and weights images (builder/image/build.py's mounted_targets)
    assert [(b[b.index("--target") + 1], b[b.index("-t") + 1]) for b in mounted] == [
        ("engine", spec.engine_image("llamacpp")), ("weights", "qtest-weights:latest"),
    ]  # fmt: skip
    assert all(_arg(b, "QUANT") == "q4_k_m" for b in mounted)  # the runtime's build args: its cached stages
    label = _arg(image_build, "QUALITY_SUMMARY")
    assert label == "q4_k_m: KL 0.0705, top-1 0.851, eval 5/6 (vs reference-f16.gguf)"
    [entry] = read_report(tmp_path / "build/qtest/quality.json")
    assert (entry.backend, entry.quant, entry.top1_agreement) == ("llamacpp", "q4_k_m", 0.851)
    rendered = (tmp_path / "build/qtest/Dockerfile.llamacpp").read_text()
    assert "FROM scratch AS quality" in rendered and 'io.llm-builder.quality="${QUALITY_SUMMARY}"' in rendered
    out = capsys.readouterr()
    assert "quality step: llamacpp (QUALITY=auto: 0.00 GB of weights)" in out.err
    assert "quality vs reference-f16.gguf" in out.err and "decode tok/s" in out.err and "60.3" in out.err
    assert (
        "quality step: " in out.err
        and "s in all (reference 14 s, 1 artifact(s); measuring 26 s), peak RSS 445 MB" in out.err
    )
    assert out.err.index("quality vs") > out.err.index("images")  # the table comes at the end


def test_threshold_stops_the_build_before_the_images(tmp_path, fake_docker, capsys):
    docker, calls = fake_docker
    spec = BuildSpec(model=str(_model(tmp_path, LLAMA)), backends="llamacpp", quality_min_top1=0.9)
    with pytest.raises(BuilderError) as e:
        build(spec, workdir=tmp_path / "build", env_file=tmp_path / ".env", docker=docker)
    assert "llamacpp q4_k_m: top-1 agreement 0.851 is below QUALITY_MIN_TOP1=0.9" in str(e.value)
    assert "QUANT=q8_0 would" in str(e.value)
    assert [c[c.index("--target") + 1] for c in _builds(calls)] == ["quality"]  # no image was built
    assert (tmp_path / "build/llm/quality.json").is_file()  # the report stays, to be read


def test_off_and_non_gguf_builds_skip_the_step(tmp_path, fake_docker):
    docker, calls = fake_docker
    stale = tmp_path / "build/llm/quality.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("[]")
    spec = BuildSpec(model=str(_model(tmp_path, LLAMA)), backends="llamacpp", quality="off")
    build(spec, workdir=tmp_path / "build", env_file=tmp_path / ".env", docker=docker)
    image_build = _builds(calls)[0]
    assert [b[b.index("--target") + 1] for b in _builds(calls)] == ["runtime", "engine", "weights"]
    assert _arg(image_build, "QUALITY_SUMMARY") == "" and not stale.exists()
    rendered = (tmp_path / "build/llm/Dockerfile.llamacpp").read_text()
    assert "AS quality" not in rendered and "llama-perplexity" not in rendered


def test_eval_file_reaches_the_stage_and_a_bad_one_fails_first(tmp_path, fake_docker):
    docker, calls = fake_docker
    good = tmp_path / "eval.jsonl"
    good.write_text(json.dumps({"query": "Who maintains the build farm?", "response": "Mira."}) + "\n")
    spec = BuildSpec(model=str(_model(tmp_path, LLAMA)), backends="llamacpp", quality_eval=good)
    build(spec, workdir=tmp_path / "build", env_file=tmp_path / ".env", docker=docker)
    assert (tmp_path / "build/llm/context/quality/eval.jsonl").read_text() == good.read_text()
    assert "--eval /ctx/quality/eval.jsonl" in (tmp_path / "build/llm/Dockerfile.llamacpp").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n')
    before = len(_builds(calls))
    with pytest.raises(BuilderError, match="EVAL file"):
        build(
            spec.model_copy(update={"quality_eval": bad}),
            workdir=tmp_path / "b2",
            env_file=tmp_path / ".env",
            docker=docker,
        )
    assert len(_builds(calls)) == before


def test_docker_output_exports_instead_of_tagging(tmp_path, fake_docker):
    docker, calls = fake_docker
    for buildx in (False, True):
        Docker(docker.client, buildx).build(
            tmp_path,
            tmp_path / "Dockerfile",
            "x:1",
            {},
            {},
            log=tmp_path / "log",
            target="quality",
            output=tmp_path / "o",
        )
    legacy = [c for c in calls() if c[:1] == ["build"]][-1]
    modern = [c for c in calls() if c[:2] == ["buildx", "build"]][-1]
    for argv in (legacy, modern):
        assert argv[argv.index("--output") + 1] == f"type=local,dest={tmp_path / 'o'}"
        assert "-t" not in argv and "--load" not in argv


# -- `builder quality` on a real (tiny, random) model --------------------------------------------------


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    pytest.importorskip("torch")
    from builder.model.quality.tools import binary

    try:
        for name in ("llama-perplexity", "llama-quantize", "llama-server"):
            binary(name)
    except BuilderError as e:
        pytest.skip(str(e))
    from builder.demo.tiny import make_random_llama

    return make_random_llama(tmp_path / "hf", hidden_size=128, intermediate_size=256, num_layers=2)


@pytest.mark.slow
def test_builder_quality_compares_types_side_by_side(tmp_path, tiny_llama):
    model = tiny_llama
    out = tmp_path / "compare"
    env = {**os.environ, "BUILDER_QUANTS": "q8_0,q4_0", "BUILDER_QUALITY_MIN_TOP1": "0.5"}
    res = subprocess.run(
        [sys.executable, "-m", "builder", "quality", "--model", str(model), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    q8, q4 = read_report(out / "quality.json")
    assert (q8.quant, q4.quant) == ("q8_0", "q4_0") and q8.size_bytes > q4.size_bytes and q8.kl_mean < q4.kl_mean
    assert q8.decode_tokens_per_s > 0 and q8.eval_total > 0
    text = res.stdout + res.stderr
    assert "decode tok/s" in text and "quality comparison:" in text and "MB RSS" in text
    assert "types passing QUALITY_MIN_TOP1=0.5:" in text


@pytest.mark.slow
@pytest.mark.quality
def test_builder_quality_merges_the_adapter_and_never_reuses_a_stale_reference(tmp_path, tiny_llama):
    """ADAPTER is merged first; a second adapter merged into the same folder is a new reference, not the old one."""
    from _tiny_hf import make_adapter
    from transformers import AutoModelForCausalLM

    model, out = tiny_llama, tmp_path / "compare"
    env = {**os.environ, "BUILDER_QUANTS": "q8_0"}
    references = []
    for seed in (1, 2):
        adapter = make_adapter(AutoModelForCausalLM.from_pretrained(model), tmp_path / f"lora{seed}", seed=seed)
        argv = [sys.executable, "-m", "builder", "quality", "--model", str(model), "--adapter", str(adapter)]
        res = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "merging" in res.stderr and (out / "merged" / "config.json").is_file()
        references.append((out / "reference-f16.gguf").read_bytes() if (out / "reference-f16.gguf").exists() else b"")
    assert references[0] and references[0] != references[1]
